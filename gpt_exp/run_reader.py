"""A run dir as the analysis tools read it (its config, summary.json, metrics.jsonl), and the summary statistics of
its metrics rows, which Tracker.close writes into summary.json with the same function. Torch-free.

A run dir may come from elsewhere: its files are data. Its config is read as plain YAML and nothing in it is
resolved, since `${oc.env:NAME}` would put an environment variable (a token, a password) into the outputs."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gpt_exp.config import flatten, inert_settings
from gpt_exp.errors import UserError
from gpt_exp.metrics import is_number, read_metrics
from gpt_exp.shapes import arch_settings, flops_per_token

RUNNING = "running/incomplete"
SHAPE_KEYS = ("model.n_layer", "model.n_embd", "model.vocab_size", "model.block_size", "T")  # what shapes.py counts


class RunDirError(UserError):
    """A run dir, or a path given as one, that cannot be read: printed as one line by the CLI."""


@dataclass
class RunRecord:
    path: Path
    params: dict[str, Any]  # the run's config, flattened to dotted keys
    curve_steps: np.ndarray  # the training loss curve, one point per logged step
    curve_losses: np.ndarray
    curve_tokens: np.ndarray | None  # the same rows' cumulative tokens; None: some row lacks them
    curve_flops: np.ndarray | None  # cumulative training FLOPs; None: neither the rows nor summary.json say
    curve_elapsed: np.ndarray | None  # wall seconds since the run started
    curve_lr: np.ndarray | None
    val_steps: np.ndarray  # the val loss, one point per evaluation
    val_losses: np.ndarray
    status: str
    final_loss: float | None
    best_loss: float | None
    final_val_loss: float | None
    steps: int
    tokens: int | None
    median_tok_per_s: float | None
    wall_s: float | None
    train_split_tokens: int | None = None  # the training split's size: tokens / this = epochs (None: older runs)
    final_val_bpb: float | None = None  # the last val loss in bits per byte (None: older runs)
    # a data=mix run's per-source numbers: tokens/NAME, final_ and best_ val_loss/NAME and val_bpb/NAME
    by_source: dict[str, float] = field(default_factory=dict)


# --- a run's summary statistics ----------------------------------------------------------------------------------

def rows_by_step(rows: list[dict], key: str) -> list[dict]:
    """The rows that hold `key`, one per step in step order: a resumed run logs the steps after its checkpoint again,
    and the later row of a step is the one that counts."""
    return sorted({r["step"]: r for r in rows if key in r}.values(), key=lambda r: r["step"])


def run_stats(rows: list[dict]) -> dict:
    """What a run's metrics rows add up to: steps, the final and best (finite) training and val losses, the tokens
    trained and the median tok/s; None where the rows do not say."""
    train, val = rows_by_step(rows, "loss"), rows_by_step(rows, "val_loss")
    finite = [r["loss"] for r in train if math.isfinite(r["loss"])]
    bpb = [r["val_bpb"] for r in val if "val_bpb" in r]  # rows of older runs lack it
    tok_per_s = [r["tok_per_s"] for r in train if "tok_per_s" in r]
    return {
        "steps": len(train),
        "final_loss": float(train[-1]["loss"]) if train else None,
        "best_loss": float(min(finite)) if finite else None,
        "tokens": train[-1].get("tokens") if train else None,
        "median_tok_per_s": float(statistics.median(tok_per_s)) if tok_per_s else None,
        "final_val_loss": float(val[-1]["val_loss"]) if val else None,
        "best_val_loss": float(min(r["val_loss"] for r in val)) if val else None,
        "final_val_bpb": float(bpb[-1]) if bpb else None,
        "best_val_bpb": float(min(bpb)) if bpb else None,
        **_stats_by_source(train, val),
    }


def _stats_by_source(train: list[dict], val: list[dict]) -> dict:
    """A data=mix run's per-source numbers: the tokens trained from each source (tokens/NAME, the last row's), and
    the final and best val_loss/NAME and val_bpb/NAME."""
    stats = {k: v for k, v in (train[-1] if train else {}).items() if k.startswith("tokens/")}
    for key in dict.fromkeys(k for r in val for k in r if k.startswith(("val_loss/", "val_bpb/"))):
        found = [float(r[key]) for r in val if key in r]
        stats[f"final_{key}"], stats[f"best_{key}"] = found[-1], min(found)
    return stats


# --- finding run dirs --------------------------------------------------------------------------------------------

def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself if it is a run dir, else every run dir below it (a sweep), in natural order (2 before 10)."""
    if is_run_dir(path):
        return [path]
    found = [c.parent.parent for c in path.glob("**/.hydra/config.yaml") if c.is_file()]
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def expand_paths(patterns: list[str]) -> list[Path]:
    """Existing paths as given, else glob matches (for quoted globs). A path named that matches nothing, is a file or
    cannot be read is an error; what a glob matches besides runs and sweeps (a sweep's multirun.yaml, compare's
    outputs) is skipped, as the shell's `SWEEP/*` would match it too."""
    paths: list[Path] = []
    for pattern in patterns:
        if os.path.exists(pattern):
            if not os.path.isdir(pattern):
                raise RunDirError(f"{pattern} is a file, not a run dir; pass a run dir (outputs/DATE/TIME) or a "
                                  f"sweep dir (outputs/multirun/DATE/TIME)")
            paths.append(_readable(Path(pattern)))
            continue
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise RunDirError(f"{pattern} does not exist; pass a run dir or a sweep dir (outputs/multirun/DATE/TIME)")
        found = [_readable(Path(m)) for m in matches if os.path.isdir(m)]
        found = [p for p in found if find_run_dirs(p)]
        if not found:
            raise RunDirError(f"{pattern} matches no run dir (a run dir holds .hydra/config.yaml); pass run or sweep "
                              f"dirs from outputs/")
        paths += found
    return paths


