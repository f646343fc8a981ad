"""Scaling laws from a grid of runs: IsoFLOP profiles and the parametric loss L(N, D) = E + A/N^alpha + B/D^beta,
fitted as Hoffmann et al. 2022 (Chinchilla) do in their approaches 2 and 3, with bootstrap confidence intervals.

N is the non-embedding parameter count (Kaplan et al. 2020's; --params total for Chinchilla's count, embeddings
included), from the run's shape as gpt_exp/shapes.py counts it; D the tokens trained (summary.json); C = D x
flops_per_token, the training FLOPs as MFU counts them (6 per matmul weight + the attention scores), not 6ND.
The runs may differ in shape, budget and seed only: runs that differ in anything else are refused, naming the keys.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber
from tqdm import tqdm

from gpt_exp.atomic import atomic_path
from gpt_exp.compare import short_value, varying_keys
from gpt_exp.cli import ArgumentParser, command
from gpt_exp.errors import UserError
from gpt_exp.plots import _pyplot, _save
from gpt_exp.run_reader import SHAPE_KEYS, RunRecord, architecture, default_out_dir, load_runs
from gpt_exp.shapes import flops_per_token, param_counts

METRICS = ("final_loss", "final_val_loss")
PARAM_COUNTS = ("non_embedding", "total")
HUBER_DELTA = 1e-3  # Chinchilla's: on ln L, residuals beyond 0.1% count linearly, so outliers pull little
BUDGET_SPREAD = 1.2  # runs whose C lie within this factor of a budget's smallest run share the budget
MIN_SHAPES, MIN_BUDGETS, MIN_RUNS = 3, 2, 5  # a parabola, a power law across budgets, the parametric fit's 5 constants
# Starts of the parametric fit, a coarser copy of Chinchilla's grid (a, b in 0..25, e in -1..1, alpha, beta in
# 0..2): on synthetic grids over 80% of its starts reach the best optimum, so 72 starts find it with room to spare.
STARTS = np.array(list(itertools.product([0.0, 10.0, 20.0], [0.0, 10.0, 20.0], [-1.0, 1.0], [0.1, 0.5], [0.1, 0.5])))
BOOTSTRAP_STARTS = 1  # a random grid start per resample, besides the fit to all runs (its nearest optimum)
CI = (2.5, 97.5)  # percentiles of the bootstrap: a 95% interval
MIN_CI_SAMPLES = 50  # fewer samples put a 95% interval's ends on one or two of them


class ScalingError(UserError):
    """A problem with the user's input, printed as one line by the CLI."""


# --- what a run is: its shape, N, D, C and loss ----------------------------------------------------------------------

@dataclass
class Point:
    """One finished run as the fits see it."""

    path: Path
    n_layer: int
    n_embd: int
    non_embedding: int
    total: int
    params: int  # the N of the fits: non_embedding or total
    tokens: int  # D
    flops_per_token: float
    flops: float  # C = D x flops_per_token
    loss: float
    epochs: float | None = None  # D / the training split's tokens: > 1 means D counts repeated tokens


# What a grid varies: the shape, the budget (and, repeated, the seed). Everything else (data, optimizer, lr,
# parametrization, init_from, batch size, ...) must be one setting, or the fits would read its effect as scaling.
GRID_KEYS = ("model.name", "model.n_layer", "model.n_head", "model.n_embd", "train.max_tokens", "train.max_steps",
             "train.seed")


def one_setting(runs: list[RunRecord]) -> None:
    """Refuse runs that differ in more than their shape and budget (compare's bookkeeping keys aside), naming what
    differs: one law through two settings' runs is neither's."""
    differing = [key for key in varying_keys(runs) if key not in GRID_KEYS]
    if differing:
        seen = "; ".join(f"{key}: " + ", ".join(sorted({short_value(r.params.get(key)) for r in runs})[:4])
                         for key in differing[:4])
        raise ScalingError(f"the runs differ in more than shape and budget ({seen}); a scaling law is fitted to one "
                           f"setting of everything else: pass the runs of each setting separately")


