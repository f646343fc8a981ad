"""Muon against AdamW at equal tokens, each arm tuned on seeds other than those it is tested on.

Protocol (a reviewer's, bench/RESULTS.md):
1. tune AdamW: sweep optim.lr on the tuning seeds; its best is the lowest mean final val loss (a best at the grid's
   edge widens the grid, up to two steps out: bench/tuning.py's bracketed_best);
2. tune Muon: its AdamW part (embeddings, readout, gains, biases) at AdamW's best optim.lr, sweep the matrices'
   optim.muon_lr on the same tuning seeds;
3. test: each arm at its best lr on the test seeds (none of them a tuning seed), every run reading its own block
   order (data.order=shuffled), then `python -m gpt_exp.compare --baseline optim=adamw` (Welch's t-test on the
   final val loss and on the smoothed training loss at the last common token count).

A 4-layer, 128-wide GPT-2 (7.26M params, 0.79M of them in the blocks' matrices that Muon trains), 10 warmup steps
then cosine to 0.1x, B=8 x T=64, one CPU thread per run. The corpus is a path (a file or folder `data=text` reads);
the default is the three-domain corpus beside the repository, which no run here repeats (300 steps read 154k of its
~28M training tokens). The val split is 1% of its documents, 20 batches per evaluation.

    python bench/muon.py --out /tmp/bench_muon     # 8 + 8 tuning runs, 10 test runs: ~60 min on 2 shared cores
    python bench/muon.py --data-path FILE --steps 8 --adamw-lrs 0.01 --muon-lrs 0.01 --tune-seeds 101 \
        --test-seeds 1,2 --out /tmp/x              # a quick check that it all runs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tuning import COMPARE, RUN, bracketed_best, call, check_seeds

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
MODEL = ["model=tiny", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "B=8", "T=64"]
QUIET = ["logger.mode=disabled", "device.threads=1", "train.save_model=none", "train.log_every=50"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default=str(CORPUS), help="the corpus (data=text data.path=...)")
    # a first pass over 5e-4..4e-3 found its best at the low edge (5e-4) and 4e-3 the worst: the grid moved down
    parser.add_argument("--adamw-lrs", default="0.00025,0.0005,0.001,0.002", help="optim.lr values tuned for adamw")
    # likewise Muon's: over 5e-3..4e-2 its best was 5e-3, the low edge (4e-2 the worst); 2.5e-3 is worse again
    parser.add_argument("--muon-lrs", default="0.0025,0.005,0.01,0.02", help="optim.muon_lr values tuned for muon")
    parser.add_argument("--tune-seeds", default="101,102", help="train.seed values the lrs are chosen on")
    parser.add_argument("--test-seeds", default="1,2,3,4,5", help="train.seed values the arms are compared on")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, help="where the sweeps go (default: a new temp dir)")
    parser.add_argument("--cache-dir", help="data.cache_dir (default: the usual token cache)")
    args = parser.parse_args()
    check_seeds(args.tune_seeds, args.test_seeds)

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_muon_"))
    common = [*MODEL, *QUIET, "data=text", f"data.path={args.data_path}", "data.val_fraction=0.01",
              "data.order=shuffled", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}"]
    if args.cache_dir:
        common.append(f"data.cache_dir={args.cache_dir}")


    def tune(arm: list[str], key: str, values: str) -> float:  # the best on the tuning seeds, the grid widened
        sweep = out / f"tune_{arm[0].split('=')[1]}"  # until it brackets it (a best at the edge is not an optimum)
        call([*RUN, *arm, f"{key}={values}", *common, f"train.seed={args.tune_seeds}", f"hydra.sweep.dir={sweep}"])
        return bracketed_best(sweep, key, run_value=lambda value, widened: call(
            [*RUN, *arm, f"{key}={value:g}", *common, f"train.seed={args.tune_seeds}", f"hydra.sweep.dir={widened}"]))

    adamw_lr = tune(["optim=adamw"], "optim.lr", args.adamw_lrs)
    muon_lr = tune(["optim=muon", f"optim.lr={adamw_lr}"], "optim.muon_lr", args.muon_lrs)

    call([*RUN, "optim=adamw", f"optim.lr={adamw_lr}", *common, f"train.seed={args.test_seeds}",
          f"hydra.sweep.dir={out / 'test_adamw'}"])
    call([*RUN, "optim=muon", f"optim.lr={adamw_lr}", f"optim.muon_lr={muon_lr}", *common,
          f"train.seed={args.test_seeds}", f"hydra.sweep.dir={out / 'test_muon'}"])
    compare = [*COMPARE, str(out / "test_adamw"), str(out / "test_muon"),
               "--baseline", "optim=adamw", "--x", "tokens"]
    for metric in ("final_val_loss", "loss_at_x"):
        call([*compare, "--metric", metric, "--smooth", "10", "--out", str(out / f"compare_{metric}")])
    print(f"tuned: adamw optim.lr={adamw_lr:g}; muon optim.muon_lr={muon_lr:g} with optim.lr={adamw_lr:g}")


if __name__ == "__main__":
    main()
