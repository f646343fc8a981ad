"""The architecture ablation: each of GPT-2's modern alternatives alone, and the full modern preset, against GPT-2,
at equal tokens, each arm's lr tuned on seeds it is not tested on, ranked by `compare --baseline arm=gpt2` with
Holm-adjusted p-values.

The base is experiments/arch_ablation.yaml (GPT-2's choices at 4 layers x 4 heads x 128 wide, B=8 x T=64, 300
steps, data.order=shuffled). For every arm: optim.lr over --lrs on the tuning seeds, the best (lowest mean final val
loss; where that is at the grid's edge, the next value out is tried too, up to --widen times), then the test seeds
at that lr. The corpus is a path `data=text` reads; the default is the three-domain
corpus beside the repository (~30M tokens: no run repeats any of it).

    python bench/arch_ablation.py --out /tmp/ablation --jobs 4
    # 14 arms x (3 lrs x 2 tuning seeds + 5 test seeds) = 154 runs of ~1.7 min on one core each (~2.5 min for the
    # arms with bigger tables): ~1.2 h with --jobs 4 on a 4-core laptop, ~2.3 h with --jobs 2 on 2 cores
    python bench/arch_ablation.py --arms gpt2,rope --lrs 0.002 --tune-seeds 101 --test-seeds 1,2 --steps 4 \
        --data-path FILE --out /tmp/x                # a quick check that it all runs
    python bench/arch_ablation.py --report-only --out /tmp/ablation   # no training: compare the test sweeps there
                                                 # (Holm over every arm found), the ranked table and ablation.png
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tuning import COMPARE, RUN, bracketed_best, call, check_seeds, final_val_losses

from gpt_exp.compare import add_holm, baseline_columns
from gpt_exp.config import flatten
from gpt_exp.run_reader import SHAPE_KEYS, architecture, read_config
from gpt_exp.shapes import param_counts

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


def compare(out: Path, arms: list[str]) -> None:
    """`compare` the arms' test sweeps at equal tokens on val loss and val bpb, against GPT-2 (Holm-adjusted)."""
    tests = [str(out / "test" / arm) for arm in arms]
    baseline = ["--baseline", "arm=gpt2"] if "gpt2" in arms and len(arms) > 1 else []
    for metric in ("final_val_loss", "final_val_bpb"):
        call([*COMPARE, *tests, *baseline, "--metric", metric, "--x", "tokens",
              "--out", str(out / f"compare_{metric}")])


def parameters(sweep: Path) -> str:
    """A sweep's model size: total parameters (the non-embedding ones), from its first run's recorded config."""
    params = flatten(read_config(next(run for run in sorted(sweep.iterdir()) if (run / ".hydra").is_dir())))
    n_layer, n_embd, vocab, block, _ = (params[key] for key in SHAPE_KEYS)
    non_embedding, total = param_counts(n_layer, n_embd, vocab, block, **architecture(params))  # with n_head
    return f"{total / 1e6:.2f}M ({non_embedding / 1e6:.2f}M)"


def finished(losses: dict[float, list[float]]) -> dict[float, list[float]]:
    """A sweep's final val losses by lr, without the runs still going or failed (they have none)."""
    return {lr: [v for v in values if math.isfinite(v)] for lr, values in losses.items()}


def same_lr_differences(out: Path, tests: dict[str, dict[float, list[float]]]) -> dict[str, dict]:
    """Each arm against GPT-2 trained at the arm's own lr (its test sweep's, `tests` by arm) on the same test seeds
    (test/gpt2 or control/gpt2_lr*): how much of its difference the architecture makes rather than its lr. Welch's
    test as compare's, Holm-adjusted over the arms that have such a control."""
    gpt2 = finished(tests.get("gpt2", {}))
    for sweep in sorted((out / "control").glob("gpt2_lr*")):
        gpt2.update(finished(final_val_losses(sweep, "optim.lr")))
    found = {}
    for arm, losses in tests.items():
        lr = min(losses)  # a test sweep runs at one lr
        if arm != "gpt2" and lr in gpt2:
            found[arm] = baseline_columns(finished(losses)[lr], gpt2[lr], False)
    add_holm(list(found.values()))
    return found


