"""Compare finished, failed or still-running runs: a table of what differs and how it did, plus an overlay plot.
Runs that differ only by `train.seed` are grouped into one row (mean ± sample std) and one mean curve with a band;
--baseline tests each group against one (Welch's t-test; Holm-adjusted p-values when several are tested),
--target asks which reached a loss, and when."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from gpt_exp.atomic import atomic_path
from gpt_exp.cli import ArgumentParser, command
from gpt_exp.errors import UserError
from gpt_exp.metrics import is_number
from gpt_exp.plots import Curve, plot_overlay, trailing_mean
from gpt_exp.run_reader import RUNNING, RunRecord, default_out_dir, load_runs

SEED_KEY = "train.seed"
# Aggregated as mean ± std over seeds; loss_at_x is the smoothed loss where every run can be compared (common_x).
LOSS_METRICS = ("final_loss", "best_loss", "final_val_loss", "loss_at_x")
METRICS = (*LOSS_METRICS, "final_val_bpb", "steps", "tokens", "median_tok_per_s", "wall_s")
TESTED_METRICS = (*LOSS_METRICS, "final_val_bpb")  # lower is better: --baseline and --target test them
AXES = ("step", "tokens", "flops", "time")
# Logger settings and the cache's path decide where a run writes, not what it learns, and often differ per run; so
# do the settings of how often it saves, logs and evaluates, and its CPU threads. data.path is what it learns from.
IGNORED_SECTIONS = ("logger.", "hydra.")
BOOKKEEPING_KEYS = ("resume", "train.ckpt_every", "train.keep_ckpts", "train.eval_batches", "train.log_every",
                    "data.cache_dir", "eval.hellaswag_path", "device.threads")
ALPHA, POWER = 0.05, 0.8  # the test --baseline runs, and the power its seed count is sized for
NO_TEST = "n=1: no test"
MAX_GRID = 5000  # points of a seed group's mean curve


class CompareError(UserError):
    """A problem with the user's input, printed as one line by the CLI."""


# --- the x axis ---------------------------------------------------------------------------------------------------

def axis(run: RunRecord, x: str) -> np.ndarray:
    """The run's training rows on axis `x` (step, tokens, flops or time); a run that cannot give it is an error."""
    values = {"step": run.curve_steps, "tokens": run.curve_tokens, "flops": run.curve_flops,
              "time": run.curve_elapsed}[x]
    if values is None:
        metrics = run.path / "metrics.jsonl"
        raise CompareError({
            "tokens": f"--x tokens needs tokens in every row of {metrics}; use --x step",
            "flops": f"--x flops needs runs made by this version of gpt_exp ({metrics} has no flops and "
                     f"{run.path / 'summary.json'} no flops_per_token); use --x tokens",
            "time": f"--x time needs elapsed_s or dt_ms in every row of {metrics}; use --x step",
        }[x])
    return np.maximum.accumulate(values) if len(values) else values  # interpolation needs it non-decreasing


def default_metric(runs: list[RunRecord]) -> str:
    """final_val_loss when every finished run has one: the last step's training loss is one batch's, and it keeps
    falling while a model overfits; else final_loss."""
    finished = [r for r in runs if r.status != RUNNING]
    return "final_val_loss" if finished and all(r.final_val_loss is not None for r in finished) else "final_loss"


def default_x(runs: list[RunRecord]) -> str:
    """tokens when the runs train on different numbers of tokens per step (B, T, gradient accumulation), so that
    equal steps are unequal amounts of training; else step."""
    logged = [r for r in runs if len(r.curve_steps)]
    if any(r.curve_tokens is None for r in logged):
        return "step"
    per_step = {round(r.curve_tokens[-1] / (r.curve_steps[-1] + 1)) for r in logged}  # steps count from 0
    return "tokens" if len(per_step) > 1 else "step"