def to_point(run: RunRecord, metric: str, params: str) -> Point | str:
    """The run as a Point, or why it is skipped (failed, still running, no such loss or one <= 0)."""
    shape = {key: run.params.get(key) for key in SHAPE_KEYS}
    for key, value in shape.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ScalingError(f"{run.path} is not a gpt_exp run ({key}={value!r} in .hydra/config.yaml, where a "
                               f"positive integer belongs); pass run or sweep dirs of python -m gpt_exp.run")
    if run.status != "completed":
        return f"{run.status}"
    loss = getattr(run, metric)
    if loss is None or not math.isfinite(loss):
        return "no val loss" if metric == "final_val_loss" else f"no {metric}"
    if loss <= 0:  # a cross-entropy is positive; the fits take its log
        return f"{metric} <= 0, which ln L cannot take"
    if not run.tokens:
        return "no tokens in summary.json"
    L, C, V, block, T = (shape[key] for key in SHAPE_KEYS)
    arch = architecture(run.params)  # rope, SwiGLU, GQA, an untied readout, ... count differently
    non_embedding, total = param_counts(L, C, V, block, **arch)
    flops = float(run.curve_flops[-1]) if run.curve_flops is not None and len(run.curve_flops) else 0.0
    if flops <= 0:  # runs made before rows and summaries had FLOPs: the same formula
        flops = float(run.tokens * flops_per_token(L, C, V, block, T, **arch))
    return Point(path=run.path, n_layer=L, n_embd=C, non_embedding=non_embedding, total=total,
                 params=non_embedding if params == "non_embedding" else total, tokens=int(run.tokens),
                 flops_per_token=flops / run.tokens, flops=flops, loss=float(loss),
                 epochs=run.tokens / run.train_split_tokens if run.train_split_tokens else None)


def split_points(runs: list[RunRecord], metric: str, params: str) -> tuple[list[Point], list[tuple[Path, str]]]:
    """The runs that finished with a `metric`, and (run dir, why) for those skipped."""
    points, skipped = [], []
    for run in runs:
        point = to_point(run, metric, params)
        if isinstance(point, Point):
            points.append(point)
        else:
            skipped.append((run.path, point))
    return points, skipped


def group_budgets(points: list[Point]) -> list[list[Point]]:
    """Runs of one compute budget together, smallest budget first. A grid's runs miss their budget by up to half a
    step of tokens (more for a hand-made grid), so runs within BUDGET_SPREAD of a budget's smallest C share it."""
    budgets: list[list[Point]] = []
    for point in sorted(points, key=lambda p: p.flops):
        if budgets and point.flops <= budgets[-1][0].flops * BUDGET_SPREAD:
            budgets[-1].append(point)
        else:
            budgets.append([point])
    return budgets


def budget_flops(runs: list[Point]) -> float:
    return float(np.exp(np.mean(np.log([p.flops for p in runs]))))


# --- approach 2: IsoFLOP profiles ----------------------------------------------------------------------------------

