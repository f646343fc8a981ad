"""Data mixtures of the three-domain corpus at equal tokens: per-domain and overall val bits per byte.

Each mixture trains the same model (GPT-2's choices at 4 layers x 4 heads x 128 wide, B=8 x T=64, 300 steps = 154k
tokens, AdamW at optim.lr 1e-3: among the best of bench/muon.py's AdamW tuning on this corpus, on seeds 101 and 102,
not the seeds here) on the seeds 1-3, every seed reading its own row order (data.order=shuffled). Every source keeps
2% of its documents for validation and is scored on them at the end (20 batches each), weight 0 included. The
mixtures are labelled (+mixture=NAME) and compared with `compare --baseline mixture=natural` on the overall and each
domain's final val bpb, and mixture.png shows each mixture's per-domain and overall val bpb (mean ± std of the seeds).

    python bench/mixture.py --out /tmp/bench_mixture          # 4 mixtures x 3 seeds: ~35 min on 2 shared cores
    python bench/mixture.py --steps 3 --seeds 1 --out /tmp/x  # a quick check that it all runs
    python bench/mixture.py --plot-only --out /tmp/bench_mixture   # the table and plot again, from the runs there
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tuning import COMPARE, RUN, call

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"
DOMAINS = {"kernel": "kernel_docs.jsonl.gz", "python": "python_docs.jsonl.gz", "webster": "webster.jsonl.gz"}
# weights of kernel : python : webster. natural: their sizes in gpt2 tokens (10.9M : 4.0M : 16.5M, the corpus README)
MIXTURES = {
    "natural": (109, 40, 165),
    "uniform": (1, 1, 1),
    "kernel_heavy": (4, 1, 1),
    "no_python": (1, 0, 1),  # python evaluated only: how far the other two domains carry to it
}
SETUP = ["model=tiny", "model.n_layer=4", "model.n_head=4", "model.n_embd=128", "B=8", "T=64", "optim.lr=0.001",
         "logger.mode=disabled", "device.threads=1", "train.save_model=none", "train.log_every=50", "data=mix",
         "data.val_fraction=0.02", "data.order=shuffled"]


def sources(corpus: Path, weights: tuple[int, ...]) -> str:
    """The data.sources mapping, as a Hydra override value."""
    return "{" + ", ".join(f"{name}: {{path: '{corpus / file}', weight: {w}}}"
                           for (name, file), w in zip(DOMAINS.items(), weights)) + "}"


def val_bpb(sweep: Path) -> dict[str, list[float]]:
    """"overall" and each domain -> the final val bpb of every run in SWEEP (its summary.json)."""
    scores: dict[str, list[float]] = {}
    for summary in sorted(sweep.glob("*/summary.json")):
        row = json.loads(summary.read_text())
        for key in ("overall", *DOMAINS):
            scores.setdefault(key, []).append(row["final_val_bpb" if key == "overall" else f"final_val_bpb/{key}"])
    return scores


def report(out: Path, names: list[str]) -> None:
    """Print each mixture's mean ± std val bpb per domain and overall, and draw them as grouped bars (mixture.png)."""
    import matplotlib  # a plotting backend is only needed for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("overall", *DOMAINS)
    scores = {name: val_bpb(out / name) for name in names}
    print("mixture (kernel:python:webster)  " + "  ".join(f"{k:>15}" for k in keys))
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [statistics.mean(scores[name][k]) for k in keys]
        stds = [statistics.stdev(scores[name][k]) if len(scores[name][k]) > 1 else 0.0 for k in keys]
        weights = ":".join(map(str, MIXTURES[name]))
        print(f"{name + ' (' + weights + ')':32}  " + "  ".join(f"{m:.4f}±{s:.4f}" for m, s in zip(means, stds)))
        ax.bar([j + i * width for j in range(len(keys))], means, width, yerr=stds, capsize=2,
               label=f"{name} ({weights}, n={len(scores[name]['overall'])})")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], keys)
    low = min(min(v) for s in scores.values() for v in s.values())
    ax.set_ylim(low - 0.15, None)
    ax.set_ylabel("final val bits per byte")
    ax.set_title("data mixtures at equal tokens: held-out bpb per domain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "mixture.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'mixture.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="the folder with the three domains' files")
    parser.add_argument("--mixtures", default=",".join(MIXTURES), help=f"which (of {', '.join(MIXTURES)})")
    parser.add_argument("--seeds", default="1,2,3", help="train.seed values")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, help="where the sweeps go (default: a new temp dir)")
    parser.add_argument("--cache-dir", help="data.cache_dir (default: the usual token cache)")
    parser.add_argument("--plot-only", action="store_true", help="no runs: the table and plot of the sweeps in --out")
    args = parser.parse_args()
    names = args.mixtures.split(",")
    if unknown := sorted(set(names) - set(MIXTURES)):
        raise SystemExit(f"error: --mixtures {','.join(unknown)} is not a mixture; choose from {', '.join(MIXTURES)}")

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_mixture_"))
    if args.plot_only:
        return report(out, names)
    cache = [f"data.cache_dir={args.cache_dir}"] if args.cache_dir else []
    for name in names:
        call([*RUN, *SETUP, *cache, f"data.sources={sources(args.corpus, MIXTURES[name])}", f"+mixture={name}",
              f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", f"train.seed={args.seeds}",
              f"hydra.sweep.dir={out / name}"])
    baseline = ["--baseline", "mixture=natural"] if "natural" in names and len(names) > 1 else []
    for metric in ("final_val_bpb", *(f"final_val_bpb/{domain}" for domain in DOMAINS)):
        call([*COMPARE, *(str(out / name) for name in names), *baseline, "--metric", metric,
              "--out", str(out / f"compare_{metric.replace('/', '_')}")])
    report(out, names)


if __name__ == "__main__":
    main()
