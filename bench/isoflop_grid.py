"""An IsoFLOP grid for `python -m gpt_exp.scaling`: for every compute budget C, every model shape trained for
C / flops_per_token tokens, so that a budget's runs cost the same FLOPs and differ only in how they split them.

    python bench/isoflop_grid.py                   # print the grid's commands and its cost
    python bench/isoflop_grid.py --run             # run it into outputs/isoflop/<date>_<time>/, then fit it
    python bench/isoflop_grid.py --run --budgets 1.25e11,2.5e11,5e11 data.cache_dir=/tmp/c logger.mode=disabled
    python bench/isoflop_grid.py --run --jobs 2 ...  # two shapes at once, each on half the cores, logs in the grid dir

A Hydra multirun is the product of its swept values, and train.max_tokens = C / flops_per_token differs per shape,
so the grid is one multirun per shape over the budgets' token counts, all in one dir. Extra KEY=VALUE arguments go
to every run. --jobs N trains N shapes at once, the costliest (most tokens) first, each on cores / N torch threads
and with its own log in the grid dir.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpt_exp.shapes import flops_per_token, param_counts

VOCAB, BLOCK = 50257, 256  # conf/model/tiny.yaml: only n_layer and n_embd vary
# The tiny model's width: at these budgets its FLOPs are mostly the lm_head's 6 V C per token, so the width decides
# how many tokens a budget buys. 4 budgets x 4 shapes train 5.8M tokens: ~45 min at 2,500 tok/s, what these shapes
# reach at B=16, T=64 on 2 cores with one other job running (~1,000 tok/s on 2 cores at load 6: bench/RESULTS.md).
SHAPES = "2x4,2x8,2x16,2x32"
BUDGETS = "2.5e11,5e11,1e12,2e12"
TOK_PER_S = 2500  # for the estimate: a laptop's free cores
SECONDS_PER_RUN = 8  # start-up, data, the final val loss
# Every run: B x T = 1024 tokens a step (B=... T=... among the arguments change it); one lr for all widths (1e-2:
# tiny widths want it high); a val split whose loss (20 batches) is taken once, at the end, for --metric
# final_val_loss (a step's loss is one batch's).
B, T = 16, 64
FIXED = ["model=tiny", "optim.lr=1e-2", "optim.warmup_steps=5", "train.max_steps=null", "data.val_fraction=0.1",
         "train.eval_every=1000000"]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            n_layer, n_embd = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"error: --shapes {item}: write N_LAYERxN_EMBD, e.g. 2x16") from None
        if n_layer < 1 or n_embd < 2 or n_embd % 2:
            raise SystemExit(f"error: --shapes {item}: n_layer >= 1 and an even n_embd >= 2 (2 heads)")
        shapes.append((n_layer, n_embd))
    return shapes


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = sorted(float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"error: --budgets {text}: write FLOPs separated by commas, e.g. 2.5e11,5e11,1e12") from None
    if not all(math.isfinite(b) and b > 0 for b in budgets):
        raise SystemExit(f"error: --budgets {text}: each budget must be a positive number of FLOPs")
    return budgets


def batch_shape(overrides: list[str]) -> tuple[int, int]:
    """(B, T) of the runs: ours, or the arguments' B=... and T=..."""
    given = dict(o.split("=", 1) for o in overrides if o.split("=", 1)[0] in ("B", "T"))
    return int(given.get("B", B)), int(given.get("T", T))


def budget_tokens(budget: float, n_layer: int, n_embd: int, b: int, t: int) -> int:
    """The whole steps of b x t tokens nearest to budget / flops_per_token: the trainer rounds train.max_tokens up
    to whole steps, and a run of few steps would overshoot its budget by up to one."""
    return max(1, round(budget / flops_per_token(n_layer, n_embd, VOCAB, BLOCK, t) / (b * t))) * b * t


def grid_commands(shapes: list[tuple[int, int]], budgets: list[float], out: Path, extra: list[str]) -> list[list[str]]:
    """One `python -m gpt_exp.run -m` per shape, sweeping the token counts that its shape needs for each budget."""
    b, t = batch_shape(extra)
    commands = []
    for n_layer, n_embd in shapes:
        tokens = ",".join(str(budget_tokens(budget, n_layer, n_embd, b, t)) for budget in budgets)
        commands.append([sys.executable, "-m", "gpt_exp.run", "-m", *FIXED, f"B={b}", f"T={t}",
                         f"model.n_layer={n_layer}", "model.n_head=2", f"model.n_embd={n_embd}",
                         f"train.max_tokens={tokens}", f"hydra.sweep.dir={out / f'L{n_layer}_E{n_embd}'}",
                         *[o for o in extra if o.split("=", 1)[0] not in ("B", "T")]])
    return commands


