"""Compare finished, failed or still-running runs: a table of what differs and how it did, plus an overlay plot.
Runs that differ only by `train.seed` are grouped into one row (mean ± sample std) and one mean curve with a band."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt_exp.atomic import atomic_path
from gpt_exp.config import flatten
from gpt_exp.cli import ArgumentParser, command
from gpt_exp.errors import UserError
from gpt_exp.metrics import is_number, read_metrics
from gpt_exp.plots import plot_overlay

RUNNING = "running/incomplete"
SEED_KEY = "train.seed"
LOSS_METRICS = ("final_loss", "best_loss", "final_val_loss")  # aggregated as mean ± std over seeds
METRICS = (*LOSS_METRICS, "steps", "tokens", "median_tok_per_s", "wall_s")
# Logger settings and paths decide where a run writes, not what it learns, and often differ per run.
IGNORED_SECTIONS = ("logger.", "hydra.")
IGNORED_SUFFIXES = ("dir", "path")


class CompareError(UserError):
    """A problem with the user's input, printed as one line by the CLI."""


@dataclass
class RunRecord:
    path: Path
    params: dict[str, Any]  # the composed config, flattened to dotted keys
    curve_steps: np.ndarray  # the training loss curve, one point per logged step
    curve_losses: np.ndarray
    status: str
    final_loss: float | None
    best_loss: float | None
    final_val_loss: float | None
    steps: int
    tokens: int | None
    median_tok_per_s: float | None
    wall_s: float | None


def expand_paths(patterns: list[str]) -> list[Path]:
    """Existing paths as given, else glob matches (for quoted globs); a path matching nothing, a file or a dir that
    cannot be read is an error."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern))
        if not matches:
            raise CompareError(f"{pattern} does not exist; pass a run dir or a sweep dir (outputs/multirun/DATE/TIME)")
        for match in matches:
            if not os.path.isdir(match):
                raise CompareError(f"{match} is a file, not a run dir; pass a run dir (outputs/DATE/TIME) or a sweep "
                                   f"dir (outputs/multirun/DATE/TIME)")
            if not os.access(match, os.R_OK | os.X_OK):  # glob would skip it silently and report no runs
                raise CompareError(f"cannot read {match} (permission denied); fix its permissions (chmod u+rx)")
        paths += [Path(m) for m in matches]
    return paths


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself if it is a run dir, else every run dir below it (a sweep), in natural order (2 before 10)."""
    if is_run_dir(path):
        return [path]
    found = [c.parent.parent for c in path.glob("**/.hydra/config.yaml") if c.is_file()]
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def load_runs(patterns: list[str]) -> list[RunRecord]:
    runs: dict[Path, RunRecord] = {}
    for path in expand_paths(patterns):
        run_dirs = find_run_dirs(path)
        if not run_dirs:
            raise CompareError(f"no runs under {path} (a run dir holds .hydra/config.yaml); pass a dir from outputs/")
        for run_dir in run_dirs:
            if run_dir.resolve() not in runs:  # a run named twice (a dir and a glob) is shown once
                runs[run_dir.resolve()] = load_run(run_dir)
    return list(runs.values())


def load_run(run_dir: Path) -> RunRecord:
    rows = read_metrics(run_dir / "metrics.jsonl")
    # A resumed run logs the steps after its checkpoint again; the later row of a step is the one that counts.
    train = sorted({r["step"]: r for r in rows if "loss" in r}.values(), key=lambda r: r["step"])
    losses = np.array([r["loss"] for r in train], dtype=float)
    finite = losses[np.isfinite(losses)]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    tok_per_s = [r["tok_per_s"] for r in train if "tok_per_s" in r]
    # What metrics.jsonl says so far; summary.json, written when the run ends, has the last word.
    stats: dict[str, Any] = {
        "status": RUNNING,
        "final_loss": float(losses[-1]) if len(losses) else None,
        "best_loss": float(finite.min()) if len(finite) else None,
        "steps": len(train),
        "tokens": train[-1].get("tokens") if train else None,
        "median_tok_per_s": float(np.median(tok_per_s)) if tok_per_s else None,
        "wall_s": None,
    }
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        stats.update(read_summary(summary_path, stats.keys()))
    return RunRecord(
        path=run_dir,
        params={k: tuple(v) if isinstance(v, list) else v  # hashable, for grouping
                for k, v in flatten(_read_config(run_dir / ".hydra" / "config.yaml")).items()},
        curve_steps=np.array([r["step"] for r in train], dtype=float),
        curve_losses=losses,
        final_val_loss=float(vals[-1]) if vals else None,
        **stats,
    )