def _readable(path: Path) -> Path:
    if not os.access(path, os.R_OK | os.X_OK):  # glob would skip it silently and report no runs
        raise RunDirError(f"cannot read {path} (permission denied); fix its permissions (chmod u+rx)")
    return path


def load_runs(patterns: list[str]) -> list[RunRecord]:
    runs: dict[Path, RunRecord] = {}
    for path in expand_paths(patterns):
        run_dirs = find_run_dirs(path)
        if not run_dirs:
            raise RunDirError(f"no runs under {path} (a run dir holds .hydra/config.yaml); pass a dir from outputs/")
        for run_dir in run_dirs:
            if run_dir.resolve() not in runs:  # a run named twice (a dir and a glob) is shown once
                runs[run_dir.resolve()] = load_run(run_dir)
    return list(runs.values())


def default_out_dir(patterns: list[str], runs: list[RunRecord]) -> Path:
    """The sweep dir when exactly one PATH is a sweep, else the run dirs' common parent (a lone run: itself)."""
    sweeps = [p for p in expand_paths(patterns) if not is_run_dir(p)]
    if len(sweeps) == 1:
        return sweeps[0]
    return Path(os.path.commonpath([r.path.resolve() for r in runs]))


# --- reading one run dir -----------------------------------------------------------------------------------------

def _column(rows: list[dict], key: str) -> np.ndarray | None:
    """`key` of every row as floats, or None when a row lacks it (a run made before the key was logged)."""
    if not all(is_number(r.get(key)) for r in rows):
        return None
    return np.array([r[key] for r in rows], dtype=float)


