"""Where a step of gpt_exp's real run path goes: data, forward, backward, gradient norm/clipping, optimizer,
logging (metrics.jsonl, W&B offline, progress) and the rest, per step, in ms and as a share of the step.

The run is `python -m gpt_exp.run` itself, in this process, with stopwatches wrapped around the functions its
training loop calls (the product code carries no timers). CPU only: on a GPU these calls return before the work
is done, so only the step total would be right.
    python bench/step_profile.py                          # 124M fp32, 124M bf16 and tiny, B=4, T=32
    python bench/step_profile.py --case 124m-bf16 --steps 30 train.grad_clip=0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

CASES = {
    "124m-fp32": ["device.dtype=fp32"],
    "124m-bf16": ["device.dtype=bf16"],
    "tiny-fp32": ["model=tiny", "device.dtype=fp32"],
}
PHASES = ("data", "forward", "backward", "clip", "optimizer", "logging")


def _timed(phase: str, fn, spent: dict):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - t0
    return wrapper


def profile_run(overrides: list[str]) -> list[dict]:
    """Run gpt_exp in this process with every phase timed; one dict of ms per phase (and the step) per step."""
    import torch

    from gpt_exp import run
    from gpt_exp.data.loader import BatchLoader
    from gpt_exp.model import GPT
    from gpt_exp.tracking import Tracker

    spent: dict[str, float] = defaultdict(float)
    steps: list[dict] = []
    patches = [(BatchLoader, "next_batch", "data"), (GPT, "forward", "forward"), (torch.Tensor, "backward", "backward"),
               (torch.nn.utils, "get_total_norm", "clip"), (torch.nn.utils, "clip_grads_with_norm_", "clip"),
               (torch.optim.AdamW, "step", "optimizer"), (Tracker, "log_step", "logging")]
    for owner, name, phase in patches:
        setattr(owner, name, _timed(phase, getattr(owner, name), spent))
    log_step = Tracker.log_step

    def log_and_collect(self, m):
        log_step(self, m)  # timed as logging
        steps.append({"step_ms": m.dt_ms + spent["logging"] * 1000,
                      **{phase: spent[phase] * 1000 for phase in PHASES}})
        spent.clear()

    Tracker.log_step = log_and_collect
    sys.argv = ["gpt_exp.run", *overrides]
    try:
        run.main()
    except SystemExit as e:
        if e.code:
            raise
    return steps


def child(case: str, steps: int, B: int, T: int, overrides: list[str]) -> None:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    with tempfile.TemporaryDirectory() as cwd:
        os.chdir(cwd)
        rows = profile_run([f"B={B}", f"T={T}", f"train.max_steps={steps}", "device=cpu", "logger.mode=offline",
                            *CASES[case], *overrides])
    print("ROWS " + json.dumps(rows))


def report(case: str, rows: list[dict], warmup: int) -> None:
    rows = rows[warmup:]
    step = statistics.median(r["step_ms"] for r in rows)
    medians = {phase: statistics.median(r[phase] for r in rows) for phase in PHASES}
    other = statistics.median(r["step_ms"] - sum(r[p] for p in PHASES) for r in rows)
    parts = " | ".join(f"{p} {ms:.1f} ms ({ms / step:.1%})" for p, ms in {**medians, "other": other}.items())
    print(f"{case}: step {step:.1f} ms (median of {len(rows)}) = {parts}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), action="append", help="default: every case")
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--warmup", type=int, default=15, help="steps left out of the medians (host warm-up)")
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--T", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more gpt_exp overrides, e.g. train.grad_clip=0")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.B, args.T, args.overrides)
    for case in args.case or list(CASES):  # each case in a fresh process, as a user's run would be
        out = subprocess.run([sys.executable, __file__, "--child", case, "--steps", str(args.steps), "--B", str(args.B),
                              "--T", str(args.T), *args.overrides], capture_output=True, text=True, check=True)
        [line] = [line for line in out.stdout.splitlines() if line.startswith("ROWS ")]
        report(case, json.loads(line[5:]), args.warmup)


if __name__ == "__main__":
    main()
