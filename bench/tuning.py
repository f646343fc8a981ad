"""The protocol the research benchmarks share: run a Hydra sweep, pick a setting's best value on tuning seeds (the
lowest mean final val loss), then test on other seeds. Read from the runs' own summary.json and recorded config."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml

RUN = [sys.executable, "-m", "gpt_exp.run", "-m"]
COMPARE = [sys.executable, "-m", "gpt_exp.compare"]


def call(cmd: list[str]) -> None:
    """Run CMD, printing it with the machine's load (the benchmarks share their cores)."""
    print("$", shlex.join(cmd), f"   # load {os.getloadavg()[0]:.1f}", flush=True)
    subprocess.run(cmd, check=True)


def check_seeds(tune_seeds: str, test_seeds: str) -> None:
    overlap = set(tune_seeds.split(",")) & set(test_seeds.split(","))
    if overlap:
        sys.exit(f"error: --test-seeds shares {sorted(overlap)} with --tune-seeds; test on seeds not tuned on")


def final_val_losses(sweep: Path, key: str) -> dict[float, list[float]]:
    """Each swept value of KEY ("optim.lr", "optim.muon_lr") -> the final val losses of its runs in SWEEP (a run
    without one, diverged or failed, counts as nan)."""
    section, name = key.split(".")
    losses: dict[float, list[float]] = {}
    for run in sorted(config.parent.parent for config in sweep.glob("**/.hydra/config.yaml")):  # widened_*/ too
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        summary = run / "summary.json"
        loss = json.loads(summary.read_text()).get("final_val_loss") if summary.is_file() else None
        losses.setdefault(float(config[section][name]), []).append(math.nan if loss is None else float(loss))
    return losses


def best_value(sweep: Path, key: str, label: str = "") -> float:
    """The value of KEY with the lowest mean final val loss over the tuning seeds; a value with a diverged seed is
    ruled out. An optimum at the grid's edge is said: the grid should be widened. Printed in one piece (LABEL first),
    so that sweeps tuned side by side do not interleave their lines."""
    losses = final_val_losses(sweep, key)
    means = {value: sum(v) / len(v) for value, v in losses.items()}
    lines = [f"{label}:"] if label else []
    lines += [f"  {key}={value:g}: mean final val loss {mean:.4f} over {len(losses[value])} tuning seeds"
              for value, mean in sorted(means.items())]
    finite = [v for v in means if math.isfinite(means[v])]
    if not finite:
        print("\n".join(lines), flush=True)
        sys.exit(f"error: every {key} in {sweep} diverged or failed; lower the grid")
    best = min(finite, key=means.get)
    if best in (min(means), max(means)) and len(means) > 1:
        lines.append(f"  note: the best {key} ({best:g}) is at the edge of the grid; widen it")
    print("\n".join(lines), flush=True)
    return best


def bracketed_best(sweep: Path, key: str, run_value: Callable[[float, Path], None], tries: int = 2,
                   label: str = "") -> float:
    """best_value, widened until the grid brackets it: while the best is at an edge, run_value(value, dir) trains
    the next value out (the grid's own step, e.g. x2) into SWEEP/widened_<value>/ and the choice is made again, at
    most TRIES times. A value beyond that diverges counts as worse, so the search stops there."""
    best = best_value(sweep, key, label)
    for _ in range(tries):
        grid = sorted(final_val_losses(sweep, key))
        if len(grid) < 2 or best not in (grid[0], grid[-1]):
            break
        beyond = best * grid[0] / grid[1] if best == grid[0] else best * grid[-1] / grid[-2]
        run_value(beyond, sweep / f"widened_{beyond:g}")
        best = best_value(sweep, key, label)
    return best
