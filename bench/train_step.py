"""Benchmark 1: a training step of gpt_exp's full run path against the lecture's hand-written loop.

Each round runs the lecture's loop (bench/lecture.py) and `python -m gpt_exp.run` (config, loader, metrics, W&B
offline, progress all on) as separate processes, one after the other, on the same model, B, T, seed and data;
rounds alternate so that drift on a shared machine hits both. Prints the median step time of each (steps after
--warmup), the tok/s ratio, and the largest loss difference over the steps both ran.
    python bench/train_step.py                    # every case below (about 15 minutes on 2 cores)
    python bench/train_step.py --case 124m-fp32 --rounds 2 --steps 30
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

ROOT = Path(__file__).resolve().parent.parent
# The lecture's first loop: AdamW(lr=3e-4) with torch's defaults, no clipping, no schedule. gpt_exp set to the same.
LECTURE_OPTIM = ["optim.lr=3e-4", "optim.schedule=constant", "optim.warmup_steps=0", "optim.betas=[0.9,0.999]",
                 "optim.weight_decay=0.01", "train.grad_clip=0"]
TINY = {"ours": ["model=tiny"], "lecture": ["--n_layer", "2", "--n_head", "2", "--n_embd", "24", "--block_size", "256"]}
CASES = {  # name: (lecture loop, lecture args, gpt_exp overrides, goal as a tok/s ratio)
    "124m-fp32": ("early", [], ["device.dtype=fp32", *LECTURE_OPTIM], 1.5),
    "124m-bf16": ("early", [], ["device.dtype=bf16", *LECTURE_OPTIM], 3.5),
    "124m-bf16-vs-final": ("final", [], ["device.dtype=bf16"], 2.0),
    "tiny-fp32": ("early", TINY["lecture"], [*TINY["ours"], "device.dtype=fp32", *LECTURE_OPTIM], None),
}


def lecture_steps(loop: str, extra: list[str], steps: int, B: int, T: int) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "lecture.py"), "--loop", loop, "--steps", str(steps),
                          "--B", str(B), "--T", str(T), *extra], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def gpt_exp_steps(overrides: list[str], steps: int, B: int, T: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as cwd:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        subprocess.run([sys.executable, "-m", "gpt_exp.run", f"B={B}", f"T={T}", f"train.max_steps={steps}",
                        "device=cpu", "logger.mode=offline", *overrides], cwd=cwd, env=env, check=True,
                       capture_output=True, text=True)
        [metrics] = Path(cwd).glob("outputs/*/*/metrics.jsonl")
        return [row for row in map(json.loads, metrics.read_text().splitlines()) if "loss" in row]


def median_dt(rows: list[dict], warmup: int) -> float:
    return statistics.median(r["dt_ms"] for r in rows[warmup:])


def run_case(name: str, rounds: int, steps: int, warmup: int, B: int, T: int) -> dict:
    loop, lecture_args, overrides, goal = CASES[name]
    lecture_dt, ours_dt, deltas = [], [], []
    for _ in range(rounds):
        lecture = lecture_steps(loop, lecture_args, steps, B, T)
        ours = gpt_exp_steps(overrides, steps, B, T)
        lecture_dt.append(median_dt(lecture, warmup))
        ours_dt.append(median_dt(ours, warmup))
        deltas.append(max(abs(a["loss"] - b["loss"]) for a, b in zip(lecture, ours)))
    result = {"case": name, "lecture_ms": statistics.median(lecture_dt), "gpt_exp_ms": statistics.median(ours_dt),
              "max_abs_dloss": max(deltas), "goal": goal}
    result["ratio"] = result["lecture_ms"] / result["gpt_exp_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=list(CASES), action="append", help="default: every case")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=15, help="steps left out of the medians (host warm-up)")
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--T", type=int, default=32)
    args = parser.parse_args()
    for name in args.case or list(CASES):
        r = run_case(name, args.rounds, args.steps, args.warmup, args.B, args.T)
        goal = f" (goal >= {r['goal']}x)" if r["goal"] else ""
        # the final loop pads the vocab (another init) and schedules its lr: its losses are not ours to match
        dloss = "" if CASES[name][0] == "final" else f", max |dloss| {r['max_abs_dloss']:.2e}"
        print(f"{name}: lecture {r['lecture_ms']:.0f} ms/step, gpt_exp {r['gpt_exp_ms']:.0f} ms/step, "
              f"tok/s ratio {r['ratio']:.2f}x{goal}{dloss}", flush=True)


if __name__ == "__main__":
    main()
