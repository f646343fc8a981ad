"""Muon against AdamW on tiny shakespeare: each optimizer's best lr from a 3-lr sweep at 2 seeds, compared at equal
tokens with `python -m gpt_exp.compare --baseline optim=adamw` (Welch's t-test on the final val loss and on the
smoothed training loss at the last common token count).

A 4-layer, 128-wide GPT-2 (7.26M params, 0.79M of them in the blocks' matrices that Muon trains) with the lecture's
schedule (10 warmup steps, cosine to 0.1x), B=8 x T=64, 150 steps (77k tokens), one CPU thread per run (two
threads on a shared 2-core machine wait on each other). optim=muon keeps optim.muon_lr null: optim.lr sets both
of its parts (match_rms_adamw gives Muon's updates AdamW's RMS). Each default grid brackets its optimizer's best lr
(bench/RESULTS.md: AdamW's best was at the low edge of 3e-3..3e-2, then of 1e-3..1e-2). ~13 min on 2 shared cores.

    python bench/muon.py                                    # the sweeps, the best lrs, the tests; prints every command
    python bench/muon.py --steps 8 --adamw-lrs 0.01 --muon-lrs 0.01 --seeds 1   # a quick check that it all runs
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

MODEL = ["model=tiny", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "B=8", "T=64"]
QUIET = ["logger.mode=disabled", "device.threads=1", "train.save_model=none", "train.log_every=50"]


def call(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def best_runs(out: Path) -> dict[str, list[str]]:
    """Each optimizer's run dirs at its best optim.lr (the lowest mean final val loss over the seeds), from the
    compare.json that compare wrote into OUT."""
    rows = json.loads((out / "compare.json").read_text())
    best: dict[str, dict] = {}
    for row in sorted((r for r in rows if r["final_val_loss"] is not None), key=lambda r: r["final_val_loss"]):
        best.setdefault(row["optim.name"], row)
    for name, row in best.items():
        lr = OmegaConf.load(Path(row["run_dirs"][0]) / ".hydra" / "config.yaml").optim.lr
        print(f"best {name}: optim.lr={lr}, final val loss {row['final_val_loss']:.4f} "
              f"over {len(row['run_dirs'])} seeds")
    return {name: row["run_dirs"] for name, row in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adamw-lrs", default="0.0003,0.001,0.003", help="optim.lr values swept for optim=adamw")
    parser.add_argument("--muon-lrs", default="0.003,0.01,0.03", help="optim.lr values swept for optim=muon")
    parser.add_argument("--seeds", default="1,2", help="train.seed values")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, help="where the sweeps go (default: a new temp dir)")
    parser.add_argument("--cache-dir", help="data.cache_dir (default: the usual token cache)")
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_muon_"))
    common = [*MODEL, *QUIET, f"train.max_steps={args.steps}", "data.val_fraction=0.1",
              f"train.eval_every={args.steps}", f"train.seed={args.seeds}"]
    if args.cache_dir:
        common.append(f"data.cache_dir={args.cache_dir}")
    for name, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
        call([sys.executable, "-m", "gpt_exp.run", "-m", f"optim={name}", f"optim.lr={lrs}", *common,
              f"hydra.sweep.dir={out / name}"])
    compare = [sys.executable, "-m", "gpt_exp.compare"]
    call([*compare, str(out / "adamw"), str(out / "muon"), "--metric", "final_val_loss", "--x", "tokens"])
    best = best_runs(out)
    if len(best) == 2:
        runs = best["adamw"] + best["muon"]
        for metric in ("final_val_loss", "loss_at_x"):
            call([*compare, *runs, "--baseline", "optim=adamw", "--metric", metric, "--x", "tokens", "--smooth", "10",
                  "--out", str(out / f"best_{metric}")])


if __name__ == "__main__":
    main()
