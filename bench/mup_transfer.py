"""muP's two promises, measured across width: at a fixed lr a wider model is better, and the best lr stays put.

Each cell is a Trainer run as `python -m gpt_exp.run` builds it, in a worker process (one thread each, `--jobs` at
once): depth 2, 4 heads, B=2 x T=64 (the tied readout, 50257 x width, and its AdamW update are most of a step:
512 wide takes ~0.8 s a step on one core at B=2, ~1.4 s at B=4), AdamW with the repo's defaults (cosine to 0.1x after 20 warmup steps,
weight decay 0.1: under mup the hidden matrices' lr x wd is the same at every width), data.order=shuffled with
train.seed=SEED (each seed its own batch order, shared by the seed's cells), scored by the val loss of
`--eval-batches` held-out batches (data.val_fraction=0.1, the same batches for every run) after the last step.

Every finished run is appended to OUT/runs.jsonl at once; a sweep started again with the same --out skips the runs
already there, so a killed sweep loses at most the runs in flight. The report (OUT/mup_transfer.json and .png):
each cell's mean ± std over the seeds; each width's best lr on the grid and, where three or more lrs bracket it,
from a parabola in ln lr with a 95% bootstrap interval over the seeds; at every lr tested at several widths, the
paired difference between successive widths (mean, a paired t-test over the seeds, how many seeds improved); and at
every lr tested at three or more widths, the loss's slope per doubling of the width (a line per seed, t-tested).

    # the run in bench/RESULTS.md: the base width on a 4-lr grid, then 512 wide on the base's best lr and its two
    # neighbours, and 128 / 256 at the base's best lr only (3 seeds each); then 2 more seeds at that lr, every width
    python bench/mup_transfer.py --data-path ../shared/data/corpus --widths 64 \\
        --lrs 0.001,0.002,0.004,0.008 --out OUT
    python bench/mup_transfer.py --data-path ../shared/data/corpus --widths 128,256,512 --lrs LR \\
        --lrs-at 512=LR/2,LR,2LR --out OUT                  # the same OUT: one report over every run
    python bench/mup_transfer.py --data-path ../shared/data/corpus --widths 64,128,256,512 --lrs LR \\
        --seeds 2 --first-seed 3 --out OUT
    python bench/mup_transfer.py --report-only --out OUT    # the report again, no runs
    # a quick check on tiny shakespeare
    python bench/mup_transfer.py --widths 32,64 --lrs 0.01 --steps 5 --seeds 1 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from lr_sweep import (best_lr_interval, best_lr_line, best_lrs, cells, load_runs, one_setup, plot,  # bench/: here
                      print_table, resume_sweep, train)

N_LAYER, N_HEAD = 2, 4
FIXED = ["model=tiny", f"model.n_layer={N_LAYER}", f"model.n_head={N_HEAD}", "optim.warmup_steps=20",
         "data.order=shuffled", "data.val_fraction=0.1", "train.eval_every=1000000", "train.save_model=none",
         "logger.mode=disabled", "device.type=cpu", "device.threads=1", "device.compile=false"]
RUN_KEYS = ("parametrization", "width", "lr", "seed", "steps", "B", "T", "eval_batches", "base_width", "data")


def overrides(run: dict) -> list[str]:
    """The `python -m gpt_exp.run` arguments of one run (a dict of RUN_KEYS)."""
    data = ["data=text", f"data.path={run['data']}"] if run["data"] != "shakespeare" else ["data=shakespeare"]
    scaled = [f"model.mup_base_width={run['base_width']}"] if run["parametrization"] != "sp" else []
    return [*FIXED, *data, f"data.cache_dir={run['cache_dir']}", f"model.block_size={run['T']}", f"B={run['B']}",
            f"T={run['T']}", f"train.eval_batches={run['eval_batches']}", f"model.n_embd={run['width']}",
            f"model.parametrization={run['parametrization']}", *scaled, f"optim.lr={run['lr']}",
            f"train.seed={run['seed']}", f"train.max_steps={run['steps']}"]


def train_run(run: dict) -> float:
    """A worker's job: the run's final val loss."""
    return train(overrides(run), len(FIXED))


def planned(args: argparse.Namespace) -> list[dict]:
    """Every run the arguments ask for, widest first (the longest runs start first, so the pool ends together)."""
    lrs = {int(w): [float(v) for v in args.lrs.split(",")] for w in args.widths.split(",")}
    for spec in args.lrs_at:
        try:
            width, values = spec.split("=")
            lrs[int(width)] = [float(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"error: --lrs-at {spec}: write WIDTH=LR,LR, e.g. 512=0.001,0.002,0.004") from None
    common = {"steps": args.steps, "B": args.B, "T": args.T, "eval_batches": args.eval_batches,
              "base_width": args.base_width, "data": args.data_path or "shakespeare", "cache_dir": args.cache_dir}
    return [{**common, "parametrization": par, "width": width, "lr": lr, "seed": seed}
            for width in sorted(lrs, reverse=True) for lr in lrs[width]
            for seed in range(args.first_seed, args.first_seed + args.seeds)
            for par in args.parametrizations.split(",")]


def describe(run: dict) -> str:
    return f"{run['parametrization']} n_embd={run['width']} lr={run['lr']:g} seed {run['seed']}"


def width_trends(runs: list[dict], parametrization: str) -> list[dict]:
    """At each lr tested at three or more widths, the loss's slope per doubling of the width: a line in log2(width)
    fitted to each seed trained at every one of those widths, then the slopes' mean ± std and a one-sample t-test
    against 0 (negative: wider is better). One test of "the loss improves with the width" over all widths at once,
    where the successive pairs are several tests of small steps."""
    from scipy import stats

    out = []
    mine = [r for r in runs if r["parametrization"] == parametrization and math.isfinite(r["val_loss"])]
    for lr in sorted({r["lr"] for r in mine}):
        loss = {(r["width"], r["seed"]): r["val_loss"] for r in mine if r["lr"] == lr}
        widths = sorted({w for w, _ in loss})
        seeds = sorted(s for s in {s for _, s in loss} if all((w, s) in loss for w in widths))
        if len(widths) < 3 or not seeds:
            continue
        slopes = np.array([np.polyfit(np.log2(widths), [loss[w, s] for w in widths], 1)[0] for s in seeds])
        p = float(stats.ttest_1samp(slopes, 0.0).pvalue) if len(seeds) > 1 else float("nan")
        out.append({"lr": lr, "widths": widths, "seeds": len(seeds), "slope": float(slopes.mean()),
                    "std": float(slopes.std(ddof=1)) if len(seeds) > 1 else 0.0, "p": p,
                    "improved": int((slopes < 0).sum())})
    return out


def width_steps(runs: list[dict], parametrization: str) -> list[dict]:
    """At each lr tested at two or more widths, each width against the next narrower one, paired by seed: the mean
    difference (wider minus narrower; negative: wider is better), a paired t-test and how many seeds improved."""
    from scipy import stats

    out = []
    mine = [r for r in runs if r["parametrization"] == parametrization and math.isfinite(r["val_loss"])]
    for lr in sorted({r["lr"] for r in mine}):
        by_width = {}
        for r in mine:
            if r["lr"] == lr:
                by_width.setdefault(r["width"], {})[r["seed"]] = r["val_loss"]
        widths = sorted(by_width)
        for narrow, wide in zip(widths, widths[1:]):
            seeds = sorted(set(by_width[narrow]) & set(by_width[wide]))
            wider, narrower = ([by_width[w][s] for s in seeds] for w in (wide, narrow))
            diff = np.subtract(wider, narrower)
            p = float(stats.ttest_rel(wider, narrower).pvalue) if len(seeds) > 1 else float("nan")
            out.append({"lr": lr, "narrow": narrow, "wide": wide, "seeds": len(seeds), "mean_diff": float(diff.mean()),
                        "std_diff": float(diff.std(ddof=1)) if len(seeds) > 1 else 0.0, "p": p,
                        "improved": int((diff < 0).sum())})
    return out


def report(runs: list[dict], out: Path) -> dict:
    one_setup(runs, ("steps", "B", "T", "eval_batches", "base_width", "data"), str(out / "runs.jsonl"))
    params = [p for p in ("sp", "mup") if any(r["parametrization"] == p for r in runs)]
    mean = cells(runs, "width")
    widths = sorted({r["width"] for r in runs})
    def lrs_at(par: str, width: int) -> int:
        return len({r["lr"] for r in runs if r["parametrization"] == par and r["width"] == width})

    # a width trained at one lr has no best lr to speak of: only widths with a grid get one
    grid = {par: {w: lr for w, lr in best_lrs(mean, par, "width").items() if lrs_at(par, w) >= 2} for par in params}
    fitted = {par: {w: best_lr_interval(runs, par, "width", w) for w in widths if lrs_at(par, w) >= 3}
              for par in params}
    steps = {par: width_steps(runs, par) for par in params}
    trends = {par: width_trends(runs, par) for par in params}
    result = {"runs": runs, "mean": mean, "best_lr_grid": grid, "best_lr_fit": fitted, "width_steps": steps,
              "width_trends": trends}
    (out / "mup_transfer.json").write_text(json.dumps(result, indent=1))
    plot(mean, out / "mup_transfer.png", "width", "n_embd")
    print()
    print_table(mean, "width")
    for par in params:
        print(best_lr_line(par, "width", grid[par], fitted[par]))
        for s in steps[par]:
            print(f"{par} lr {s['lr']:g}: n_embd {s['wide']} - {s['narrow']} = {s['mean_diff']:+.4f} ± "
                  f"{s['std_diff']:.4f} (paired p {s['p']:.3g}, {s['improved']}/{s['seeds']} seeds lower)")
        for t in trends[par]:
            print(f"{par} lr {t['lr']:g}: per doubling of n_embd {t['widths'][0]}-{t['widths'][-1]}: {t['slope']:+.4f} ± "
                  f"{t['std']:.4f} (t-test p {t['p']:.3g}, {t['improved']}/{t['seeds']} seeds downhill)")
    print(f"wrote {out / 'mup_transfer.json'} and {out / 'mup_transfer.png'}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,128,256,512")
    parser.add_argument("--lrs", default="0.001,0.002,0.004", help="every width's lrs, unless --lrs-at names it")
    parser.add_argument("--lrs-at", action="append", default=[], metavar="WIDTH=LR,LR",
                        help="one width's own lrs (repeatable)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds: --first-seed, --first-seed + 1, ...")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=50)
    parser.add_argument("--base-width", type=int, default=64, help="muP's base width")
    parser.add_argument("--parametrizations", default="mup", help="mup, sp or sp,mup")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--data-path", default=None,
                        help="a corpus (data=text data.path=...); default: tiny shakespeare")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "gpt_exp_mup_cache"))
    parser.add_argument("--report-only", action="store_true", help="report OUT/runs.jsonl, train nothing")
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    failed = 0
    if not args.report_only:
        failed = resume_sweep(planned(args), RUN_KEYS, args.jobs, log, train_run, describe)
    runs = load_runs(log)
    if not runs:
        raise SystemExit(f"error: no runs in {log}; run without --report-only first")
    report(runs, out)
    if failed:
        raise SystemExit(f"error: {failed} runs failed (above); run the same command again to retry them")


if __name__ == "__main__":
    main()
