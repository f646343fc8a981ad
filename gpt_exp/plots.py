"""Loss-curve plots written as PNG: a run's loss.png and compare's overlay, each with an lr panel below the loss.
matplotlib is imported here only, when a plot is actually drawn."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_exp.atomic import atomic_path

AXIS_LABELS = {"step": "step", "tokens": "tokens", "flops": "training FLOPs", "time": "wall time"}


@dataclass
class Curve:
    """One configuration in the overlay: its training loss (a seed group's mean) against x, and what goes beside it."""

    label: str
    x: np.ndarray
    loss: np.ndarray
    std: np.ndarray | None = None  # a seed group's ±std band
    lr: np.ndarray | None = None  # on the same x
    val_x: np.ndarray | None = None
    val_loss: np.ndarray | None = None
    best: bool = False


def trailing_mean(x: np.ndarray, y: np.ndarray, span: float) -> np.ndarray:
    """At each point, the mean of the values whose x (non-decreasing) lies in (x - span, x]: fewer at the start, so
    the curve keeps its points. A window of equal width in x smooths runs that log at different x spacings (batch
    sizes) over the same amount of training; equal counts of steps would make the larger batch's curve lag."""
    if span <= 0 or len(y) == 0:
        return y
    sums = np.cumsum(np.insert(np.asarray(y, dtype=float), 0, 0.0))
    ends = np.arange(1, len(y) + 1)
    starts = np.searchsorted(x, np.asarray(x) - span, side="right")
    return (sums[ends] - sums[starts]) / (ends - starts)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start), so the curve keeps its steps."""
    return trailing_mean(np.arange(len(values), dtype=float), values, window if window > 1 else 0)


def robust_ylim(values: np.ndarray, logy: bool = False) -> tuple[float, float] | None:
    """y limits that show the curves, not their outliers: from the lowest value up to a little above the 99th
    percentile (given 20 points or more), so that one loss spike or the first steps' loss of ~11 does not flatten
    the part of the curves that differs."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)] if logy else v[np.isfinite(v)]
    if not len(v):
        return None
    if logy:
        v = np.log10(v)
    lo, hi = float(v.min()), float(v.max())
    if len(v) >= 20:
        p1, p99 = np.percentile(v, [1, 99])
        hi = min(hi, float(p99 + 0.25 * (p99 - p1)))
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 0.5
    lo, hi = lo - pad, hi + pad
    return (10**lo, 10**hi) if logy else (lo, hi)


def _pyplot():
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice is not ours to show
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _time_unit(seconds: float) -> tuple[float, str]:
    """(divisor, unit) that keeps wall-time ticks readable."""
    return (3600.0, "h") if seconds >= 7200 else (60.0, "min") if seconds >= 120 else (1.0, "s")


def _label_x(ax, x: str, scale_unit: str = "") -> None:
    """The x label of axis kind `x`; token and FLOP counts get SI suffixes (1.5M, 3.2G)."""
    from matplotlib.ticker import EngFormatter

    ax.set_xlabel(f"{AXIS_LABELS[x]} ({scale_unit})" if scale_unit else AXIS_LABELS[x])
    if x in ("tokens", "flops"):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _train_rows(rows: list[dict]) -> list[dict]:
    """Training rows by step; a resumed run logs the steps after its checkpoint again and the later row counts."""
    return sorted({r["step"]: r for r in rows if "loss" in r}.values(), key=lambda r: r["step"])


def plot_loss_curve(rows: list[dict], path: Path, title: str) -> None:
    """A run's loss.png (loss_figure)."""
    fig = loss_figure(rows, title)
    try:
        _save(fig, path)
    finally:
        _pyplot().close(fig)


