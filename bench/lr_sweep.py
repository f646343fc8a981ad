"""What the lr-transfer benchmarks share (bench/mup_transfer.py across widths, bench/depth_transfer.py across depths):
a run as `python -m gpt_exp.run` builds it, scored by its final val loss; each cell's mean and std over the seeds,
each size's best lr (the grid's, and a parabola's in ln lr with a bootstrap interval over the seeds), the table and
the plot; and the sweep itself: runs in worker processes, each appended to a JSON-lines log as it finishes, so that a
killed sweep started again trains only what is missing. A run is a dict with "parametrization", the size `key`
("width" or "depth"), "lr", "seed" and "val_loss" (NaN: diverged).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from pathlib import Path

import numpy as np

from gpt_exp.scaling import CI, parabola_vertex

PARAMETRIZATIONS = ("sp", "mup", "completep")


class FinalEval:
    """A tracker that keeps the last val loss (the Trainer evaluates at the end) and nothing else."""

    wandb_id, elapsed_s, val_loss = None, 0.0, float("nan")

    def log_eval(self, step: int, val_loss: float, val_bpb: float, by_source: dict | None = None) -> None:
        self.val_loss = val_loss

    def log_step(self, m) -> None: ...
    def log_skip(self, step: int, reason: str) -> None: ...
    def log_samples(self, step: int, samples: list[dict]) -> None: ...
    def log_hellaswag(self, step: int, scores: dict) -> None: ...
    def log_core(self, step: int, scores: dict) -> None: ...


def train(args: list[str], fixed: int = 0) -> float:
    """The final val loss of the run that the `python -m gpt_exp.run` arguments `args` describe, trained in this
    process; NaN if it diverged. `fixed`: how many leading arguments to leave out when naming an interrupted run."""
    from gpt_exp.cli import compose_run_config  # torch and Hydra load only where a run trains
    from gpt_exp.device import resolve_runtime
    from gpt_exp.errors import Diverged
    from gpt_exp.trainer import Trainer

    cfg = compose_run_config(args)
    tracker = FinalEval()
    try:
        status = Trainer(cfg, resolve_runtime(cfg.device)).fit(tracker)
    except Diverged:
        return float("nan")
    if status == "interrupted":  # Ctrl-C or SIGTERM: the sweep stops, rather than scoring a cut-short run
        raise SystemExit(f"interrupted during {' '.join(args[fixed:])}; nothing written")
    return tracker.val_loss


def load_runs(path: Path) -> list[dict]:
    """The runs recorded so far; a line cut short by a kill is skipped (its run trains again)."""
    runs = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


def resume_sweep(planned: list[dict], keys: tuple[str, ...], jobs: int, log: Path, train_one: Callable[[dict], float],
                 describe: Callable[[dict], str]) -> int:
    """Train the `planned` runs that `log` does not hold yet (a run is known by its `keys`), `jobs` at a time in
    worker processes, each recorded as its `keys`, "val_loss" (`train_one`'s) and "wall_s"; the failures' count.
    `train_one` must be a module-level function (workers pickle it)."""
    done = {tuple(r[k] for k in keys) for r in load_runs(log)}
    todo = [run for run in planned if tuple(run[k] for k in keys) not in done]
    print(f"{len(todo)} runs to train ({len(done)} already in {log}), {jobs} at a time", flush=True)
    return sweep(todo, jobs, log, partial(_timed, train_one, keys), describe)


def _timed(train_one: Callable[[dict], float], keys: tuple[str, ...], run: dict) -> dict:
    """A worker's job: the run's record, its val loss and its wall time."""
    start = time.time()
    loss = train_one(run)
    return {**{k: run[k] for k in keys}, "val_loss": loss, "wall_s": round(time.time() - start, 1)}


def one_setup(runs: list[dict], settings: tuple[str, ...], where: str) -> None:
    """Refuse runs that differ in any of `settings`: a cell's mean over two setups is neither's."""
    for setting in settings:
        values = {r.get(setting) for r in runs}
        if len(values) > 1:
            raise SystemExit(f"error: the runs in {where} differ in {setting} ({sorted(values, key=str)}); "
                             f"give each setup its own --out")


def sweep(todo: list[dict], jobs: int, log: Path, run: Callable[[dict], dict], describe: Callable[[dict], str]) -> int:
    """`run` each of `todo` in `jobs` worker processes, appending each result (a dict with "val_loss" and "wall_s")
    to the JSON-lines `log` as it finishes; the failures' count. A run that fails is reported and left out (a rerun
    tries it again); it does not stop the others. `run` must be picklable (workers receive it)."""
    start, failed = time.time(), 0
    if log.exists() and log.stat().st_size and not log.read_bytes().endswith(b"\n"):
        with log.open("a") as f:  # a kill mid-write left a cut line: end it, or the next record would join it
            f.write("\n")
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run, planned): planned for planned in todo}
        for done, future in enumerate(as_completed(futures), 1):
            name = describe(futures[future])
            try:
                result = future.result()
            except Exception as e:  # noqa: BLE001 - one failed run must not take the sweep down
                failed += 1
                print(f"error: {name} failed ({type(e).__name__}: {e}); it is not recorded", flush=True)
                continue
            with log.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"[{time.time() - start:6.0f}s] {done}/{len(todo)} {name}: {result['val_loss']:.4f} "
                  f"({result['wall_s']:.0f} s)", flush=True)
    return failed


def cells(runs: list[dict], key: str) -> list[dict]:
    """One row per (parametrization, size, lr): the mean and std of its seeds' val losses (NaN if any diverged)."""
    out = []
    for par, size, lr in sorted({(r["parametrization"], r[key], r["lr"]) for r in runs},
                                key=lambda c: (PARAMETRIZATIONS.index(c[0]), c[1], c[2])):
        losses = [r["val_loss"] for r in runs if (r["parametrization"], r[key], r["lr"]) == (par, size, lr)]
        out.append({"parametrization": par, key: size, "lr": lr, "val_loss": float(np.mean(losses)),
                    "std": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0, "seeds": len(losses)})
    return out