def common_x(runs: list[RunRecord], x: str) -> float | None:
    """The largest x that every run reached: where runs of different lengths, batch sizes or speeds compare. A run
    that failed or diverged early does not hold the others back (unless every run did)."""
    logged = [r for r in runs if len(r.curve_steps)]
    going = [r for r in logged if r.status not in ("failed", "diverged")] or logged
    return float(min(axis(r, x)[-1] for r in going)) if going else None


def smoothing_span(runs: list[RunRecord], x: str, smooth: int) -> float:
    """The x width that --smooth N averages over: N logged steps of the run that covers the most x per step, and
    the same width for every other run (0: no smoothing)."""
    if smooth <= 1:
        return 0.0
    gaps = [float(np.median(np.diff(axis(r, x)))) for r in runs if len(r.curve_steps) > 1]
    return smooth * max(gaps, default=1.0)


def smoothed_loss(run: RunRecord, x: str, span: float) -> np.ndarray:
    return trailing_mean(axis(run, x), run.curve_losses, span)


def loss_at(run: RunRecord, x: str, at: float | None, span: float) -> float | None:
    """The run's smoothed training loss at x = `at`, interpolated between logged points; None if it did not get there."""
    xs = axis(run, x)
    if at is None or not len(xs) or not xs[0] <= at <= xs[-1]:
        return None
    value = float(np.interp(at, xs, smoothed_loss(run, x, span)))
    return value if math.isfinite(value) else None


def first_crossing(xs: np.ndarray, losses: np.ndarray, level: float) -> float | None:
    """The x at which `losses` first reached `level`, interpolated linearly from the point before; None if never."""
    below = np.flatnonzero(losses <= level)  # NaN is never below
    if not len(below):
        return None
    i = below[0]
    if i == 0 or not math.isfinite(losses[i - 1]):
        return float(xs[i])
    fraction = (losses[i - 1] - level) / (losses[i - 1] - losses[i])
    return float(xs[i - 1] + fraction * (xs[i] - xs[i - 1]))