def run_shapes(commands: list[list[str]], jobs: int, out: Path) -> int:
    """Run the shapes' multiruns, `jobs` at a time; returns how many failed. With jobs > 1 each writes its output to
    OUT/<shape>.log (interleaved output would be unreadable) and a line says when it ends."""
    if jobs == 1:
        return sum(subprocess.run(c).returncode != 0 for c in commands)
    threads = f"device.threads={max(1, (os.cpu_count() or 1) // jobs)}"
    out.mkdir(parents=True, exist_ok=True)

    def run(command: list[str]) -> bool:
        shape = Path(next(a for a in command if a.startswith("hydra.sweep.dir=")).split("=", 1)[1]).name
        start = time.time()
        with open(out / f"{shape}.log", "w") as log:
            given = any(a.startswith("device.threads=") for a in command)
            rc = subprocess.run(command + ([] if given else [threads]), stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{shape}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - start:.0f} s; "
              f"log {out / f'{shape}.log'}", flush=True)
        return rc != 0

    with ThreadPoolExecutor(jobs) as pool:
        return sum(pool.map(run, sorted(commands, key=shape_tokens, reverse=True)))


def shape_tokens(command: list[str]) -> int:
    """The tokens a shape's multirun trains over all budgets: its cost, to start the costliest first."""
    return sum(int(v) for v in next(a for a in command if a.startswith("train.max_tokens=")).split("=", 1)[1].split(","))


def describe(shapes: list[tuple[int, int]], budgets: list[float], overrides: list[str]) -> str:
    b, t = batch_shape(overrides)
    header = "shape      N non-emb   N total   FLOPs/token  tokens per budget"
    lines = [f"{header} ({', '.join(f'{budget:.3g}' for budget in budgets)})"]
    total = 0
    for n_layer, n_embd in shapes:
        fpt = flops_per_token(n_layer, n_embd, VOCAB, BLOCK, t)
        non_embedding, params = param_counts(n_layer, n_embd, VOCAB, BLOCK)
        tokens = [budget_tokens(budget, n_layer, n_embd, b, t) for budget in budgets]
        total += sum(tokens)
        lines.append(f"{n_layer}x{n_embd:<7} {non_embedding:>9,} {params:>9,} {fpt:>12,}  "
                     + ", ".join(f"{t:,}" for t in tokens))
    minutes = (total / TOK_PER_S + SECONDS_PER_RUN * len(shapes) * len(budgets)) / 60
    lines.append(f"{len(shapes) * len(budgets)} runs, {total:,} tokens: about {minutes:.0f} min at {TOK_PER_S:,} tok/s "
                 f"(B={b}, T={t} on free cores; ~2x on 2 busy ones; time follows tokens, not FLOPs, at these widths)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="added to every run")
    parser.add_argument("--shapes", default=SHAPES, help=f"N_LAYERxN_EMBD,... (default {SHAPES})")
    parser.add_argument("--budgets", default=BUDGETS, help=f"FLOPs,... (default {BUDGETS})")
    parser.add_argument("--out", type=Path, help="the grid's dir (default outputs/isoflop/<date>_<time>)")
    parser.add_argument("--run", action="store_true", help="run the commands (else print them)")
    parser.add_argument("--jobs", type=int, default=1, help="shapes trained at once, each on cores / jobs threads")
    args = parser.parse_args()
    shapes, budgets = parse_shapes(args.shapes), parse_budgets(args.budgets)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: give 1 or more shapes to train at once")
    out = args.out or Path("outputs/isoflop") / time.strftime("%Y-%m-%d_%H-%M-%S")
    commands = grid_commands(shapes, budgets, out, args.overrides)
    print(describe(shapes, budgets, args.overrides))
    fit = ["python", "-m", "gpt_exp.scaling", str(out), "--metric", "final_val_loss"]
    if not args.run:
        print("\n".join(shlex.join(["python", *c[1:]]) for c in commands))
        print(shlex.join(fit))
        return 0
    failed = run_shapes(commands, args.jobs, out)
    if failed:
        print(f"{failed} of {len(commands)} shapes had a failed run; the fit skips those runs", file=sys.stderr)
    return subprocess.run([sys.executable, *fit[1:]]).returncode or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
