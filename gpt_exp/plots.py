"""Loss-curve plots written as PNG. matplotlib is imported here only, when a plot is actually drawn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from gpt_exp.atomic import atomic_path


def plot_loss_curve(rows: list[dict], path: Path, title: str) -> None:
    """Training loss (and val_loss rows, when present) against step."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice is not ours to show
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    train = [r for r in rows if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1.2)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_overlay(
    curves: list[tuple[str, Sequence[float], Sequence[float], Sequence[float] | None]],
    path: Path,
    title: str,
    logx: bool = False,
) -> None:
    """One line per (label, steps, loss, std) curve, with a ±std band where std is given (a group of seeds)."""
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache notice is not ours to show
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    for label, steps, loss, std in curves:
        x, y = np.asarray(steps, dtype=float), np.asarray(loss, dtype=float)
        keep = x > 0 if logx else np.ones(len(x), dtype=bool)  # a log axis cannot show step 0
        (line,) = ax.plot(x[keep], y[keep], label=label, linewidth=1.2)
        if std is not None:
            s = np.asarray(std, dtype=float)[keep]
            ax.fill_between(x[keep], y[keep] - s, y[keep] + s, color=line.get_color(), alpha=0.2, linewidth=0)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