def on_common_grid(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(grid, one row per curve): each (x, y) interpolated onto the x that any of them logged within the range all of
    them cover. Seeds log at the same steps but not at the same tokens or seconds: averaging by index mixes points."""
    lo, hi = max(float(x[0]) for x, _ in curves), min(float(x[-1]) for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if len(grid) > MAX_GRID:
        grid = np.linspace(lo, hi, MAX_GRID)
    return grid, np.stack([np.interp(grid, x, y) for x, y in curves])


# --- grouping and the table ---------------------------------------------------------------------------------------

def varying_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values differ between the runs, in config order, skipping logger settings and bookkeeping
    (BOOKKEEPING_KEYS)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.params))
    keys = [k for k in keys if not (k.startswith(IGNORED_SECTIONS) or k in BOOKKEEPING_KEYS)]
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


def compare_table(runs: list[RunRecord], metric: str = "final_loss", x: str | None = None, smooth: int = 1,
                  baseline: list[str] = (), target: float | None = None, effect: float | None = None) -> list[dict]:
    """One row per configuration, sorted by `metric` ascending (a config key works too); missing values last.
    x: the axis of loss_at_x and --target's crossing (None: default_x); baseline: KEY=VALUE that pick the group the
    others are tested against; target: a loss each group's mean is tested to be below; effect: the difference the
    seed count is sized for (None: the observed one, post hoc)."""
    keys, groups = group_runs(runs)
    by_source = list(dict.fromkeys(k for r in runs for k in r.by_source))  # a mixture's: final_val_bpb/NAME, ...
    if metric not in METRICS and metric not in keys and metric not in by_source:
        choices = ", ".join([*METRICS, *by_source, *keys])
        raise CompareError(f"unknown --metric {metric}; choose one of {choices}")
    if (baseline or target is not None) and not is_testable(metric):
        option = "--baseline" if baseline else "--target"
        raise CompareError(f"{option} tests a loss; use --metric {', '.join(TESTED_METRICS)} (or a mixture's "
                           f"final_val_bpb/NAME, ...), not --metric {metric}")
    x = x or default_x(runs)
    span = smoothing_span(runs, x, smooth)
    at = common_x([r for g in groups for r in contributing(g)], x)
    loss_at_x = {r.path: loss_at(r, x, at, span) for r in runs}

    def values(group: list[RunRecord], name: str) -> list[float]:
        """The finite `name` of each run the group's numbers come from, for the tests."""
        found = (loss_at_x[r.path] if name == "loss_at_x" else run_metric(r, name) for r in contributing(group))
        return [float(v) for v in found if v is not None and math.isfinite(v)]

    rows = [_group_row(keys, group, loss_at_x, x, at, by_source) for group in groups]
    if target is not None:
        for row, group in zip(rows, groups):
            row.update(_target_columns(group, values(group, metric), target, x, span))
    if baseline:
        base = find_baseline(baseline, keys, groups)
        for i, (row, group) in enumerate(zip(rows, groups)):
            row.update(baseline_columns(values(group, metric), values(groups[base], metric), i == base, effect))
        add_holm(rows)
    return [row for _, row in sorted(enumerate(rows), key=lambda item: _sort_key(item[1][metric]))]


def run_metric(run: RunRecord, name: str) -> Any:
    """A metric of a run: one of METRICS, or a mixture's per-source one (final_val_bpb/NAME; None if it has none)."""
    return run.by_source.get(name) if "/" in name else getattr(run, name)


def _group_row(keys: list[str], group: list[RunRecord], loss_at_x: dict, x: str, at: float | None,
               by_source: list[str] = ()) -> dict:
    used = contributing(group)
    row: dict[str, Any] = {k: group[0].params.get(k) for k in keys}
    row["n"] = len(used)
    # Seeds of a sequential data order all read the same batches: their spread is the init's alone.
    shuffled = group[0].params.get("data.order") == "shuffled"
    row["data_varies"] = None if len(group) == 1 else "yes" if shuffled else "no"
    for name in (*METRICS, *by_source):
        found = (loss_at_x[r.path] if name == "loss_at_x" else run_metric(r, name) for r in used)
        values = [v for v in found if v is not None]
        row[name] = values[0] if len(values) == 1 else float(np.mean(values)) if values else None
        if is_testable(name):
            row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) >= 2 else None
    row["x_axis"], row["x_common"] = x, at
    statuses = Counter(r.status for r in group)
    row["status"] = group[0].status if len(statuses) == 1 else ", ".join(f"{n} {s}" for s, n in statuses.items())
    row["run_dirs"] = [str(r.path) for r in group]
    return row


def is_testable(metric: str) -> bool:
    """Whether --baseline and --target can test `metric`: a loss (bits per byte is one), a mixture's per source too."""
    return metric in TESTED_METRICS or _source_loss(metric)


def _source_loss(name: str) -> bool:
    """Whether a metric is a mixture's per-source val loss or bpb (final_val_loss/NAME, best_val_bpb/NAME, ...)."""
    return "/" in name and name.startswith(("final_val_", "best_val_"))


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _target_columns(group: list[RunRecord], values: list[float], target: float, x: str, span: float) -> dict:
    """The one-sided p-value that the group's mean is below `target`, and the tokens and seconds at which its runs'
    smoothed loss first reached it (a mean over the runs when all of them did)."""
    used = [r for r in contributing(group) if len(r.curve_steps)]
    reached: dict[str, list] = {"step": [], "tokens": [], "time": []}
    for run in used:
        smoothed = smoothed_loss(run, x, span)
        for name, xs in (("step", run.curve_steps), ("tokens", run.curve_tokens), ("time", run.curve_elapsed)):
            reached[name].append(None if xs is None else first_crossing(np.maximum.accumulate(xs), smoothed, target))
    p = None
    if len(values) >= 2:
        with warnings.catch_warnings():  # identical values: scipy warns and returns nan, shown as no p-value
            warnings.simplefilter("ignore", RuntimeWarning)
            p = _finite(stats.ttest_1samp(values, target, alternative="less").pvalue)

    def mean_if_all(found: list) -> float | None:
        return float(np.mean(found)) if found and all(v is not None for v in found) else None

    return {
        "target": target,
        "p_below_target": p,
        "target_note": NO_TEST if len(values) == 1 else None,
        "tokens_to_target": mean_if_all(reached["tokens"]),
        "time_to_target": mean_if_all(reached["time"]),
        "runs_reached_target": sum(v is not None for v in reached["step"]),
    }