def report(out: Path) -> None:
    """Print the arms ranked by their difference from GPT-2 at its tuned lr (a markdown table with each arm's tuning
    losses, and its difference from GPT-2 at the arm's own lr where that control ran) and draw both differences with
    their 95% CIs (ablation.png)."""
    import matplotlib  # a plotting backend is only needed for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads((out / "compare_final_val_loss" / "compare.json").read_text())
    bpb = {row["arm"]: row for row in json.loads((out / "compare_final_val_bpb" / "compare.json").read_text())}
    tuning = {row["arm"]: final_val_losses(out / "tune" / row["arm"], "optim.lr") for row in rows
              if (out / "tune" / row["arm"]).is_dir()}
    lrs = sorted({lr for losses in tuning.values() for lr in losses})
    # each arm's tested lr, from its runs (compare shows optim.lr only where the arms differ in it)
    tests = {row["arm"]: final_val_losses(out / "test" / row["arm"], "optim.lr") for row in rows}
    tested = {arm: min(losses) for arm, losses in tests.items()}
    same_lr = same_lr_differences(out, tests)
    rows.sort(key=lambda row: row.get("baseline_diff") or 0.0)

    def tuned(arm: str) -> str:
        means = {lr: sum(v) / len(v) for lr, v in tuning.get(arm, {}).items()}
        best = min(means, key=means.get, default=None)
        return " / ".join("-" if lr not in means else f"**{means[lr]:.4f}**" if lr == best else f"{means[lr]:.4f}"
                          for lr in lrs)

    def mean_std(row: dict, metric: str) -> str:  # one seed (a sweep still going) has no std
        mean, std = row[metric], row[f"{metric}_std"]
        return "-" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")

    def difference(row: dict | None) -> str:  # two cells: the difference [CI], p (Welch / Holm)
        if row is None or row["baseline_p"] is None:  # no control at this lr, or too few finished seeds
            return " | "
        return (f"{row['baseline_diff']:+.4f} [{row['baseline_ci_low']:+.3f}, {row['baseline_ci_high']:+.3f}] | "
                f"{row['baseline_p']:.3g} / {row['baseline_p_holm']:.3g}")

    print(f"| arm | tuning: mean final val loss at lr {' / '.join(f'{lr:g}' for lr in lrs)} | lr | final val loss "
          "| Δ vs gpt2 at its tuned lr [95% CI] | p (Welch / Holm) | Δ vs gpt2 at this arm's lr [95% CI] "
          "| p (Welch / Holm) | final val bpb | params (non-emb.) | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        arm = row["arm"]
        tuned_diff = "baseline | " if row.get("baseline_note") == "baseline" else difference(row)
        print(f"| {arm} | {tuned(arm)} | {tested[arm]:g} | {mean_std(row, 'final_val_loss')} | {tuned_diff} | "
              f"{difference(same_lr.get(arm))} | {mean_std(bpb[arm], 'final_val_bpb')} | "
              f"{parameters(out / 'test' / arm)} | {(row['median_tok_per_s'] or 0) / 1000:.2f}k |")

    arms = [row for row in rows if row.get("baseline_note") != "baseline"]
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(arms) + 1.6))
    for y, row in enumerate(arms):
        for shift, diff, marker in ((-0.13, row, "o"), (0.13, same_lr.get(row["arm"]), "s")):
            if diff is None or diff["baseline_p"] is None:
                continue
            holm_p, delta = diff["baseline_p_holm"], diff["baseline_diff"]
            color = "tab:blue" if holm_p < 0.05 and delta < 0 else "tab:red" if holm_p < 0.05 else "gray"
            ax.errorbar(delta, y + shift, xerr=[[delta - diff["baseline_ci_low"]], [diff["baseline_ci_high"] - delta]],
                        fmt=marker, color=color, capsize=3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(arms)), [f"{row['arm']} (lr {tested[row['arm']]:g}, n={row['n']})" for row in arms])
    ax.invert_yaxis()
    ax.set_xlabel("final val loss minus GPT-2's, equal tokens (95% CI; blue/red: Holm p < 0.05)")
    ax.set_title("each change alone on GPT-2, and the modern preset")
    ax.legend(handles=[plt.Line2D([], [], marker=m, color="gray", linestyle="", label=label) for m, label in
                       (("o", "against GPT-2 at its tuned lr"), ("s", "against GPT-2 at this arm's lr"))],
              fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'ablation.png'}")


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
    parser.add_argument("--widen", type=int, default=2,
                        help="an arm's best lr at the grid's edge: try up to this many values beyond it (x2 or /2)")
    parser.add_argument("--out", type=Path, help="where the sweeps go (default: a new temp dir)")
    parser.add_argument("--report-only", action="store_true",
                        help="no training: compare the test sweeps already in --out (those of --arms found there) "
                        "and print the table and plot")
    args = parser.parse_args()
    check_seeds(args.tune_seeds, args.test_seeds)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"error: --arms {','.join(unknown)} is not an arm; choose from {', '.join(ARMS)}")

    out = args.out or Path(tempfile.mkdtemp(prefix="arch_ablation_"))
    if args.report_only:
        found = [arm for arm in arms if (out / "test" / arm).is_dir()]
        if "gpt2" not in found or len(found) < 2:
            raise SystemExit(f"error: --report-only needs {out / 'test' / 'gpt2'} and another arm's test sweep beside "
                             "it; give the --out of a finished run")
        compare(out, found)
        return report(out)
    common = ["+experiment=arch_ablation", f"data.path={args.data_path}", f"train.max_steps={args.steps}",
              f"train.eval_every={args.steps}"]

    def arm_runs(arm: str) -> list[str]:
        return [*RUN, *common, f"+arm={arm}", *ARMS[arm]]

    def tune_then_test(arm: str) -> float:
        base = arm_runs(arm)
        tune = out / "tune" / arm
        call([*base, f"optim.lr={args.lrs}", f"train.seed={args.tune_seeds}", f"hydra.sweep.dir={tune}"])
        lr = bracketed_best(tune, "optim.lr", tries=args.widen, label=arm, run_value=lambda value, sweep: call(
            [*base, f"optim.lr={value:g}", f"train.seed={args.tune_seeds}", f"hydra.sweep.dir={sweep}"]))
        call([*base, f"optim.lr={lr:g}", f"train.seed={args.test_seeds}", f"hydra.sweep.dir={out / 'test' / arm}"])
        return lr

    def control(lr: float) -> None:  # GPT-2 at another arm's lr: what that lr alone is worth
        call([*arm_runs("gpt2"), f"optim.lr={lr:g}", f"train.seed={args.test_seeds}",
              f"hydra.sweep.dir={out / 'control' / f'gpt2_lr{lr:g}'}"])

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        tuned = dict(zip(arms, pool.map(tune_then_test, arms)))
        if "gpt2" in tuned:
            list(pool.map(control, sorted(set(tuned.values()) - {tuned["gpt2"]})))
    compare(out, arms)
    print("tuned optim.lr:", ", ".join(f"{arm} {lr:g}" for arm, lr in tuned.items()))
    if "gpt2" in arms and len(arms) > 1:
        report(out)


if __name__ == "__main__":
    main()
