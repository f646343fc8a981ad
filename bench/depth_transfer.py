"""CompleteP's learning-rate transfer across depth on a CPU: an lr sweep at several depths, one width, sp and completep.

CompleteP (model.parametrization=completep; Dey et al. 2025, "Don't be lazy: CompleteP enables compute-efficient deep
transformers"; EleutherAI's nanoGPT-mup, completep branch) scales each residual branch by depth_base / n_layer so that,
if it works here, the best lr stays put as the model deepens; under SP it is expected to move. This script measures
that, and claims nothing itself. Each cell is a Trainer run as `python -m gpt_exp.run` builds it, in a worker process
(one thread each, `--jobs` at once):
n_embd 128 (4 heads; muP's base width 128, so only the depth is scaled), B=8 x T=64, AdamW (no weight decay, 10
warmup steps then a constant lr, grad clip 1), data.order=shuffled with train.seed=SEED (each seed its own batch
order), scored by the val loss of 20 held-out batches (data.val_fraction=0.1) after the last step. Every finished
run is appended to OUT/runs.jsonl at once; the same command started again trains only the runs not there yet. It
writes depth_transfer.json (every run, each cell's mean ± std over the seeds, each depth's best lr on the grid and
from a parabola in ln lr with a 95% bootstrap interval over the seeds) and depth_transfer.png.

    # the intended run, on the ~30M-token three-domain corpus: 3 depths x 5 lrs x 2 parametrizations x 3 seeds =
    # 90 runs of 200 steps (102k tokens each, 9.2M in all). Its cost is mostly the 50257 x 128 readout: measured on
    # 2 shared CPU cores (load ~4.5), a step takes ~1.8 s at depth 2, ~3.0 s at depth 8 and ~5.6 s at depth 16, and a
    # run's start and final eval ~12 s, so about 12 hours there (fewer on 2 free cores); --depths 2,4,8,16 adds ~9
    # hours on one core; --jobs 2 (the default) runs two at once. More seeds later: --seeds 2 --first-seed 3, same OUT
    # (or --merge the depth_transfer.json of another OUT)
    python bench/depth_transfer.py --data-path ../shared/data/corpus/ --out outputs/depth_transfer
    # a quick check (tiny shakespeare): 2 depths, 2 lrs, 1 seed, 5 steps: ~3 min on 2 shared cores
    python bench/depth_transfer.py --depths 2,4 --lrs 0.004,0.016 --seeds 1 --steps 5 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lr_sweep import (best_lr_interval, best_lr_line, best_lrs, cells, load_runs, one_setup, plot,  # bench/: here
                      print_table, resume_sweep, train)

WIDTH, N_HEAD, B, T = 128, 4, 8, 64
FIXED = ["model=tiny", f"model.n_head={N_HEAD}", f"model.block_size={T}", f"B={B}", f"T={T}", "optim.schedule=constant",
         "optim.warmup_steps=10", "optim.weight_decay=0.0", "data.order=shuffled", "data.val_fraction=0.1",
         "train.eval_every=1000000", "train.eval_batches=20", "train.save_model=none", "logger.mode=disabled",
         "device.type=cpu", "device.threads=1", "device.compile=false"]


SETUP = ("steps", "width", "depth_base", "data")  # one report, one setup: runs that differ in these are refused
RUN_KEYS = ("parametrization", "depth", "lr", "seed", *SETUP)


def overrides(run: dict) -> list[str]:
    """The `python -m gpt_exp.run` arguments of one run (a dict of RUN_KEYS and its cache_dir)."""
    data = ["data=text", f"data.path={run['data']}"] if run["data"] != "shakespeare" else ["data=shakespeare"]
    scaled = [f"model.mup_base_width={run['width']}"] if run["parametrization"] != "sp" else []
    if run["parametrization"] == "completep":
        scaled.append(f"model.depth_base={run['depth_base']}")
    return [*FIXED, *data, f"data.cache_dir={run['cache_dir']}", f"model.n_layer={run['depth']}",
            f"model.n_embd={run['width']}", f"model.parametrization={run['parametrization']}", *scaled,
            f"optim.lr={run['lr']}", f"train.seed={run['seed']}", f"train.max_steps={run['steps']}"]


def train_run(run: dict) -> float:
    """A worker's job: the run's final val loss."""
    return train(overrides(run), len(FIXED))


def describe(run: dict) -> str:
    return f"seed {run['seed']} {run['parametrization']} n_layer={run['depth']} lr={run['lr']:g}"


def planned(args: argparse.Namespace) -> list[dict]:
    """Every run the arguments ask for, deepest first (the longest runs start first, so the pool ends together)."""
    common = {"steps": args.steps, "width": args.width, "depth_base": args.depth_base,
              "data": args.data_path or "shakespeare", "cache_dir": args.cache_dir}
    return [{**common, "parametrization": par, "depth": depth, "lr": float(lr), "seed": seed}
            for depth in sorted((int(d) for d in args.depths.split(",")), reverse=True)
            for lr in args.lrs.split(",") for seed in range(args.first_seed, args.first_seed + args.seeds)
            for par in args.parametrizations.split(",")]


def report(runs: list[dict], out: Path) -> None:
    one_setup(runs, SETUP, f"{out / 'runs.jsonl'} and --merge")
    mean = cells(runs, "depth")
    params = [p for p in ("sp", "completep") if any(r["parametrization"] == p for r in runs)]
    grid = {par: best_lrs(mean, par, "depth") for par in params}
    fitted = {par: {d: best_lr_interval(runs, par, "depth", d) for d in sorted({r["depth"] for r in runs})}
              for par in params}
    setup = {k: runs[0].get(k) for k in SETUP}
    (out / "depth_transfer.json").write_text(json.dumps(
        {"runs": runs, "mean": mean, "best_lr_grid": grid, "best_lr_fit": fitted, **setup}, indent=1))
    plot(mean, out / "depth_transfer.png", "depth", "n_layer")
    print()
    print_table(mean, "depth")
    for par in params:
        print(best_lr_line(par, "depth", grid[par], fitted[par]))
    print(f"wrote {out / 'depth_transfer.json'} and {out / 'depth_transfer.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="2,4,8")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--lrs", default="0.002,0.004,0.008,0.016,0.032")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds: --first-seed, --first-seed + 1, ...")
    parser.add_argument("--first-seed", type=int, default=0, help="more seeds for a sweep run before")
    parser.add_argument("--depth-base", type=int, default=2, help="CompleteP's base depth")
    parser.add_argument("--parametrizations", default="sp,completep")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--data-path", default=None,
                        help="a corpus (data=text data.path=...); default: tiny shakespeare")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="depth_transfer.json files (other OUTs) to report with OUT's runs, no runs trained")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "gpt_exp_depth_cache"))
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: give 1 or more runs to train at once")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    failed = 0
    if not args.merge:
        failed = resume_sweep(planned(args), RUN_KEYS, args.jobs, log, train_run, describe)
    merged = [json.loads(Path(p).read_text()) for p in args.merge]  # a report's setup is at its top level
    runs = load_runs(log) + [{**{k: m.get(k) for k in SETUP}, **r} for m in merged for r in m["runs"]]
    if not runs:
        raise SystemExit(f"error: no runs in {log} or --merge")
    report(runs, out)
    if failed:
        raise SystemExit(f"error: {failed} runs failed (above); run the same command again to retry them")


if __name__ == "__main__":
    main()