def find_baseline(specs: list[str], keys: list[str], groups: list[list[RunRecord]]) -> int:
    """The index of the one group whose config matches every KEY=VALUE of --baseline (KEY may name a config group:
    model=tiny means model.name=tiny)."""
    matching = list(range(len(groups)))
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not (sep and key):
            raise CompareError(f"--baseline {spec} must be KEY=VALUE, e.g. --baseline optim.lr=0.001")
        params = groups[0][0].params
        key = key if key in params or f"{key}.name" not in params else f"{key}.name"
        if key not in params:
            raise CompareError(f"--baseline {spec}: {key} is not a config key of these runs; the swept keys are "
                               f"{', '.join(keys) or 'none'}")
        matching = [i for i in matching if _matches(groups[i][0].params.get(key), text)]
        if not matching:
            seen = sorted({_fmt(g[0].params.get(key)) for g in groups})
            raise CompareError(f"--baseline {spec} matches no run; {key} is {', '.join(seen)} in these runs")
    if len(matching) > 1:
        other = next(k for k in keys if len({repr(groups[i][0].params.get(k)) for i in matching}) > 1)
        seen = ", ".join(f"{other}={_fmt(groups[i][0].params.get(other))}" for i in matching)
        raise CompareError(f"--baseline {' '.join(specs)} matches {len(matching)} configurations ({seen}); add "
                           f"--baseline {other}=VALUE to pick one")
    return matching[0]


def _matches(value: Any, text: str) -> bool:
    """Whether a config value is what the user wrote on the command line (0.001 matches 1e-3)."""
    if is_number(value):
        try:
            return math.isclose(value, float(text), rel_tol=1e-9)
        except ValueError:
            return False
    if value is None or isinstance(value, bool):
        return str(value).lower() == text.lower().replace("null", "none")
    return str(value) == text


def baseline_columns(values: list[float], base: list[float], is_base: bool, effect: float | None = None) -> dict:
    """This group's metric against the baseline's: the difference of the means, its 95% CI and p-value from Welch's
    t-test (no equal-variance assumption: a config can change the spread over seeds), and the seeds per side that
    would resolve a difference of `effect`, or, post hoc, of the observed one (which overstates what a sweep
    could find when the observed difference is noise's). baseline_p_holm is filled in by compare_table."""
    row: dict[str, Any] = {"baseline_diff": None, "baseline_ci_low": None, "baseline_ci_high": None,
                           "baseline_p": None, "baseline_p_holm": None, "seeds_needed": None,
                           "seeds_needed_effect": None, "seeds_needed_post_hoc": effect is None,
                           "baseline_note": None}
    if is_base:
        return row | {"baseline_note": "baseline"}
    if not values or not base:
        return row
    row["baseline_diff"] = float(np.mean(values) - np.mean(base))
    if len(values) < 2 or len(base) < 2:
        return row | {"baseline_note": NO_TEST}
    with warnings.catch_warnings():  # identical values: scipy warns and returns nan, shown as no p-value
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(values, base, equal_var=False)
        ci = result.confidence_interval(1 - ALPHA)  # t quantile at the Welch-Satterthwaite dof
    pooled_std = math.sqrt(((len(values) - 1) * np.var(values, ddof=1) + (len(base) - 1) * np.var(base, ddof=1))
                           / (len(values) + len(base) - 2))
    sized_for = abs(row["baseline_diff"]) if effect is None else effect
    return row | {"baseline_ci_low": _finite(ci.low), "baseline_ci_high": _finite(ci.high),
                  "baseline_p": _finite(result.pvalue), "seeds_needed": seeds_needed(sized_for, pooled_std),
                  "seeds_needed_effect": sized_for}


