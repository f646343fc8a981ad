"""The architecture ablation: each of GPT-2's modern alternatives alone, and the full modern preset, against GPT-2,
at equal tokens, each arm's lr tuned on seeds it is not tested on, ranked by `compare --baseline arm=gpt2` with
Holm-adjusted p-values.

The base is experiments/arch_ablation.yaml (GPT-2's choices at 4 layers x 4 heads x 128 wide, B=8 x T=64, 300
steps, data.order=shuffled). For every arm: optim.lr over --lrs on the tuning seeds, the best (lowest mean final val
loss), then the test seeds at that lr. The corpus is a path `data=text` reads; the default is the three-domain
corpus beside the repository (~30M tokens: no run repeats any of it).

    python bench/arch_ablation.py --out /tmp/ablation --jobs 4
    # 14 arms x (3 lrs x 2 tuning seeds + 5 test seeds) = 154 runs of ~1.7 min on one core each (~2.5 min for the
    # arms with bigger tables): ~1.2 h with --jobs 4 on a 4-core laptop, ~2.3 h with --jobs 2 on 2 cores
    python bench/arch_ablation.py --arms gpt2,rope --lrs 0.002 --tune-seeds 101 --test-seeds 1,2 --steps 4 \
        --data-path FILE --out /tmp/x                # a quick check that it all runs
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tuning import COMPARE, RUN, best_value, call, check_seeds

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
# Each arm: the overrides it adds to GPT-2's choices (n_kv_head 2: two query heads share each key/value head).
ARMS: dict[str, list[str]] = {
    "gpt2": [],
    "rope": ["model.pos=rope"],
    "rmsnorm": ["model.norm=rmsnorm"],
    "no_norm_gain": ["model.norm_gain=false"],
    "qk_norm": ["model.qk_norm=true"],
    "relu2": ["model.mlp=relu2"],
    "swiglu": ["model.mlp=swiglu"],
    "no_bias": ["model.bias=false"],
    "untied": ["model.tie_embeddings=false"],
    "softcap15": ["model.logit_softcap=15"],
    "gqa2": ["model.n_kv_head=2"],
    "value_embeddings": ["model.value_embeddings=true"],
    "zero_init_proj": ["model.zero_init_proj=true"],
    "modern": ["model=modern_tiny", "model.n_layer=4", "model.n_head=4", "model.n_embd=128"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default=str(CORPUS), help="the corpus (data.path)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"which arms (of {', '.join(ARMS)})")
    parser.add_argument("--lrs", default="0.0005,0.001,0.002",
                        help="optim.lr values tuned for every arm (GPT-2's best at this shape is 5e-4)")
    parser.add_argument("--tune-seeds", default="101,102", help="train.seed values each arm's lr is chosen on")
    parser.add_argument("--test-seeds", default="1,2,3,4,5", help="train.seed values the arms are compared on")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=1,
                        help="arms at once, each arm's runs one after another on one core (no core idles, as one "
                        "would in a sweep of 5 test seeds on 2)")
    parser.add_argument("--out", type=Path, help="where the sweeps go (default: a new temp dir)")
    args = parser.parse_args()
    check_seeds(args.tune_seeds, args.test_seeds)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"error: --arms {','.join(unknown)} is not an arm; choose from {', '.join(ARMS)}")

    out = args.out or Path(tempfile.mkdtemp(prefix="arch_ablation_"))
    common = ["+experiment=arch_ablation", f"data.path={args.data_path}", f"train.max_steps={args.steps}",
              f"train.eval_every={args.steps}"]

    def tune_then_test(arm: str) -> float:
        base = [*RUN, *common, f"+arm={arm}", *ARMS[arm]]
        call([*base, f"optim.lr={args.lrs}", f"train.seed={args.tune_seeds}", f"hydra.sweep.dir={out / 'tune' / arm}"])
        with print_lock:  # best_value's lines, one arm's at a time
            print(f"{arm}:")
            lr = best_value(out / "tune" / arm, "optim.lr")
        call([*base, f"optim.lr={lr}", f"train.seed={args.test_seeds}", f"hydra.sweep.dir={out / 'test' / arm}"])
        return lr

    print_lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        tuned = dict(zip(arms, pool.map(tune_then_test, arms)))
    tests = [str(out / "test" / arm) for arm in arms]
    baseline = ["--baseline", "arm=gpt2"] if "gpt2" in arms and len(arms) > 1 else []
    for metric in ("final_val_loss", "final_val_bpb"):
        call([*COMPARE, *tests, *baseline, "--metric", metric, "--x", "tokens",
              "--out", str(out / f"compare_{metric}")])
    print("tuned optim.lr:", ", ".join(f"{arm} {lr:g}" for arm, lr in tuned.items()))


if __name__ == "__main__":
    main()