def read_summary(path: Path, keys) -> dict:
    """The `keys` that summary.json holds, each checked: a damaged file is an error, not a row of wrong numbers."""
    fix = "delete it to show the run as incomplete"
    try:
        summary = json.loads(path.read_bytes())
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for binary bytes
        raise CompareError(f"{path} is not JSON; {fix}") from None
    if not isinstance(summary, dict):
        raise CompareError(f"{path} is not a run summary (a JSON {type(summary).__name__}, not an object); {fix}")
    found = {k: summary[k] for k in keys if k in summary}
    for key, value in found.items():
        ok = isinstance(value, str) if key == "status" else value is None or is_number(value)
        if not ok:
            raise CompareError(f"{path}: {key}={value!r} is not {'a string' if key == 'status' else 'a number'}; {fix}")
    return found


def _read_config(path: Path) -> dict:
    fix = "repair it, or leave the run out of the comparison"
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CompareError(f"{path} is not valid YAML ({e.__class__.__name__}); {fix}") from None
    except OSError as e:
        if e.filename:  # the file cannot be read: main reports it
            raise
        cfg = None  # OmegaConf refuses a top-level scalar with an OSError of its own
    if not isinstance(cfg, DictConfig):
        raise CompareError(f"{path} is not a run config (a YAML mapping of settings); {fix}")
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException:  # ${hydra:...} cannot resolve outside a Hydra job; compare it as text
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def varying_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values differ between the runs, in config order, skipping logger settings and paths."""
    keys = list(dict.fromkeys(k for run in runs for k in run.params))
    keys = [k for k in keys if not (k.startswith(IGNORED_SECTIONS) or k.rsplit(".", 1)[-1].endswith(IGNORED_SUFFIXES))]
    return [k for k in keys if len({repr(run.params.get(k)) for run in runs}) > 1]


def group_runs(runs: list[RunRecord]) -> tuple[list[str], list[list[RunRecord]]]:
    """(the keys that label a row, the runs of each row): runs equal in all but the seed share a row."""
    keys = varying_keys(runs)
    if SEED_KEY in keys:
        without_seed = [k for k in keys if k != SEED_KEY]
        groups: dict[tuple, list[RunRecord]] = {}
        for run in runs:
            groups.setdefault(tuple(repr(run.params.get(k)) for k in without_seed), []).append(run)
        if any(len(g) > 1 for g in groups.values()):
            return without_seed, list(groups.values())
    return keys, [[run] for run in runs]


def contributing(group: list[RunRecord]) -> list[RunRecord]:
    """The runs a group's numbers come from: its completed runs when it has any, since a run that failed or is
    still going stopped at another step and would skew the mean."""
    completed = [r for r in group if r.status == "completed"]
    return completed or group


def compare_table(runs: list[RunRecord], metric: str = "final_loss") -> list[dict]:
    """One row per configuration, sorted by `metric` ascending (a config key works too); missing values last."""
    keys, groups = group_runs(runs)
    if metric not in METRICS and metric not in keys:
        choices = ", ".join([*METRICS, *keys])
        raise CompareError(f"unknown --metric {metric}; choose one of {choices}")
    rows = [_group_row(keys, group) for group in groups]
    return sorted(rows, key=lambda row: _sort_key(row[metric]))


def _group_row(keys: list[str], group: list[RunRecord]) -> dict:
    used = contributing(group)
    row: dict[str, Any] = {k: group[0].params.get(k) for k in keys}
    row["n"] = len(used)
    for name in METRICS:
        values = [v for v in (getattr(r, name) for r in used) if v is not None]
        row[name] = values[0] if len(values) == 1 else float(np.mean(values)) if values else None
        if name in LOSS_METRICS:
            row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) >= 2 else None
    statuses = Counter(r.status for r in group)
    row["status"] = group[0].status if len(statuses) == 1 else ", ".join(f"{n} {s}" for s, n in statuses.items())
    row["run_dirs"] = [str(r.path) for r in group]
    return row


def _sort_key(value: Any) -> tuple:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    is_text = not isinstance(value, (int, float))
    return (missing, is_text, str(value) if is_text else (0 if missing else value))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def loss_curves(runs: list[RunRecord], smooth: int = 1) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    """(label, steps, mean loss, std or None) per configuration, each run smoothed by a trailing `smooth`-step mean;
    a seed group is averaged over the steps all its runs logged."""
    keys, groups = group_runs(runs)
    curves = []
    for group in groups:
        used = [r for r in contributing(group) if len(r.curve_steps)]
        if not used:
            continue
        steps = used[0].curve_steps
        for run in used[1:]:
            steps = np.intersect1d(steps, run.curve_steps)
        losses = np.stack([moving_average(r.curve_losses, smooth)[np.isin(r.curve_steps, steps)] for r in used])
        label = ",".join(f"{k}={_fmt(group[0].params.get(k))}" for k in keys)
        if len(group) > 1:
            label = f"{label or 'all seeds'} (n={len(used)})"
        label = label or group[0].path.name
        std = losses.std(axis=0, ddof=1) if len(used) > 1 else None
        curves.append((label, steps, losses.mean(axis=0), std))
    return curves


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start), so the curve keeps its steps."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def format_table(rows: list[dict], out_dir: Path) -> str:
    """Aligned text table: config keys, losses (± std for seed groups), progress, status, run dirs."""
    keys = [k for k in rows[0] if k not in {*METRICS, "n", "status", "run_dirs"} and not k.endswith("_std")]
    grouped = any(row["n"] > 1 for row in rows)
    losses = [m for m in LOSS_METRICS if any(row[m] is not None for row in rows)]
    header = [*keys, *(["n"] if grouped else []), *losses, "steps", "tokens", "tok/s", "wall", "status", "run"]
    lines = [header]
    for row in rows:
        cells = [_fmt(row[k]) for k in keys] + ([str(row["n"])] if grouped else [])
        for m in losses:
            std = row[f"{m}_std"]
            cells.append("-" if row[m] is None else f"{row[m]:.4f}" + (f"±{std:.4f}" if std is not None else ""))
        cells += [_count(row[k]) for k in ("steps", "tokens", "median_tok_per_s")] + [_duration(row["wall_s"])]
        cells += [row["status"], ",".join(os.path.relpath(d, out_dir) for d in row["run_dirs"])]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


def write_outputs(rows: list[dict], curves: list, out_dir: Path, logx: bool = False) -> None:
    """compare.csv and compare.json (full precision) and compare.png, written atomically together: a failure in
    any of them leaves the previous three as they were."""

    if out_dir.exists() and not out_dir.is_dir():
        raise CompareError(f"--out {out_dir} is a file; give a dir for compare.csv, compare.json, compare.png")
    try:
        with (atomic_path(out_dir / "compare.csv") as csv_tmp, atomic_path(out_dir / "compare.json") as json_tmp,
              atomic_path(out_dir / "compare.png") as png_tmp):
            with open(csv_tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows({**row, "run_dirs": ";".join(row["run_dirs"])} for row in rows)
            json_tmp.write_text(json.dumps(rows, indent=2) + "\n")
            plot_overlay(curves, png_tmp, title=f"training loss: {out_dir.name}", logx=logx)
    except OSError as e:
        raise CompareError(f"cannot write compare.csv, compare.json, compare.png to {out_dir} ({e.strerror}); "
                           f"pass --out DIR with a dir you can write") from None


def default_out_dir(patterns: list[str], runs: list[RunRecord]) -> Path:
    """The sweep dir when exactly one PATH is a sweep, else the run dirs' common parent (a lone run: itself)."""
    sweeps = [p for p in expand_paths(patterns) if not is_run_dir(p)]
    if len(sweeps) == 1:
        return sweeps[0]
    return Path(os.path.commonpath([r.path.resolve() for r in runs]))


@command
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m gpt_exp.compare", description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="sweep dirs, run dirs or globs")
    parser.add_argument("--metric", default="final_loss", help=f"sort key, ascending: {', '.join(METRICS)} or a key")
    parser.add_argument("--smooth", type=int, default=1, help="average the loss over the last N logged steps")
    parser.add_argument("--logx", action="store_true", help="log-scale step axis")
    parser.add_argument("--out", type=Path, help="where to write compare.{csv,json,png}")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        raise CompareError(f"--smooth {args.smooth} must be at least 1 (1 means no smoothing)")
    try:
        runs = load_runs(args.paths)
        rows = compare_table(runs, args.metric)
        out_dir = args.out or default_out_dir(args.paths, runs)
        write_outputs(rows, loss_curves(runs, args.smooth), out_dir, args.logx)
    except OSError as e:  # run files that cannot be read (a dir in a file's place, permissions)
        if e.filename is None:
            raise
        raise CompareError(f"cannot read {e.filename} ({e.strerror}); check the path and its permissions") from None
    print(format_table(rows, out_dir))
    print(f"wrote compare.csv, compare.json, compare.png to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