def add_holm(rows: list[dict]) -> None:
    """Fill baseline_p_holm in the rows that have a baseline_p, Holm-adjusted over those rows (one family)."""
    tested = [row for row in rows if row["baseline_p"] is not None]
    for row, adjusted in zip(tested, holm([row["baseline_p"] for row in tested])):
        row["baseline_p_holm"] = adjusted


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (each group against one baseline): the i-th smallest
    times (m - i + 1), kept non-decreasing and at most 1. It holds the chance of any false positive at alpha whatever
    the tests' dependence (they share the baseline). (scipy has no Holm.)"""
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(sorted(range(len(p_values)), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def t_test_power(n: int, effect: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided two-sample Student t-test with n runs per side for a true difference of `effect` pooled
    standard deviations: the noncentral t's mass beyond the critical values."""
    df = 2 * n - 2
    nc = effect * math.sqrt(n / 2)
    critical = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(critical, df, nc) + stats.nct.cdf(-critical, df, nc))


def seeds_needed(diff: float, pooled_std: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Seeds per side at which a t-test at `alpha` finds a true difference `diff` with `power`, if the std over seeds
    is `pooled_std`. The t-based power (t_test_power, exact for normal noise), not the normal approximation: that
    one undercounts at the few seeds a sweep has (4 where 6 are needed for 2 std, 16 where 17 for 1 std).
    None: no difference to resolve."""
    if diff == 0 or not math.isfinite(diff) or not math.isfinite(pooled_std):
        return None
    if pooled_std == 0:
        return 2
    effect = abs(diff) / pooled_std
    z = stats.norm.ppf
    n = max(2, math.ceil(2 * ((z(1 - alpha / 2) + z(power)) / effect) ** 2))  # the normal approximation: a lower bound
    if n > 100_000:  # where the two agree
        return n
    while t_test_power(n, effect, alpha) < power:
        n += 1
    return n


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


# --- curves and their labels --------------------------------------------------------------------------------------

def short_names(keys: list[str]) -> dict[str, str]:
    """Legend names of swept keys: without their section (optim.lr -> lr), a group's choice by the group
    (model.name -> model); the full key where two would read the same."""
    short = {k: k.split(".")[0] if k.endswith(".name") else k.rsplit(".", 1)[-1] for k in keys}
    taken = Counter(short.values())
    return {k: short[k] if taken[short[k]] == 1 else k for k in keys}


def short_value(value: Any) -> str:
    """A config value for a legend: floats in 4 significant digits with a plain exponent (1e-3, 3.162e-4, 0.95)."""
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            mantissa, exponent = f"{value:.3e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return ",".join(short_value(v) for v in value)
    return str(value)


def curve_label(keys: list[str], params: dict, n: int = 1, best: bool = False, fallback: str = "") -> str:
    """A configuration's legend entry: its swept keys, short (`lr=1e-3 B=16`), then (n=3) for seeds and `best`."""
    names = short_names(keys)
    label = " ".join(f"{names[k]}={short_value(params.get(k))}" for k in keys)
    label = label or ("all seeds" if n > 1 else fallback)
    notes = [f"n={n}"] * (n > 1) + ["best"] * best
    return f"{label} ({', '.join(notes)})" if notes else label


def loss_curves(runs: list[RunRecord], smooth: int = 1, x: str | None = None, best: str | None = None) -> list[Curve]:
    """One Curve per configuration on axis `x`, each run smoothed by a trailing mean over `smooth` steps (as x
    widths: smoothing_span); a seed group is averaged on a common x grid. best: a run dir of the configuration to
    mark as the best."""
    x = x or default_x(runs)
    span = smoothing_span(runs, x, smooth)
    keys, groups = group_runs(runs)
    curves = []
    for group in groups:
        used = [r for r in contributing(group) if len(r.curve_steps)]
        if not used:
            continue
        grid, losses = on_common_grid([(axis(r, x), smoothed_loss(r, x, span)) for r in used])
        lr = np.interp(grid, axis(used[0], x), used[0].curve_lr) if used[0].curve_lr is not None else None
        evaluated = [(np.interp(r.val_steps, r.curve_steps, axis(r, x)), r.val_losses) for r in used
                     if len(r.val_steps)]
        val_x, val_losses = on_common_grid(evaluated) if evaluated else (None, None)
        is_best = best is not None and best in {str(r.path) for r in group}
        curves.append(Curve(
            label=curve_label(keys, group[0].params, n=len(used), best=is_best, fallback=group[0].path.name),
            x=grid, loss=losses.mean(axis=0), std=losses.std(axis=0, ddof=1) if len(used) > 1 else None, lr=lr,
            val_x=val_x, val_loss=val_losses.mean(axis=0) if evaluated else None, best=is_best,
        ))
    return curves


def best_run(rows: list[dict], metric: str) -> str | None:
    """A run dir of the best configuration: lowest `metric` when it is a loss, else lowest final loss; None for a
    single configuration (nothing to mark) or when no row has the number."""
    name = metric if metric in LOSS_METRICS or _source_loss(metric) else "final_loss"
    scored = [row for row in rows if row[name] is not None and math.isfinite(row[name])]
    if len(rows) < 2 or not scored:
        return None
    return min(scored, key=lambda row: row[name])["run_dirs"][0]


def log_scale_notes(curves: list[Curve], x: str, logx: bool, logy: bool) -> list[str]:
    """A log axis cannot show x <= 0 (every run's step 0) or a loss <= 0: the plot leaves those points out, and each
    axis that did says how many in one line. Nothing left to show is an error."""
    points = [(np.asarray(px, dtype=float), np.asarray(py, dtype=float)) for c in curves
              for px, py in ((c.x, c.loss), (c.val_x, c.val_loss)) if px is not None]
    xs = np.concatenate([px for px, _ in points]) if points else np.zeros(0)
    ys = np.concatenate([py for _, py in points]) if points else np.zeros(0)
    dropped = {"--logx": (xs <= 0) if logx else np.zeros(len(xs), bool),
               "--logy": (ys <= 0) if logy else np.zeros(len(ys), bool)}
    what = {"--logx": f"{x} <= 0", "--logy": "a loss <= 0"}
    if (logx or logy) and len(xs) and (dropped["--logx"] | dropped["--logy"]).all():
        on = [flag for flag, used in (("--logx", logx), ("--logy", logy)) if used]
        raise CompareError(f"{' and '.join(on)}: every point has {' or '.join(what[f] for f in on)}, which a log axis "
                           f"cannot show; drop {' and '.join(on)}")
    return [f"{flag}: left out {n} point{'s' * (n > 1)} with {what[flag]} (a log axis cannot show them)"
            for flag, out in dropped.items() if (n := int(out.sum()))]


# --- output -------------------------------------------------------------------------------------------------------

STAT_FIELDS = {*METRICS, "n", "data_varies", "x_axis", "x_common", "status", "run_dirs", "target", "p_below_target",
               "target_note", "tokens_to_target", "time_to_target", "runs_reached_target", "baseline_diff",
               "baseline_ci_low", "baseline_ci_high", "baseline_p", "baseline_p_holm", "seeds_needed",
               "seeds_needed_effect", "seeds_needed_post_hoc", "baseline_note"}


def format_table(rows: list[dict], out_dir: Path, metric: str = "final_loss") -> str:
    """Aligned text table: config keys, losses (± std for seed groups), the tests, progress, status, run dirs."""
    # config keys: a mixture's per-source metrics (keyed NAME/SOURCE) are numbers, and only --metric's is shown
    keys = [k for k in rows[0] if k not in STAT_FIELDS and "/" not in k and not k.endswith("_std")]
    grouped = any(row["n"] > 1 for row in rows)
    losses = [m for m in LOSS_METRICS[:3] if any(row[m] is not None for row in rows)]
    losses += [metric] if is_testable(metric) and metric not in losses else []
    # loss_at_x where it tells something the final loss does not: runs that stop at different x, or smoothing.
    if metric == "loss_at_x" or any(row["loss_at_x"] != row["final_loss"] for row in rows):
        losses.append("loss_at_x")
    header = [*keys, *(["n", "data varies"] if grouped else [])]
    header += [f"loss@{_x_text(rows[0]['x_axis'], rows[0]['x_common'])}" if m == "loss_at_x" else m for m in losses]
    tested = "baseline_note" in rows[0]
    holm_shown = tested and sum(row["baseline_p"] is not None for row in rows) > 1
    if tested:
        effect = None if rows[0]["seeds_needed_post_hoc"] else rows[0]["seeds_needed_effect"]
        header += [f"Δ{metric}", "95% CI", "p (Welch)", *["p (Holm)"] * holm_shown,
                   "seeds/side (post hoc)" if effect is None else f"seeds/side for Δ={effect:g}"]
    target = rows[0].get("target")
    if target is not None:
        header += [f"p({metric}<{target:g})", f"tokens to {target:g}", f"time to {target:g}"]
    header += ["steps", "tokens", "tok/s", "wall", "status", "run"]
    lines = [header]
    for row in rows:
        cells = [_fmt(row[k]) for k in keys] + ([str(row["n"]), _fmt(row["data_varies"])] if grouped else [])
        for m in losses:
            std = row[f"{m}_std"]
            cells.append("-" if row[m] is None else f"{row[m]:.4f}" + (f"±{std:.4f}" if std is not None else ""))
        if tested:
            cells += _baseline_cells(row, holm_shown)
        if target is not None:
            cells.append(row["target_note"] or _p(row["p_below_target"]))
            tokens, time = _count(row["tokens_to_target"]), _duration(row["time_to_target"])
            if row["tokens_to_target"] is None and row["time_to_target"] is None and row["runs_reached_target"]:
                tokens = time = f"{row['runs_reached_target']}/{row['n']} runs"  # the mean needs every run
            cells += [tokens, time]
        cells += [_count(row[k]) for k in ("steps", "tokens", "median_tok_per_s")] + [_duration(row["wall_s"])]
        cells += [row["status"], ",".join(os.path.relpath(d, out_dir) for d in row["run_dirs"])]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _baseline_cells(row: dict, holm_shown: bool) -> list[str]:
    holm_cell = [_p(row["baseline_p_holm"]) if row["baseline_p"] is not None else ""] * holm_shown
    if row["baseline_note"] == "baseline":
        return ["baseline", "", "", *holm_cell, ""]
    diff = "-" if row["baseline_diff"] is None else f"{row['baseline_diff']:+.4f}"
    if row["baseline_note"]:
        return [diff, "", row["baseline_note"], *holm_cell, ""]
    low, high = row["baseline_ci_low"], row["baseline_ci_high"]
    ci = "-" if low is None else f"[{low:+.4f}, {high:+.4f}]"
    return [diff, ci, _p(row["baseline_p"]), *holm_cell, _fmt(row["seeds_needed"])]


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _x_text(x: str, value: float | None) -> str:
    if value is None:
        return x
    return {"step": f"step {value:.0f}", "tokens": f"{_count(value)} tokens", "flops": f"{_count(value)}FLOP",
            "time": _duration(value)}[x]


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
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


def write_outputs(rows: list[dict], curves: list[Curve], out_dir: Path, x: str = "step", logx: bool = False,
                  logy: bool = False) -> None:
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
            plot_overlay(curves, png_tmp, title=f"training loss: {out_dir.name}", x=x, logx=logx, logy=logy)
    except OSError as e:
        raise CompareError(f"cannot write compare.csv, compare.json, compare.png to {out_dir} ({e.strerror}); "
                           f"pass --out DIR with a dir you can write") from None


@command
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m gpt_exp.compare", description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="sweep dirs, run dirs or globs")
    parser.add_argument("--metric", help=f"sort key, ascending, and what --baseline/--target test: "
                        f"{', '.join(METRICS)} or a key; default: final_val_loss when every run has a val loss, "
                        f"else final_loss")
    parser.add_argument("--x", choices=AXES, help="the plot's x axis and where loss_at_x compares the runs: step, "
                        "tokens, flops (training FLOPs) or time (wall seconds); default: tokens when the runs differ "
                        "in tokens per step, else step")
    parser.add_argument("--smooth", type=int, default=1, help="average the loss over the last N logged steps (for "
                        "every run the same x width: N steps of the run with the most x per step)")
    parser.add_argument("--baseline", action="append", metavar="KEY=VALUE",
                        help="test every configuration against this one (Welch's t-test over seeds), e.g. "
                        "optim.lr=0.001; repeat to pick one of several matches")
    parser.add_argument("--effect", type=float, metavar="D", help="with --baseline: size the seeds per side for a "
                        "difference of D in the metric (default: the observed difference, post hoc)")
    parser.add_argument("--target", type=float, metavar="L", help="test each mean to be below the loss L; the tokens "
                        "and time at which the smoothed loss first reached it")
    parser.add_argument("--logx", action="store_true", help="log-scale x axis")
    parser.add_argument("--logy", action="store_true", help="log-scale loss axis")
    parser.add_argument("--out", type=Path, help="where to write compare.{csv,json,png}")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        raise CompareError(f"--smooth {args.smooth} must be at least 1 (1 means no smoothing)")
    if args.target is not None and not math.isfinite(args.target):
        raise CompareError(f"--target {args.target} must be a finite loss, e.g. --target 3.5")
    if args.effect is not None and not (math.isfinite(args.effect) and args.effect > 0):
        raise CompareError(f"--effect {args.effect} must be a positive difference in the metric, e.g. --effect 0.02")
    if args.effect is not None and not args.baseline:
        raise CompareError("--effect sizes the seeds of --baseline's test; add --baseline KEY=VALUE")
    try:
        runs = load_runs(args.paths)
        x, metric = args.x or default_x(runs), args.metric or default_metric(runs)
        rows = compare_table(runs, metric, x, args.smooth, args.baseline or [], args.target, args.effect)
        out_dir = args.out or default_out_dir(args.paths, runs)
        curves = loss_curves(runs, args.smooth, x, best=best_run(rows, metric))
        notes = log_scale_notes(curves, x, args.logx, args.logy)
        write_outputs(rows, curves, out_dir, x, args.logx, args.logy)
    except OSError as e:  # run files that cannot be read (a dir in a file's place, permissions)
        if e.filename is None:
            raise
        raise CompareError(f"cannot read {e.filename} ({e.strerror}); check the path and its permissions") from None
    print(format_table(rows, out_dir, metric))
    if args.metric is None:
        print(f"sorted by {metric}" + (" (every run has a val loss; --metric final_loss for the last training batch's)"
                                       if metric == "final_val_loss" else "; --metric KEY sorts by another"))
    if any(row["n"] > 1 and row["data_varies"] == "no" for row in rows):
        notes.append("seeds share the data order (data.order=sequential: every seed reads the same batches), so the "
                     "spread over seeds and the tests measure the init's variance alone; data.order=shuffled gives "
                     "each seed its own order")
    for note in notes:
        print(note)
    print(f"wrote compare.csv, compare.json, compare.png to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
