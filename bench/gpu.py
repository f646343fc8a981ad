"""Benchmark 5 (needs a CUDA GPU): GPT-2 124M at T=1024 and B=16..64 with bf16 autocast, TF32, SDPA flash attention,
torch.compile and fused AdamW, through the real run path; prints tok/s and MFU against the GPU's dense bf16 peak
(gpt_exp/device.py). Goal on one H100: MFU >= 55%.
    python bench/gpu.py [--B 16 32 64] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def measure(B: int, steps: int, warmup: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as cwd:
        subprocess.run([sys.executable, "-m", "gpt_exp.run", "device=cuda", f"B={B}", "T=1024",
                        f"train.max_steps={steps}", "logger.mode=disabled", *extra], cwd=cwd, check=True,
                       env={**os.environ, "WANDB_SILENT": "true"})
        [metrics] = Path(cwd).glob("outputs/*/*/metrics.jsonl")
        rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r][warmup:]
    return {"B": B, "tok_per_s": statistics.median(r["tok_per_s"] for r in rows),
            "mfu": statistics.median(r["mfu"] for r in rows) if "mfu" in rows[0] else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out (compilation, allocator warm-up)")
    parser.add_argument("overrides", nargs="*", help="more gpt_exp overrides, e.g. data=text data.path=...")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    for B in args.B:
        r = measure(B, args.steps, args.warmup, args.overrides)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown peak"
        print(f"124M B={B} T=1024 bf16 compile: {r['tok_per_s']:,.0f} tok/s, MFU {mfu} (goal >= 55% on H100)", flush=True)


if __name__ == "__main__":
    main()