def parabola_vertex(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """(x, y) at the lowest point of the least-squares parabola y(x); None when it has no lowest point (it opens
    downward or is a line) or x has fewer than 3 distinct values."""
    if len(np.unique(x)) < 3:
        return None
    c2, c1, c0 = np.polyfit(x, y, 2)
    if not c2 > 0:
        return None
    return float(-c1 / (2 * c2)), float(c0 - c1**2 / (4 * c2))


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of y = coefficient * x^exponent, least squares in log-log."""
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return float(exponent), _exp(float(log_coefficient))


@dataclass
class Profile:
    """One budget's IsoFLOP profile: the loss against ln N (and ln D) and its parabolas' lowest points."""

    flops: float
    runs: list[Point]
    n_opt: float | None  # None: no minimum (loss falls or rises across the shapes without turning)
    d_opt: float | None
    loss_opt: float | None
    parabola: np.ndarray | None  # coefficients of loss in ln N, for the plot

    @property
    def shapes(self) -> int:
        return len({p.params for p in self.runs})

    @property
    def lowest_at(self) -> str | None:
        """'smallest' or 'largest' when the lowest loss was the smallest or the largest shape's: the grid did not
        reach the optimum on that side."""
        best = min(self.runs, key=lambda p: p.loss).params
        return {min(p.params for p in self.runs): "smallest", max(p.params for p in self.runs): "largest"}.get(best)

    @property
    def extrapolated(self) -> bool:
        """The parabola's lowest point lies outside the shapes run: the grid did not bracket it, and a vertex far
        outside is the curvature of noise (a real grid put one at N = 1e-6), so the power laws leave it out."""
        return self.n_opt is not None and not inside(self.n_opt, self.runs)

    @property
    def bracketed(self) -> bool:
        return self.n_opt is not None and not self.extrapolated


def inside(n: float, runs: list[Point]) -> bool:
    return min(p.params for p in runs) <= n <= max(p.params for p in runs)


def vertices(runs: list[Point]) -> tuple[float, float, float] | None:
    """(N_opt, D_opt, loss there) of a budget's runs: the lowest points of the loss's parabolas in ln N and in ln D."""
    loss = np.array([p.loss for p in runs])
    by_n = parabola_vertex(np.log([p.params for p in runs]), loss)
    by_d = parabola_vertex(np.log([p.tokens for p in runs]), loss)
    if by_n is None or by_d is None:
        return None
    return math.exp(by_n[0]), math.exp(by_d[0]), by_n[1]


def profile(runs: list[Point]) -> Profile:
    found = vertices(runs) if len({p.params for p in runs}) >= MIN_SHAPES else None
    coefficients = np.polyfit(np.log([p.params for p in runs]), [p.loss for p in runs], 2) if found else None
    n_opt, d_opt, loss_opt = found or (None, None, None)
    return Profile(budget_flops(runs), runs, n_opt, d_opt, loss_opt, coefficients)


def frontier(flops: np.ndarray, n_opt: np.ndarray, d_opt: np.ndarray) -> dict[str, float]:
    """N_opt = k_n C^a and D_opt = k_d C^b across budgets."""
    a, k_n = power_law(flops, n_opt)
    b, k_d = power_law(flops, d_opt)
    return {"a": a, "k_n": k_n, "b": b, "k_d": k_d}


def parabola_fits(profiles: list[Profile]) -> tuple[list[tuple], float, int]:
    """For each budget, (ln N, ln D, the fitted losses of its parabolas in ln N and in ln D), and the noise of the
    losses about the parabolas in ln N: sigma pooled over the budgets and its degrees of freedom (runs - 3 a budget)."""
    fits, squares, dof = [], 0.0, 0
    for p in profiles:
        loss = np.array([r.loss for r in p.runs])
        ln_n, ln_d = np.log([r.params for r in p.runs]), np.log([r.tokens for r in p.runs])
        by_n, by_d = (np.polyval(np.polyfit(x, loss, 2), x) for x in (ln_n, ln_d))
        fits.append((ln_n, ln_d, by_n, by_d))
        squares += float(((loss - by_n) ** 2).sum())
        dof += len(loss) - 3
    return fits, math.sqrt(squares / dof) if dof else math.nan, dof


def frontier_bootstrap(profiles: list[Profile], resamples: int,
                       rng: np.random.Generator) -> tuple[list[dict[str, float]], float, int]:
    """(frontier() of `resamples` simulated grids that have a minimum in every budget, the noise sigma they were
    drawn with, its degrees of freedom). A parametric bootstrap: each run's loss is its budget's fitted parabola plus
    normal noise of the residuals' pooled sigma, itself drawn from its chi-square spread, so that a sigma estimated
    from few residuals widens the interval as a t does. (Resampling the runs under-covers on small grids: 4 runs
    drawn with replacement often hold 3 shapes, whose parabola has no noise left.) A minimum outside the shapes is
    kept, since the noise can put it there; a parabola that opens downward has none, and its grid is left out. No
    residuals (3 shapes a budget): no noise to simulate, no samples."""
    fits, sigma, dof = parabola_fits(profiles)
    if not dof or not resamples:
        return [], sigma, dof
    sigmas = sigma * np.sqrt(dof / rng.chisquare(dof, resamples))
    ln_opt = np.empty((2, resamples, len(profiles)))  # ln N_opt and ln D_opt of each simulated grid's budgets
    kept = np.ones(resamples, dtype=bool)
    for j, (ln_n, ln_d, by_n, by_d) in enumerate(fits):
        noise = rng.normal(size=(resamples, len(ln_n))) * sigmas[:, None]
        for k, (x, fitted) in enumerate(((ln_n, by_n), (ln_d, by_d))):
            c2, c1, _ = np.linalg.lstsq(np.vander(x, 3), (fitted + noise).T, rcond=None)[0]  # all grids at once
            with np.errstate(divide="ignore", invalid="ignore"):
                ln_opt[k, :, j] = -c1 / (2 * c2)
            kept &= (c2 > 0) & (np.abs(ln_opt[k, :, j]) < 700)  # e^700: past any size, and past float's range
    flops = np.array([p.flops for p in profiles])
    samples = [frontier(flops, np.exp(ln_opt[0, i]), np.exp(ln_opt[1, i])) for i in np.flatnonzero(kept)]
    return samples, sigma, dof


# --- approach 3: the parametric loss ---------------------------------------------------------------------------------

@dataclass
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta, fitted as theta = (ln A, ln B, ln E, alpha, beta)."""

    theta: np.ndarray

    @property
    def constants(self) -> dict[str, float]:
        a, b, e, alpha, beta = (float(v) for v in self.theta)
        return {"E": _exp(e), "A": _exp(a), "B": _exp(b), "alpha": alpha, "beta": beta}

    def log_loss(self, ln_n: np.ndarray, ln_d: np.ndarray) -> np.ndarray:
        a, b, e, alpha, beta = self.theta
        return np.logaddexp(np.logaddexp(a - alpha * ln_n, b - beta * ln_d), e)

    def exponents(self, f1: float) -> tuple[float | None, float | None]:
        """(a, b) of N_opt ~ C^a and D_opt ~ C^b that optimum() implies: beta / (alpha + beta f1) and
        alpha / (alpha + beta f1), Chinchilla's beta / (alpha + beta) and alpha / (alpha + beta) at f1 = 1."""
        alpha, beta = float(self.theta[3]), float(self.theta[4])
        if not (alpha > 0 and beta > 0 and f1 > 0):
            return None, None
        return beta / (alpha + beta * f1), alpha / (alpha + beta * f1)

    def optimum(self, flops: float, fpt: tuple[float, float]) -> tuple[float, float] | None:
        """(N, D) of the lowest loss that `flops` buys, with D = C / flops_per_token(N) and flops_per_token(N) =
        exp(f0) N^f1: setting dL/dlnN = 0 gives ln N = (ln(alpha A / (beta f1 B)) + beta (ln C - f0)) /
        (alpha + beta f1); with f0 = ln 6, f1 = 1 (C = 6ND) this is Chinchilla's N_opt = G (C/6)^(beta/(alpha+beta)).
        None when the law has no such minimum (an exponent <= 0)."""
        a, b, _, alpha, beta = self.theta
        f0, f1 = fpt
        if not (alpha > 0 and beta > 0 and f1 > 0):
            return None
        ln_n = (math.log(alpha) + a - math.log(beta * f1) - b + beta * (math.log(flops) - f0)) / (alpha + beta * f1)
        n, d = _exp(ln_n), flops / _exp(f0 + f1 * ln_n)
        return (n, d) if math.isfinite(n) and d > 0 else None


def _exp(x: float) -> float:
    """exp that gives inf past float's range: a bootstrap resample can drive a constant there (its interval then
    leaves it out), and that is not an error."""
    return math.exp(x) if x < 709 else math.inf


def huber_objective(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_loss: np.ndarray):
    """Chinchilla's objective, the Huber loss (delta 1e-3) of ln L(N, D) - ln L, summed, and its gradient; both
    divided by delta, so that the optimizer's tolerances meet numbers of order 1."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)])
    top = terms.max(axis=0)
    parts = np.exp(terms - top)  # log-sum-exp without overflow; parts / their sum are its derivatives
    total = parts.sum(axis=0)
    residual = top + np.log(total) - ln_loss
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA) / total
    w_a, w_b, w_e = slope * parts
    gradient = np.array([w_a.sum(), w_b.sum(), w_e.sum(), -w_a @ ln_n, -w_b @ ln_d])
    return huber(HUBER_DELTA, residual).sum() / HUBER_DELTA, gradient / HUBER_DELTA


def fit_law(ln_n: np.ndarray, ln_d: np.ndarray, ln_loss: np.ndarray, starts: np.ndarray) -> tuple[Law, float]:
    """The lowest objective reached from any of `starts`. BFGS rather than Chinchilla's L-BFGS: with 5 parameters
    the limited memory saves nothing, and scipy's L-BFGS-B calls OpenBLAS on every iteration, which on a busy
    2-core machine took 30-100x longer (0.6 s vs 7-20 ms a fit, with the same optimum)."""
    best = None
    for start in starts:
        result = minimize(huber_objective, start, args=(ln_n, ln_d, ln_loss), jac=True, method="BFGS")
        if np.all(np.isfinite(result.x)) and (best is None or result.fun < best.fun):
            best = result
    return Law(best.x), float(best.fun * HUBER_DELTA)


def law_bootstrap(points: list[Point], law: Law, resamples: int, rng: np.random.Generator) -> list[Law]:
    """The law refitted to runs drawn with replacement, each from the fit to all runs and a few grid starts."""
    ln_n, ln_d, ln_loss = logs(points)
    fits = []
    # ~50 ms a refit: 200 take ~10 s, so a bar on a terminal, a line every 5 s in a log
    tty = sys.stderr.isatty()
    for _ in tqdm(range(resamples), desc="bootstrap refits of L(N, D)", unit="fit", file=sys.stderr, leave=False,
                  mininterval=0.5 if tty else 5, disable=resamples < 20):
        i = rng.integers(0, len(points), len(points))
        starts = np.vstack([law.theta, STARTS[rng.choice(len(STARTS), BOOTSTRAP_STARTS, replace=False)]])
        fits.append(fit_law(ln_n[i], ln_d[i], ln_loss[i], starts)[0])
    return fits


def logs(points: list[Point]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.log([p.params for p in points]), np.log([p.tokens for p in points]),
            np.log([p.loss for p in points]))


def fpt_law(points: list[Point]) -> tuple[float, float]:
    """(f0, f1) of flops_per_token = exp(f0) N^f1 across the runs: how a budget's C turns into tokens at a size N
    between the shapes run (f1 ~ 1 when N counts every matmul weight; far below 1 for tiny models, whose FLOPs
    are mostly the lm_head's, an embedding)."""
    f1, f0 = np.polyfit(np.log([p.params for p in points]), np.log([p.flops_per_token for p in points]), 1)
    return float(f0), float(f1)


# --- the analysis, its report and its files --------------------------------------------------------------------------

def estimate(value: float | None, samples: list[float | None], resamples: int) -> dict:
    """A fitted value with the 95% percentile interval of its bootstrap samples; None where fewer than
    MIN_CI_SAMPLES or than half of the `resamples` drawn gave a finite one (the rest are a tail it would not show)."""
    finite = [s for s in samples if s is not None and math.isfinite(s)]
    enough = len(finite) >= MIN_CI_SAMPLES and 2 * len(finite) >= resamples
    return {"value": value, "ci": [float(v) for v in np.percentile(finite, CI)] if enough else None}


def interval_note(samples: list, resamples: int, dof: int) -> str | None:
    """Why the IsoFLOP power laws have no interval, where they have none although resamples were asked for."""
    if not resamples:
        return None
    if not dof:
        return ("no interval: every budget has 3 shapes, so no residual measures the loss's noise (a 4th shape a "
                "budget gives one)")
    if len(samples) < MIN_CI_SAMPLES or 2 * len(samples) < resamples:
        return (f"no interval: {len(samples)} of {resamples} simulated grids had a minimum in every budget (an "
                f"interval needs >= {MIN_CI_SAMPLES} and at least half); the shapes do not pin the minima down: add "
                f"shapes around them")
    return None


def power_laws(profiles: list[Profile], resamples: int,
               rng: np.random.Generator) -> tuple[dict | None, list[dict], dict]:
    """Approach 2's power laws through the minima of the budgets that bracket one: (the fit, None without two such
    budgets; its bootstrap samples; what scaling.json says of it, intervals and why there are none included)."""
    fitted = [p for p in profiles if p.bracketed]
    front, samples, sigma, dof = None, [], None, 0
    if len(fitted) >= MIN_BUDGETS:
        front = frontier(np.array([p.flops for p in fitted]), np.array([p.n_opt for p in fitted]),
                         np.array([p.d_opt for p in fitted]))
        samples, sigma, dof = frontier_bootstrap(fitted, resamples, rng)
    return front, samples, {
        "budgets": [{"flops": p.flops, "runs": len(p.runs), "n_opt": p.n_opt, "d_opt": p.d_opt,
                     "loss_opt": p.loss_opt, "extrapolated": p.extrapolated, "lowest_at": p.lowest_at}
                    for p in profiles],
        **{key: estimate(front[key] if front else None, [s[key] for s in samples], resamples)
           for key in ("a", "k_n", "b", "k_d")},
        "bootstrap": "parametric: each budget's parabola plus normal noise of the residuals' sigma",
        "noise_sigma": sigma if dof else None, "noise_dof": dof, "bootstrap_fitted": len(samples),
        "interval_note": interval_note(samples, resamples, dof) if front else None,
    }


def power_laws_at(fit: dict | None, budget: float) -> tuple[float | None, float | None]:
    """(N_opt, D_opt) = (k_n C^a, k_d C^b) at C = `budget`; inf where that passes float's range, as a bootstrap
    resample's extreme exponent can (its interval leaves it out)."""
    if not fit:
        return None, None
    return fit["k_n"] * _exp(fit["a"] * math.log(budget)), fit["k_d"] * _exp(fit["b"] * math.log(budget))


def analyse(points: list[Point], budget: float | None, resamples: int, seed: int) -> dict:
    """Both fits, their bootstrap intervals and the compute-optimal N and D at `budget` (default: the largest).
    Budgets whose loss has no minimum are the grid's answer, not a mistake: they are reported, and the power laws
    need two budgets with one."""
    if len(points) < MIN_RUNS:
        raise ScalingError(f"{len(points)} runs with a loss; the parametric fit needs >= {MIN_RUNS} (5 constants): "
                           f"run more shapes or budgets (bench/isoflop_grid.py lays out a grid)")
    profiles = [profile(runs) for runs in group_budgets(points)]
    if sum(p.shapes >= MIN_SHAPES for p in profiles) < MIN_BUDGETS:
        described = "; ".join(f"C={p.flops:.3g}: {p.shapes} shapes" for p in profiles)
        what = "one budget only" if len(profiles) == 1 else (
            f"{sum(p.shapes >= MIN_SHAPES for p in profiles)} of {len(profiles)} budgets with >= {MIN_SHAPES} shapes")
        raise ScalingError(f"{what} ({described}); the IsoFLOP fit needs >= {MIN_BUDGETS} budgets of >= {MIN_SHAPES} "
                           f"shapes each: add budgets or shapes (python bench/isoflop_grid.py --budgets ... --shapes "
                           f"...); runs count as one budget when their C are within {BUDGET_SPREAD}x")
    rng = np.random.default_rng(seed)
    front, front_samples, iso = power_laws(profiles, resamples, rng)
    law, objective = fit_law(*logs(points), STARTS)
    law_samples = law_bootstrap(points, law, resamples, rng)
    fpt = fpt_law(points)
    budget = budget or max(p.flops for p in profiles)

    def frontier_at(fit: dict | None) -> tuple[float | None, float | None]:
        return power_laws_at(fit, budget)

    def law_at(fit: Law) -> tuple[float | None, float | None]:
        return fit.optimum(budget, fpt) or (None, None)

    def at_budget(fit_at, fit, samples) -> dict:
        return {key: estimate(fit_at(fit)[i], [fit_at(s)[i] for s in samples], resamples)
                for i, key in enumerate(("n", "d"))}

    return {
        "isoflop": iso,
        "parametric": {
            **{key: estimate(value, [s.constants[key] for s in law_samples], resamples)
               for key, value in law.constants.items()},
            "huber_delta": HUBER_DELTA, "objective": objective, "starts": len(STARTS),
            "flops_per_token_fit": {"f0": fpt[0], "f1": fpt[1]},
            **{key: estimate(law.exponents(fpt[1])[i], [s.exponents(fpt[1])[i] for s in law_samples], resamples)
               for i, key in enumerate(("a", "b"))},
        },
        "compute_optimal": {
            "flops": budget,
            "isoflop": at_budget(frontier_at, front, front_samples),
            "parametric": at_budget(law_at, law, law_samples),
        },
        "profiles": profiles, "law": law, "fpt": fpt,  # for the plots; left out of scaling.json
    }


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _with_ci(entry: dict) -> str:
    ci = entry["ci"]
    return _num(entry["value"]) + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else "")


def report(result: dict, points: list[Point], skipped: list[tuple[Path, str]], metric: str, params: str,
           resamples: int, out_dir: Path) -> str:
    iso, law, best = result["isoflop"], result["parametric"], result["compute_optimal"]
    lines = [f"{len(points)} runs in {len(iso['budgets'])} budgets. N = {params.replace('_', '-')} parameters, "
             f"D = tokens trained, C = D x flops_per_token (as MFU counts: 6 per matmul weight + attention), "
             f"loss = {metric}; " + (f"[95% CI] from {resamples} bootstrap samples (IsoFLOP: simulated grids, "
                                     f"parametric fit: resampled runs)" if resamples else "no CIs (--bootstrap 0)")]
    if skipped:
        lines.append(f"skipped {len(skipped)}: " + ", ".join(f"{os.path.relpath(path, out_dir)} ({why})"
                                                              for path, why in skipped))
    if repeated := [p.epochs for p in points if p.epochs is not None and p.epochs > 1]:
        lines.append(f"data repeated: {len(repeated)} of {len(points)} runs trained more than one epoch of their "
                     f"training split (up to {max(repeated):.1f}); D counts repeated tokens as new ones, which they "
                     f"are not (Muennighoff et al. 2023): a larger corpus gives a law of compute alone")
    lines += ["", "IsoFLOP profiles (a parabola of the loss in ln N, and in ln D, per budget):"]
    rows = [["C (FLOPs)", "runs", "N run", "N_opt", "D_opt", "loss at N_opt"]]
    for p, entry in zip(result["profiles"], iso["budgets"]):
        n_range = f"{_num(min(r.params for r in p.runs))}-{_num(max(r.params for r in p.runs))}"
        rows.append([f"{p.flops:.3g}", str(len(p.runs)), n_range,
                     _num(p.n_opt) + (" (outside the shapes: not used)" if entry["extrapolated"] else ""),
                     _num(p.d_opt),
                     _num(p.loss_opt) if p.n_opt is not None else
                     "no minimum" + (f": lowest at the {p.lowest_at} N" if p.lowest_at else "")])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if iso["a"]["value"] is not None:
        lines += [f"  N_opt = {_num(iso['k_n']['value'])} C^a, a = {_with_ci(iso['a'])}",
                  f"  D_opt = {_num(iso['k_d']['value'])} C^b, b = {_with_ci(iso['b'])}"
                  + (f"   ({iso['bootstrap_fitted']} of {resamples} simulated grids had a minimum in every budget)"
                     if resamples else "")]
        if iso["interval_note"]:
            lines.append(f"  {iso['interval_note']}")
    else:
        sides = {p.lowest_at for p in result["profiles"] if p.n_opt is None} - {None}
        fix = " or ".join(f"{'smaller' if side == 'smallest' else 'larger'} shapes"
                          for side in sorted(sides, reverse=True))
        lines.append(f"  no power laws: they need a minimum inside the shapes run in >= {MIN_BUDGETS} budgets; the "
                     f"grid does not bracket the compute-optimal N{f' (add {fix})' if fix else ''}")
    lines += ["", f"Parametric fit L(N, D) = E + A/N^alpha + B/D^beta (Huber delta {HUBER_DELTA:g} on ln L, BFGS "
              f"from {law['starts']} starts, {len(points)} runs):"]
    lines += [f"  {key:<5} = {_with_ci(law[key])}" for key in ("E", "A", "B", "alpha", "beta")]
    if law["E"]["value"] < 1e-3 * min(p.loss for p in points):
        lines.append("  (E -> 0: the losses lie far above the irreducible loss, which they do not pin down)")
    f0, f1 = result["fpt"]
    lines += [f"  implied N_opt ~ C^a, a = beta/(alpha + beta f1) = {_with_ci(law['a'])}; D_opt ~ C^b, b = "
              f"alpha/(alpha + beta f1) = {_with_ci(law['b'])}",
              f"  with flops_per_token = {math.exp(f0):.4g} N^{f1:.3g} fitted to the runs (C = 6ND: 6 N^1)", "",
              f"Compute-optimal at C = {best['flops']:.4g} FLOPs:",
              f"  IsoFLOP power laws: N = {_with_ci(best['isoflop']['n'])}, D = {_with_ci(best['isoflop']['d'])}",
              f"  parametric fit:     N = {_with_ci(best['parametric']['n'])}, D = {_with_ci(best['parametric']['d'])}"]
    return "\n".join(lines)


def plot_isoflop(ax, result: dict, colors, n_label: str) -> None:
    """Each budget's runs, its parabola and minimum (only where the shapes bracket it: one far outside would
    stretch the axis over decades nobody ran), and (dashed) the parametric law along the same budget."""
    f0, f1 = result["fpt"]
    for p, color in zip(result["profiles"], colors):
        n = np.array([r.params for r in p.runs])
        ax.scatter(n, [r.loss for r in p.runs], color=color, s=18, label=f"C={p.flops:.3g}")
        lo, hi = np.log(n).min(), np.log(n).max()
        if p.parabola is not None:
            x = np.linspace(lo - 0.1, hi + 0.1, 100)
            ax.plot(np.exp(x), np.polyval(p.parabola, x), color=color, lw=1)
        if p.bracketed:
            ax.scatter([p.n_opt], [p.loss_opt], color=color, marker="*", s=120, edgecolor="black", zorder=3)
        x = np.linspace(lo - 0.1, hi + 0.1, 100)
        ax.plot(np.exp(x), np.exp(result["law"].log_loss(x, math.log(p.flops) - f0 - f1 * x)), color=color, lw=0.8,
                ls="--")
    ax.set_xscale("log")
    ax.set_xlabel(n_label)
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP profiles: parabola and its minimum (*), parametric fit (--)", fontsize=10)
    ax.legend(fontsize=7)


def plot_frontier(axes, result: dict) -> None:
    profiles = [p for p in result["profiles"] if p.bracketed]
    iso, budget = result["isoflop"], result["compute_optimal"]["flops"]
    flops = np.array([p.flops for p in result["profiles"]] + [budget])
    grid = np.geomspace(flops.min() / 2, flops.max() * 2, 50)
    law_points = [result["law"].optimum(c, result["fpt"]) for c in grid]
    runs = [r for p in result["profiles"] for r in p.runs]
    for ax, key, name, coef, exp in ((axes[0], 0, "N_opt", "k_n", "a"), (axes[1], 1, "D_opt", "k_d", "b")):
        ax.scatter([r.flops for r in runs], [r.params if key == 0 else r.tokens for r in runs], color="lightgrey",
                   s=12, label="runs")
        if profiles:
            ax.scatter([p.flops for p in profiles], [p.n_opt if key == 0 else p.d_opt for p in profiles],
                       color="black", zorder=3, label="IsoFLOP minima")
        if iso[exp]["value"] is not None:
            ax.plot(grid, iso[coef]["value"] * grid ** iso[exp]["value"], color="tab:blue",
                    label=f"power law, {exp} = {iso[exp]['value']:.3g}")
        if all(law_points):
            ax.plot(grid, [pt[key] for pt in law_points], color="tab:orange", ls="--",
                    label=f"parametric fit, {exp} = {result['parametric'][exp]['value']:.3g}")
        ax.axvline(budget, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C (training FLOPs)")
        ax.set_ylabel(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_title("compute-optimal frontier")


def plot_residuals(axes, points: list[Point], result: dict, colors_by_budget: dict, n_label: str) -> None:
    ln_n, ln_d, ln_loss = logs(points)
    residual = ln_loss - result["law"].log_loss(ln_n, ln_d)
    colors = [colors_by_budget[id(p)] for p in points]
    for ax, x, name in ((axes[0], np.exp(ln_n), n_label), (axes[1], np.exp(ln_d), "D (tokens)")):
        ax.scatter(x, residual, c=colors, s=18)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(name)
    axes[0].set_ylabel("ln L - ln L_fit")
    axes[0].set_title("parametric fit: residuals (colour = budget)")


def write_outputs(result: dict, points: list[Point], out_dir: Path, summary: dict) -> None:
    """scaling.json and the three plots, written atomically together."""
    plt = _pyplot()
    profiles = result["profiles"]
    palette = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(profiles)))
    colors_by_budget = {id(r): palette[i] for i, p in enumerate(profiles) for r in p.runs}
    n_label = f"N ({summary['params'].replace('_', '-')} parameters)"
    figures = {}
    for name in ("isoflop", "frontier", "residuals"):
        fig, axes = plt.subplots(1, 1 if name == "isoflop" else 2, figsize=(6.5 if name == "isoflop" else 11, 4.5),
                                 layout="constrained")
        if name == "isoflop":
            plot_isoflop(axes, result, palette, n_label)
        elif name == "frontier":
            plot_frontier(axes, result)
        else:
            plot_residuals(axes, points, result, colors_by_budget, n_label)
        for ax in np.atleast_1d(axes):  # a log axis spanning < ~30x labels all 8 minor ticks a decade: they overlap
            for axis in (ax.xaxis, ax.yaxis):
                if axis.get_scale() == "log":
                    axis.set_minor_locator(plt.LogLocator(subs=(2.0, 5.0)))
        figures[name] = fig
    try:
        with atomic_path(out_dir / "scaling.json") as json_tmp:
            json_tmp.write_text(json.dumps(summary, indent=2) + "\n")
            for name, fig in figures.items():
                _save(fig, out_dir / f"{name}.png")
    except OSError as e:
        raise ScalingError(f"cannot write scaling.json and the plots to {out_dir} ({e.strerror}); pass --out DIR "
                           f"with a dir you can write") from None
    finally:
        for fig in figures.values():
            plt.close(fig)


def run_rows(points: list[Point], profiles: list[Profile]) -> list[dict]:
    budget_of = {id(r): p.flops for p in profiles for r in p.runs}
    return [{"run": str(p.path), "n_layer": p.n_layer, "n_embd": p.n_embd, "n_non_embedding": p.non_embedding,
             "n_total": p.total, "tokens": p.tokens, "flops_per_token": p.flops_per_token, "flops": p.flops,
             "loss": p.loss, "epochs": p.epochs, "budget": budget_of[id(p)]} for p in points]


def positive_flops(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError("must be a positive number of FLOPs, e.g. 1e15")
    return value


@command
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m gpt_exp.scaling", description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="an IsoFLOP grid's sweep dirs, run dirs "
                        "or globs (python bench/isoflop_grid.py lays one out)")
    parser.add_argument("--budget", type=positive_flops, metavar="FLOPS",
                        help="the compute budget to size a model for, e.g. 1e15 (default: the grid's largest)")
    parser.add_argument("--metric", choices=METRICS, default="final_loss",
                        help="the loss fitted: final_loss (one batch's) or final_val_loss (needs train.eval_every)")
    parser.add_argument("--params", choices=PARAM_COUNTS, default="non_embedding",
                        help="N: non_embedding (Kaplan's) or total (Chinchilla's, embeddings included)")
    parser.add_argument("--bootstrap", type=int, default=200, metavar="K", help="bootstrap resamples for the CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's resampling")
    parser.add_argument("--out", type=Path, help="where to write scaling.json, isoflop.png, frontier.png, "
                        "residuals.png (default: the sweep dir)")
    args = parser.parse_args(argv)
    if args.bootstrap < 0 or 0 < args.bootstrap < MIN_CI_SAMPLES:
        raise ScalingError(f"--bootstrap {args.bootstrap} must be 0 (no confidence intervals) or >= {MIN_CI_SAMPLES}: "
                           f"a 95% interval's 2.5% tails need that many resamples")
    if args.seed < 0:
        raise ScalingError(f"--seed {args.seed} must be >= 0")
    try:
        runs = load_runs(args.paths)
    except OSError as e:  # run files that cannot be read (a dir in a file's place, permissions)
        if e.filename is None:
            raise
        raise ScalingError(f"cannot read {e.filename} ({e.strerror}); check the path and its permissions") from None
    out_dir = args.out or default_out_dir(args.paths, runs)
    if out_dir.exists() and not out_dir.is_dir():
        raise ScalingError(f"--out {out_dir} is a file; give a dir for scaling.json and the plots")
    points, skipped = split_points(runs, args.metric, args.params)
    if not points:
        counts = Counter(why for _, why in skipped)
        fix = ("; or --metric final_loss (a val loss needs data.val_fraction>0 and train.eval_every)"
               if args.metric == "final_val_loss" else "")
        reasons = ", ".join(f"{why}: {n}" for why, n in counts.items())
        raise ScalingError(f"no run has a {args.metric} to fit ({reasons}); pass finished runs{fix}")
    one_setting([r for r in runs if r.path in {p.path for p in points}])
    result = analyse(points, args.budget, args.bootstrap, args.seed)
    summary = {"metric": args.metric, "params": args.params, "compute": "tokens x flops_per_token",
               "bootstrap": args.bootstrap, "seed": args.seed,
               **{k: v for k, v in result.items() if k not in ("profiles", "law", "fpt")},
               "runs": run_rows(points, result["profiles"]),
               "skipped": [{"run": str(path), "why": why} for path, why in skipped]}
    write_outputs(result, points, out_dir, summary)
    print(report(result, points, skipped, args.metric, args.params, args.bootstrap, out_dir))
    print(f"wrote scaling.json, isoflop.png, frontier.png, residuals.png to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
