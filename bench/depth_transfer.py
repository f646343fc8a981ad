"""CompleteP's learning-rate transfer across depth on a CPU: an lr sweep at several depths, one width, sp and completep.

CompleteP (model.parametrization=completep; Dey et al. 2025, "Don't be lazy: CompleteP enables compute-efficient deep
transformers"; EleutherAI's nanoGPT-mup, completep branch) scales each residual branch by depth_base / n_layer so that,
if it works here, the best lr stays put as the model deepens; under SP it is expected to move. This script measures
that, and claims nothing itself. Each cell is a Trainer run as `python -m gpt_exp.run` builds it, in this process:
n_embd 128 (4 heads; muP's base width 128, so only the depth is scaled), B=8 x T=64, AdamW (no weight decay, 10
warmup steps then a constant lr, grad clip 1), data.order=shuffled with train.seed=SEED (each seed its own batch
order), scored by the val loss of 20 held-out batches (data.val_fraction=0.1) after the last step. It writes
depth_transfer.json (every run, each cell's mean ± std over the seeds, each depth's best lr on the grid and from a
parabola in ln lr with a 95% bootstrap interval over the seeds) and depth_transfer.png.

    # the intended run, on the ~30M-token three-domain corpus: 3 depths x 5 lrs x 2 parametrizations x 3 seeds =
    # 90 runs of 200 steps (102k tokens each, 9.2M in all). Its cost is mostly the 50257 x 128 readout: measured on
    # 2 shared CPU cores (load ~4.5), a step takes ~1.8 s at depth 2, ~3.0 s at depth 8 and ~5.6 s at depth 16, and a
    # run's start and final eval ~12 s, so about 12 hours there (fewer on 2 free cores); --depths 2,4,8,16 adds ~9
    # hours. sp and completep can run in two processes (--parametrizations sp / completep), joined with --merge
    python bench/depth_transfer.py --data-path ../shared/data/corpus/ --out outputs/depth_transfer
    # a quick check (tiny shakespeare): 2 depths, 2 lrs, 1 seed, 5 steps: ~3 min on 2 shared cores
    python bench/depth_transfer.py --depths 2,4 --lrs 0.004,0.016 --seeds 1 --steps 5 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lr_sweep import best_lr_interval, best_lr_line, best_lrs, cells, plot, print_table, train  # bench/, this script's dir

WIDTH, N_HEAD, B, T = 128, 4, 8, 64
FIXED = ["model=tiny", f"model.n_head={N_HEAD}", f"model.block_size={T}", f"B={B}", f"T={T}", "optim.schedule=constant",
         "optim.warmup_steps=10", "optim.weight_decay=0.0", "data.order=shuffled", "data.val_fraction=0.1",
         "train.eval_every=1000000", "train.eval_batches=20", "train.save_model=none", "logger.mode=disabled",
         "device.type=cpu", "device.threads=1", "device.compile=false"]


def overrides(depth: int, parametrization: str, lr: float, seed: int, steps: int, width: int, depth_base: int,
              data: list[str]) -> list[str]:
    """The run's `python -m gpt_exp.run` arguments."""
    scaled = [f"model.mup_base_width={width}"] if parametrization != "sp" else []
    if parametrization == "completep":
        scaled.append(f"model.depth_base={depth_base}")
    return [*FIXED, *data, f"model.n_layer={depth}", f"model.n_embd={width}",
            f"model.parametrization={parametrization}", *scaled, f"optim.lr={lr}", f"train.seed={seed}",
            f"train.max_steps={steps}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="2,4,8")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--lrs", default="0.002,0.004,0.008,0.016,0.032")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds: --first-seed, --first-seed + 1, ...")
    parser.add_argument("--first-seed", type=int, default=0, help="more seeds for a sweep run before (then --merge)")
    parser.add_argument("--depth-base", type=int, default=2, help="CompleteP's base depth")
    parser.add_argument("--parametrizations", default="sp,completep",
                        help="e.g. sp in one process, completep in another")
    parser.add_argument("--data-path", default=None,
                        help="a corpus (data=text data.path=...); default: tiny shakespeare")
    parser.add_argument("--merge", nargs="*", default=[], help="depth_transfer.json files to report together, no runs")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "gpt_exp_depth_cache"))
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    data = ["data=text", f"data.path={args.data_path}"] if args.data_path else ["data=shakespeare"]
    data.append(f"data.cache_dir={args.cache_dir}")
    runs = [r for path in args.merge for r in json.loads(Path(path).read_text())["runs"]]
    start = time.time()
    for seed in range(args.first_seed, args.first_seed + (0 if args.merge else args.seeds)):
        for par in args.parametrizations.split(","):
            for depth in depths:
                for lr in lrs:
                    loss = train(overrides(depth, par, lr, seed, args.steps, args.width, args.depth_base, data),
                                 len(FIXED))
                    runs.append({"parametrization": par, "depth": depth, "lr": lr, "seed": seed, "val_loss": loss})
                    print(f"[{time.time() - start:6.0f}s] seed {seed} {par} n_layer={depth} lr={lr:g}: {loss:.4f}",
                          flush=True)
    mean = cells(runs, "depth")
    params = [p for p in ("sp", "completep") if any(r["parametrization"] == p for r in runs)]
    grid = {par: best_lrs(mean, par, "depth") for par in params}
    fitted = {par: {d: best_lr_interval(runs, par, "depth", d) for d in sorted({r["depth"] for r in runs})}
              for par in params}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "depth_transfer.json").write_text(json.dumps(
        {"runs": runs, "mean": mean, "best_lr_grid": grid, "best_lr_fit": fitted, "steps": args.steps,
         "width": args.width, "depth_base": args.depth_base, "data": args.data_path or "shakespeare"}, indent=1))
    plot(mean, out / "depth_transfer.png", "depth", "n_layer")
    print()
    print_table(mean, "depth")
    for par in params:
        print(best_lr_line(par, "depth", grid[par], fitted[par]))
    print(f"{time.time() - start:.0f}s; wrote {out / 'depth_transfer.json'} and {out / 'depth_transfer.png'}")


if __name__ == "__main__":
    main()