def best_lrs(mean: list[dict], parametrization: str, key: str) -> dict[int, float]:
    """{size: the grid lr of the lowest mean loss}, NaN where every lr diverged."""
    best = {}
    for size in sorted({r[key] for r in mean}):
        scored = [r for r in mean if r["parametrization"] == parametrization and r[key] == size
                  and math.isfinite(r["val_loss"])]
        best[size] = min(scored, key=lambda r: r["val_loss"])["lr"] if scored else float("nan")
    return best


def lr_vertex(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """The lr at the lowest point of the parabola in ln lr through the grid's best lr and its two neighbours; None
    when the best is at the grid's edge (the grid does not bracket it) or a neighbour diverged."""
    i = int(np.nanargmin(losses)) if np.isfinite(losses).any() else 0
    if not 0 < i < len(lrs) - 1 or not np.isfinite(losses[i - 1: i + 2]).all():
        return None
    vertex = parabola_vertex(np.log(lrs[i - 1: i + 2]), losses[i - 1: i + 2])
    return math.exp(vertex[0]) if vertex else None


def best_lr_interval(runs: list[dict], parametrization: str, key: str, size: int, resamples: int = 1000,
                     seed: int = 0) -> dict:
    """The parabola's best lr of the seeds' mean curve, and a 95% interval: the same over `resamples` draws of the
    seeds with replacement (a seed's runs share its batches, so they are drawn together). Only seeds trained at every
    lr of the size count: one added later at a single lr would make each lr's mean one of different batch orders.
    `bracketed` is the share of draws whose best lr lies inside the grid; with one seed the interval is the point."""
    mine = [r for r in runs if r["parametrization"] == parametrization and r[key] == size]
    lrs = np.array(sorted({r["lr"] for r in mine}))
    seeds = sorted(s for s in {r["seed"] for r in mine} if len({r["lr"] for r in mine if r["seed"] == s}) == len(lrs))
    mine = [r for r in mine if r["seed"] in seeds]
    table = np.full((len(seeds), len(lrs)), np.nan)  # seed x lr
    for r in mine:
        table[seeds.index(r["seed"]), int(np.searchsorted(lrs, r["lr"]))] = r["val_loss"]
    rng = np.random.default_rng(seed)
    draws = [lr_vertex(lrs, table[rng.integers(0, len(seeds), len(seeds))].mean(axis=0))
             for _ in range(resamples if len(seeds) > 1 else 0)]
    inside = [d for d in draws if d is not None]
    low, high = np.percentile(inside, CI) if inside else (float("nan"), float("nan"))
    best = lr_vertex(lrs, table.mean(axis=0))
    if len(seeds) == 1:
        low = high = best if best is not None else float("nan")
    return {"lr": best if best is not None else float("nan"), "low": float(low), "high": float(high),
            "bracketed": len(inside) / len(draws) if draws else float(best is not None)}


def best_lr_line(parametrization: str, key: str, grid: dict, fitted: dict) -> str:
    """One line: each size's best lr on the grid, then the parabola's with its interval (or why there is none)."""
    return (f"{parametrization}: best lr per {key} on the grid {grid}; parabola in ln lr (95% interval over seeds): "
            + (", ".join(f"{size}: {f['lr']:.3g} [{f['low']:.3g}, {f['high']:.3g}]" if math.isfinite(f["lr"])
                         else f"{size}: not bracketed" for size, f in fitted.items()) or f"no {key} has 3 lrs"))


def print_table(mean: list[dict], key: str) -> None:
    """Each lr's mean ± std of the val loss, a column per (parametrization, size)."""
    columns = sorted({(r["parametrization"], r[key]) for r in mean}, key=lambda c: (PARAMETRIZATIONS.index(c[0]), c[1]))
    print(f"{'lr':>8} " + " ".join(f"{f'{p}@{s}':>15}" for p, s in columns))
    for lr in sorted({r["lr"] for r in mean}):
        row = {(r["parametrization"], r[key]): r for r in mean if r["lr"] == lr}
        print(f"{lr:>8g} " + " ".join(f"{row[c]['val_loss']:7.4f} ± {row[c]['std']:5.3f}" if c in row else " " * 15
                                      for c in columns))


def plot(mean: list[dict], path: Path, key: str, label: str) -> None:
    """A panel per parametrization: the mean val loss (± std over the seeds) against the lr, a curve per size."""
    import matplotlib  # a plotting backend is only needed for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [p for p in PARAMETRIZATIONS if any(r["parametrization"] == p for r in mean)]
    fig, axes = plt.subplots(1, len(params), figsize=(5 * len(params), 3.8), sharey=True, squeeze=False)
    for ax, par in zip(axes[0], params):
        for size in sorted({r[key] for r in mean}):
            pts = sorted((r["lr"], r["val_loss"], r["std"]) for r in mean if r["parametrization"] == par
                         and r[key] == size)
            if pts:
                lrs, losses, stds = zip(*pts)
                ax.errorbar(lrs, losses, yerr=stds, marker="o", capsize=2, label=f"{label}={size}")
        ax.set_xscale("log")
        ax.set_title(par)
        ax.set_xlabel("lr")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out loss (mean ± std of seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