def loss_figure(rows: list[dict], title: str):
    """A run's metrics.jsonl rows drawn: the training loss raw (thin) and smoothed, the val loss (dashed), the lr
    below; x is tokens when every row has them, else step."""
    plt = _pyplot()
    train = _train_rows(rows)
    steps = np.array([r["step"] for r in train], dtype=float)
    loss = np.array([r["loss"] for r in train], dtype=float)
    by_tokens = bool(train) and all("tokens" in r for r in train)
    x = np.array([r["tokens"] for r in train], dtype=float) if by_tokens else steps
    val = sorted({r["step"]: r for r in rows if "val_loss" in r}.values(), key=lambda r: r["step"])
    val_x = np.interp([r["step"] for r in val], steps, x) if len(steps) else np.array([r["step"] for r in val])
    val_loss = np.array([r["val_loss"] for r in val], dtype=float)
    has_lr = bool(train) and all("lr" in r for r in train)

    fig, axes = plt.subplots(2 if has_lr else 1, 1, sharex=True, figsize=(8, 6 if has_lr else 4.5), dpi=100,
                             height_ratios=[3, 1] if has_lr else None, layout="constrained", squeeze=False)
    ax = axes[0, 0]
    window = int(np.clip(len(loss) // 50, 1, 100))  # ~50 independent points over the run
    ax.plot(x, loss, color="C0", linewidth=0.6, alpha=0.35 if window > 1 else 1.0, label="train loss")
    if window > 1:
        ax.plot(x, moving_average(loss, window), color="C0", linewidth=1.6, label=f"train loss, mean of {window} steps")
    if len(val):
        ax.plot(val_x, val_loss, "o--", color="C0", markersize=3, linewidth=1.2, label="val loss")
    if (ylim := robust_ylim(np.concatenate([loss, val_loss]))) is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel("loss")
    if len(val) and all("val_bpb" in r for r in val) and val[-1]["val_loss"] > 0:
        # the same val batches every time: bits per byte is the val loss times one number, read on a right axis
        k = val[-1]["val_bpb"] / val[-1]["val_loss"]
        ax.secondary_yaxis("right", functions=(lambda y: y * k, lambda y: y / k)).set_ylabel("val bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper right")
    if has_lr:
        axes[1, 0].plot(x, [r["lr"] for r in train], color="C0", linewidth=1.2)
        axes[1, 0].set_ylabel("lr")
        axes[1, 0].grid(alpha=0.3)
    _label_x(axes[-1, 0], "tokens" if by_tokens else "step")
    return fig


def plot_overlay(curves: list[Curve], path: Path, title: str, x: str = "step", logx: bool = False,
                 logy: bool = False) -> None:
    """compare.png (overlay_figure)."""
    fig = overlay_figure(curves, title, x, logx, logy)
    try:
        _save(fig, path)
    finally:
        _pyplot().close(fig)


def overlay_figure(curves: list[Curve], title: str, x: str = "step", logx: bool = False, logy: bool = False):
    """One line per configuration (a ±std band for a seed group; thicker for the best), its val loss dashed in the
    same colour, the lr in a panel below, and the legend under the plot so that many configurations keep its width."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    has_lr = any(c.lr is not None for c in curves)
    has_val = any(c.val_x is not None and len(c.val_x) for c in curves)
    longest = max((len(c.label) for c in curves), default=1)
    ncols = max(1, min(4, 110 // (longest + 6)))
    legend_rows = -(-(len(curves) + has_val) // ncols)
    height = (6.0 if has_lr else 4.5) + 0.25 * legend_rows
    fig, axes = plt.subplots(2 if has_lr else 1, 1, sharex=True, figsize=(9, height), dpi=100, layout="constrained",
                             height_ratios=[3, 1] if has_lr else None, squeeze=False)
    ax = axes[0, 0]
    divisor, unit = _time_unit(max((float(np.max(c.x)) for c in curves if len(c.x)), default=0.0))
    divisor, unit = (divisor, unit) if x == "time" else (1.0, "")

    def shown(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x in its unit, and which points the axes can show (a log axis cannot show 0 or below)."""
        xs, ys = np.asarray(xs, dtype=float) / divisor, np.asarray(ys, dtype=float)
        return xs, ((xs > 0) | (not logx)) & ((ys > 0) | (not logy))

    plotted = []
    for c in curves:
        xs, keep = shown(c.x, c.loss)
        y = np.asarray(c.loss, dtype=float)
        (line,) = ax.plot(xs[keep], y[keep], label=c.label, linewidth=2.6 if c.best else 1.2, zorder=3 if c.best else 2)
        plotted.append(y[keep])
        if c.std is not None:
            s = np.asarray(c.std, dtype=float)[keep]
            ax.fill_between(xs[keep], y[keep] - s, y[keep] + s, color=line.get_color(), alpha=0.2, linewidth=0)
        if c.val_x is not None and len(c.val_x):
            vx, vkeep = shown(c.val_x, c.val_loss)
            vy = np.asarray(c.val_loss, dtype=float)[vkeep]
            ax.plot(vx[vkeep], vy, "--", color=line.get_color(), linewidth=2.0 if c.best else 1.2)
            plotted.append(vy)
        if c.lr is not None:
            axes[1, 0].plot(xs[keep], np.asarray(c.lr, dtype=float)[keep], color=line.get_color(), linewidth=1.2)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if plotted and (ylim := robust_ylim(np.concatenate(plotted), logy)) is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel("training loss" + (" (val dashed)" if has_val else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if has_lr:
        axes[1, 0].set_ylabel("lr")
        axes[1, 0].grid(alpha=0.3)
    _label_x(axes[-1, 0], x, unit)
    if curves:
        handles, labels = ax.get_legend_handles_labels()
        if has_val:
            handles.append(Line2D([], [], color="grey", linestyle="--"))
            labels.append("val loss")
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)
    return fig
