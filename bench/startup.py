"""Benchmark 4: start-up, the wall time from the command to the first optimizer step with a warm token cache,
against `python -c "import torch, hydra"` alone (the floor any Hydra + torch program pays). Goal: <= 2x.

The first step's own duration (dt_ms in metrics.jsonl) is subtracted: what is measured is the work before it.
    python bench/startup.py [--runs 3] [--model tiny]
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
from pathlib import Path


def import_floor() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, hydra"], check=True)
    return time.perf_counter() - t0


def to_first_step(model: str, cache_dir: str, logger: str) -> float:
    """Seconds from launching the run to the start of its first optimizer step."""
    with tempfile.TemporaryDirectory() as cwd:
        env = {**os.environ, "WANDB_SILENT": "true"}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "gpt_exp.run", f"model={model}", "train.max_steps=2",
                                 f"data.cache_dir={cache_dir}", f"logger.mode={logger}"], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:  # the first row of metrics.jsonl lands when the first step ends
            rows = list(Path(cwd).glob("outputs/*/*/metrics.jsonl"))
            if rows and rows[0].read_text().count("\n") >= 1:
                seen = time.perf_counter() - t0
                first = json.loads(rows[0].read_text().splitlines()[0])
                break
            if proc.poll() is not None:
                raise SystemExit(f"the run exited with {proc.returncode} before its first step")
            time.sleep(0.002)
        proc.wait()
        return seen - first["dt_ms"] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        to_first_step(args.model, cache_dir, "disabled")  # builds the token cache: later runs start warm
        for logger in ("disabled", "offline"):
            floor, ours = [], []
            for _ in range(args.runs):  # interleaved, so drift hits both
                floor.append(import_floor())
                ours.append(to_first_step(args.model, cache_dir, logger))
            f, o = statistics.median(floor), statistics.median(ours)
            print(f"start-up (model={args.model}, logger.mode={logger}): {o:.2f} s to the first step vs "
                  f"{f:.2f} s for `import torch, hydra`: {o / f:.2f}x (goal <= 2x)", flush=True)


if __name__ == "__main__":
    main()
