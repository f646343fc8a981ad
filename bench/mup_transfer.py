"""muP's learning-rate transfer on a CPU: an lr sweep at several widths for sp and mup; each width's best lr.

Under muP (model.parametrization=mup, base width 64) the best lr should stay put as the width grows (at most one
grid step); under SP it should move (shrink). Depth 2, 4 heads, B=8 x T=64 on tiny shakespeare, AdamW (betas 0.9,
0.95, no weight decay, 10 warmup steps then a constant lr), the same batches for every run of a seed; the score is
the mean loss of 8 fixed held-out batches (the corpus's last 10%) after the last step, averaged over the seeds.

To fit 2 shared cores, the runs train in this process (gpt_exp.coord_check.build: the model and optimizer the
Trainer builds) on tiny shakespeare's tokens renumbered to the ~11k GPT-2 tokens it uses (the readout is 4.5x
smaller; the model is the same GPT-2 otherwise).

    python bench/mup_transfer.py                        # the sweep; writes bench/mup_transfer.{json,png}
    # bench/RESULTS.md's run (a loaded machine): --widths 32,64,128 --base-width 32 --steps 40 --seeds 1, sp and mup
    # in two processes (--parametrizations sp / mup), then --merge A/mup_transfer.json B/mup_transfer.json
    python bench/mup_transfer.py --widths 32,64 --lrs 0.01 --steps 5 --seeds 1 --out /tmp/x   # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpt_exp.coord_check import Setup, batches, build, load_tokens
from lr_sweep import best_lrs, cells, plot, print_table  # bench/, this script's dir


def renumber(tokens: np.ndarray) -> tuple[np.ndarray, int]:
    used, dense = np.unique(tokens, return_inverse=True)
    return dense.astype(np.int64), len(used)


def train(width: int, parametrization: str, lr: float, seed: int, steps: int, data, val, vocab: int,
          base_width: int = 64) -> float:
    setup = Setup(seed=seed, base_width=base_width)
    model, optimizer = build(width, parametrization, setup, lr, vocab_size=vocab)
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    for step, (x, y) in enumerate(data[:steps]):
        warm = min(1.0, (step + 1) / 10)
        for g, s in zip(optimizer.param_groups, scales):
            g["lr"] = lr * warm * s
        _, loss = model(x, y)
        if not math.isfinite(loss.item()):
            return float("nan")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float(np.mean([model(x, y)[1].item() for x, y in val]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,128,256")
    parser.add_argument("--lrs", default="0.001,0.002,0.004,0.008,0.016,0.032")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--base-width", type=int, default=64, help="muP's base width")
    parser.add_argument("--parametrizations", default="sp,mup", help="e.g. sp in one process, mup in another")
    parser.add_argument("--merge", nargs="*", default=[], help="mup_transfer.json files to report together, no runs")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "gpt_exp_mup_cache"))
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    results = [r for path in args.merge for r in json.loads(Path(path).read_text())["runs"]]
    start = time.time()
    for seed in range(0 if args.merge else args.seeds):
        if seed == 0:
            tokens, vocab = renumber(load_tokens(args.cache_dir))
            cut = int(len(tokens) * 0.9)
            val = batches(tokens[cut:], 8, 8, 64, seed=12345)
        data = batches(tokens[:cut], args.steps, 8, 64, seed)
        for par in args.parametrizations.split(","):
            for width in widths:
                for lr in lrs:
                    loss = train(width, par, lr, seed, args.steps, data, val, vocab, args.base_width)
                    results.append({"parametrization": par, "width": width, "lr": lr, "seed": seed,
                                    "val_loss": loss})
                    print(f"[{time.time() - start:6.0f}s] seed {seed} {par} n_embd={width} lr={lr:g}: {loss:.4f}",
                          flush=True)
    params = [p for p in ("sp", "mup") if any(r["parametrization"] == p for r in results)]
    mean = cells(results, "width")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {par: best_lrs(mean, par, "width") for par in params}
    (out / "mup_transfer.json").write_text(json.dumps({"runs": results, "mean": mean, "best_lr": summary,
                                                        "steps": args.steps, "base_width": args.base_width},
                                                       indent=1))
    plot(mean, out / "mup_transfer.png", "width", "n_embd")
    print()
    print_table(mean, "width")
    for par, best in summary.items():
        moved = [lrs.index(b) for b in best.values() if b in lrs]
        print(f"{par}: best lr per width {best}; it moves {max(moved) - min(moved)} grid steps")
    print(f"{time.time() - start:.0f}s; wrote {out / 'mup_transfer.json'} and {out / 'mup_transfer.png'}")


if __name__ == "__main__":
    main()