def load_run(run_dir: Path) -> RunRecord:
    rows = read_metrics(run_dir / "metrics.jsonl")
    train, val = rows_by_step(rows, "loss"), rows_by_step(rows, "val_loss")
    # What metrics.jsonl says so far; summary.json, written when the run ends, has the last word.
    so_far = run_stats(rows)
    numbers: dict[str, Any] = {"status": RUNNING, "wall_s": None,
                               **{k: so_far[k] for k in ("final_loss", "best_loss", "steps", "tokens",
                                                         "median_tok_per_s")}}
    by_source = {k: v for k, v in so_far.items() if "/" in k}
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        numbers.update(read_summary(summary_path, [*numbers, "flops_per_token", "train_split_tokens", *by_source]))
        by_source.update({k: numbers.pop(k) for k in list(numbers) if "/" in k})
    config = flatten(read_config(run_dir))
    unused = inert_settings(config)  # left out: they would split or label runs by settings they never used
    params = {k: tuple(v) if isinstance(v, list) else v  # hashable, for grouping
              for k, v in config.items() if k not in unused}
    # runs made before the rows had flops: summary.json's flops_per_token, or (older still) the shape's
    flops_per_token = numbers.pop("flops_per_token", None) or shape_flops_per_token(params)
    tokens = _column(train, "tokens")
    flops = _column(train, "flops")
    if flops is None and tokens is not None and flops_per_token:
        flops = tokens * flops_per_token
    elapsed = _column(train, "elapsed_s")
    if elapsed is None and (dt_ms := _column(train, "dt_ms")) is not None:  # before the rows had elapsed_s
        elapsed = np.cumsum(dt_ms) / 1000
    return RunRecord(
        path=run_dir,
        params=params,
        curve_steps=np.array([r["step"] for r in train], dtype=float),
        curve_losses=np.array([r["loss"] for r in train], dtype=float),
        curve_tokens=tokens,
        curve_flops=flops,
        curve_elapsed=elapsed,
        curve_lr=_column(train, "lr"),
        val_steps=np.array([r["step"] for r in val], dtype=float),
        val_losses=np.array([r["val_loss"] for r in val], dtype=float),
        final_val_loss=so_far["final_val_loss"],
        final_val_bpb=so_far["final_val_bpb"],
        by_source=by_source,
        **numbers,
    )


def shape_flops_per_token(params: dict) -> int | None:
    """The run's training FLOPs per token from its config's shape (gpt_exp/shapes.py), None if it lacks one."""
    shape = [params.get(key) for key in SHAPE_KEYS]
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        return flops_per_token(*shape, **architecture(params))
    return None


def architecture(params: dict) -> dict:
    """The run's architecture settings (model.pos, model.mlp, ...) and n_head, as shapes.py counts them; a config
    of a version before them has GPT-2's."""
    model = {key.removeprefix("model."): value for key, value in params.items() if key.startswith("model.")}
    return {"n_head": model.get("n_head"), **arch_settings(model)}


def read_summary(path: Path, keys) -> dict:
    """The `keys` that summary.json holds, each checked: a damaged file is an error, not a row of wrong numbers."""
    fix = "delete it to show the run as incomplete"
    try:
        summary = json.loads(path.read_bytes())
    except ValueError:  # JSONDecodeError, or UnicodeDecodeError for binary bytes
        raise RunDirError(f"{path} is not JSON; {fix}") from None
    if not isinstance(summary, dict):
        raise RunDirError(f"{path} is not a run summary (a JSON {type(summary).__name__}, not an object); {fix}")
    found = {k: summary[k] for k in keys if k in summary}
    for key, value in found.items():
        ok = isinstance(value, str) if key == "status" else value is None or is_number(value)
        if not ok:
            raise RunDirError(f"{path}: {key}={value!r} is not {'a string' if key == 'status' else 'a number'}; {fix}")
    return found


def read_config(run_dir: Path) -> dict:
    """The run's .hydra/config.yaml as plain data: YAML values, nothing resolved. A run records the values it trained
    with, so a `${...}` in it is refused, not resolved: its resolver could read the environment or call code."""
    path = run_dir / ".hydra" / "config.yaml"
    fix = "repair it, or leave the run out of the comparison"
    try:
        cfg = yaml.safe_load(path.read_bytes())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid YAML ({e.__class__.__name__}); {fix}") from None
    if not isinstance(cfg, dict):
        raise RunDirError(f"{path} is not a run config (a YAML mapping of settings); {fix}")
    for key, value in flatten(cfg).items():
        if (text := _interpolation(value)) is not None:
            raise RunDirError(f"{run_dir}: {key}={text[:80]} in .hydra/config.yaml is an interpolation; a run dir "
                              f"is data and gpt_exp resolves nothing in it (${{oc.env:...}} would read this "
                              f"machine's environment): write the value the run trained with, or leave the run out")
    return cfg


def _interpolation(value: Any) -> str | None:
    """The first string holding `${` in a config value, within its lists and mappings too (data mixes)."""
    if isinstance(value, str):
        return value if "${" in value else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return next((found for item in items if (found := _interpolation(item)) is not None), None)
