"""fp32 matmuls of a GPT-2 124M step on this CPU: torch's BLAS path (MKL) against oneDNN (gpt_exp/cpu.py),
for the forward, input-gradient and weight-gradient products of every linear layer at B*T rows. Prints GFLOP/s,
the ratio, and each one's largest error against float64 (both are fp32 arithmetic: the errors are alike).
    python bench/matmul.py [--rows 128] [--repeat 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt_exp.device import keep_freed_memory
from gpt_exp.cpu import _mm_t, onednn_available

# (in, out) of the 124M model's linear layers: attention qkv and projection, MLP up and down, the tied lm_head
LAYERS = {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768),
          "lm_head": (768, 50257)}


def seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def products(rows: int, n_in: int, n_out: int):
    """(name, torch's way, oneDNN's way, float64 reference) for the three products of one layer."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g) * 0.02, torch.randn(
        rows, n_out, generator=g)
    return [
        ("forward", lambda: x @ w.t(), lambda: _mm_t(x, w), x.double() @ w.double().t()),
        ("grad in", lambda: dy @ w, lambda: _mm_t(dy, w.t()), dy.double() @ w.double()),
        ("grad w", lambda: dy.t() @ x, lambda: _mm_t(dy.t(), x.t()), dy.double().t() @ x.double()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="B*T: 128 is the lecture's B=4, T=32")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("this torch has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    keep_freed_memory()  # as a run does: no page faults for fresh 154 MB results
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rows={args.rows}", flush=True)
    total = {"blas": 0.0, "onednn": 0.0}
    for layer, (n_in, n_out) in LAYERS.items():
        for name, blas, onednn, reference in products(args.rows, n_in, n_out):
            flop = 2 * args.rows * n_in * n_out
            t_blas, t_dnn = seconds(blas, args.repeat), seconds(onednn, args.repeat)
            err_blas = (blas().double() - reference).abs().max().item()
            err_dnn = (onednn().double() - reference).abs().max().item()
            total["blas"] += t_blas
            total["onednn"] += t_dnn
            print(f"{layer:12s} {name:8s} BLAS {flop / t_blas / 1e9:4.0f} GFLOP/s  oneDNN {flop / t_dnn / 1e9:4.0f} "
                  f"GFLOP/s  {t_blas / t_dnn:4.2f}x  max error {err_blas:.1e} / {err_dnn:.1e}", flush=True)
    print(f"one of each product per layer: BLAS {total['blas'] * 1e3:.1f} ms, oneDNN {total['onednn'] * 1e3:.1f} ms, "
          f"{total['blas'] / total['onednn']:.2f}x")


if __name__ == "__main__":
    main()
