"""Smoke runs of the benchmarks at tiny sizes, so that they do not rot; no assertion on speed."""

import gzip
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench(*args: str) -> str:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True, timeout=600).stdout


def test_train_step_bench_prints_a_ratio_and_equal_losses():
    out = bench(str(BENCH / "train_step.py"), "--case", "tiny-fp32", "--rounds", "1", "--steps", "6", "--warmup", "2")
    match = re.search(r"tok/s ratio ([\d.]+)x, max \|dloss\| ([\d.e+-]+)", out)
    assert match, out
    assert float(match.group(1)) > 0 and float(match.group(2)) < 1e-3  # same init, same batches, same losses


def test_lecture_loop_prints_one_row_per_step():
    out = bench(str(BENCH / "lecture.py"), "--steps", "3", "--n_layer", "1", "--n_head", "1", "--n_embd", "8",
                "--block_size", "64")
    rows = [line for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 3 and '"loss": 10.8' in rows[0]  # ln(50257) = 10.82 at the start


def test_step_profile_splits_the_step_into_phases():
    out = bench(str(BENCH / "step_profile.py"), "--case", "tiny-fp32", "--steps", "6", "--warmup", "2")
    match = re.search(r"tiny-fp32: step ([\d.]+) ms \(median of 4\) = (.*)", out)
    assert match, out
    phases = dict(re.findall(r"(\w+) (-?[\d.]+) ms", match.group(2)))
    assert list(phases) == ["data", "forward", "backward", "clip", "optimizer", "logging", "other"]
    assert float(phases["forward"]) > 0 and float(phases["backward"]) > 0 and float(phases["logging"]) > 0
    timed = sum(float(ms) for name, ms in phases.items() if name != "other")
    assert timed <= float(match.group(1)) * 1.05  # medians of parts need not add up exactly, but cannot exceed it


def _tuning_run(path: Path, lr: float, seed: int, loss: float | None) -> None:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(f"optim:\n  lr: {lr}\ntrain:\n  seed: {seed}\n")
    (path / "summary.json").write_text(json.dumps({"status": "completed" if loss else "diverged",
                                                   "final_val_loss": loss}))


def test_tuning_picks_the_lowest_mean_and_rules_out_a_value_with_a_diverged_seed(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from tuning import best_value, check_seeds

    runs = {(1e-3, 1): 5.0, (1e-3, 2): 5.2, (2e-3, 1): 4.9, (2e-3, 2): 5.1, (4e-3, 1): 3.0, (4e-3, 2): None}
    for i, ((lr, seed), loss) in enumerate(runs.items()):
        _tuning_run(tmp_path / str(i), lr, seed, loss)
    assert best_value(tmp_path, "optim.lr") == 2e-3  # means 5.1, 5.0; 4e-3 diverged on one seed
    assert "edge of the grid" not in capsys.readouterr().out
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"final_val_loss": 4.0}))
    assert best_value(tmp_path, "optim.lr") == 1e-3  # mean 4.6
    assert "the best optim.lr (0.001) is at the edge of the grid; widen it" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--test-seeds shares \['2'\] with --tune-seeds"):
        check_seeds("101,2", "1,2,3")


@pytest.mark.parametrize("true_best, tries, expected, trained", [
    (5e-4, 2, 5e-4, [5e-4, 2.5e-4]),  # below the grid: widened twice, bracketed by 2.5e-4
    (2.5e-4, 1, 5e-4, [5e-4]),  # one try allowed: the best so far, still at the edge
    (8e-3, 2, 8e-3, [8e-3, 1.6e-2]),  # above it: x2 each time
    (2e-3, 2, 2e-3, []),  # inside the grid: nothing more is run
])
def test_an_optimum_at_the_grids_edge_is_widened_until_bracketed(tmp_path, monkeypatch, true_best, tries, expected,
                                                                   trained):
    monkeypatch.syspath_prepend(str(BENCH))
    from tuning import bracketed_best

    def loss(lr: float) -> float:  # a parabola in log lr; 1.6e-2 diverges
        return None if lr > 1e-2 else 4.0 + math.log2(lr / true_best) ** 2

    for i, lr in enumerate((1e-3, 2e-3, 4e-3)):
        _tuning_run(tmp_path / str(i), lr, 101, loss(lr))
    ran = []

    def run_value(lr: float, sweep: Path) -> None:
        ran.append(lr)
        _tuning_run(sweep / "0", lr, 101, loss(lr))

    assert bracketed_best(tmp_path, "optim.lr", run_value, tries=tries) == pytest.approx(expected)
    assert ran == pytest.approx(trained)
    assert [p.name for p in sorted(tmp_path.glob("widened_*"))] == sorted(f"widened_{lr:g}" for lr in trained)


def test_each_arm_is_also_compared_with_gpt2_at_its_own_lr(tmp_path, monkeypatch):
    """An arm tuned to 2e-3 against GPT-2 tuned to 1e-3 mixes the architecture's effect with the lr's: the control
    (GPT-2 at 2e-3, same test seeds) takes the lr's out. Welch's test as scipy's; an arm without a control has none."""
    monkeypatch.syspath_prepend(str(BENCH))
    from arch_ablation import final_val_losses, same_lr_differences

    losses = {("test/gpt2", 1e-3): [5.0, 5.1, 5.2], ("control/gpt2_lr0.002", 2e-3): [4.8, 4.9, 5.1],
              ("test/rope", 2e-3): [4.7, 4.75, 4.9], ("test/rmsnorm", 4e-3): [4.9, 5.0, 5.0]}
    for (sweep, lr), values in losses.items():
        for seed, loss in enumerate(values):
            _tuning_run(tmp_path / sweep / str(seed), lr, seed + 1, loss)
    tests = {arm: final_val_losses(tmp_path / "test" / arm, "optim.lr") for arm in ("gpt2", "rope", "rmsnorm")}
    assert {arm: min(lrs) for arm, lrs in tests.items()} == {"gpt2": 1e-3, "rope": 2e-3, "rmsnorm": 4e-3}
    found = same_lr_differences(tmp_path, tests)
    welch = stats.ttest_ind(losses["test/rope", 2e-3], losses["control/gpt2_lr0.002", 2e-3], equal_var=False)
    assert list(found) == ["rope"]
    assert found["rope"]["baseline_diff"] == pytest.approx(4.7833333 - 4.9333333)
    assert found["rope"]["baseline_p"] == pytest.approx(welch.pvalue) == found["rope"]["baseline_p_holm"]
    assert found["rope"]["baseline_ci_low"] == pytest.approx(welch.confidence_interval(0.95).low)


@pytest.mark.slow
def test_arch_ablation_tunes_each_arm_then_tests_it_against_gpt2(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(20000)))
    out = bench(str(BENCH / "arch_ablation.py"), "--arms", "gpt2,rope", "--lrs", "0.001,0.01", "--tune-seeds", "7",
                "--test-seeds", "1,2", "--steps", "3", "--data-path", str(corpus), "--out", str(tmp_path / "out"))
    assert re.search(r"tuned optim.lr: gpt2 0\.0*1, rope 0\.0*1\n", out), out
    rows = json.loads((tmp_path / "out" / "compare_final_val_loss" / "compare.json").read_text())
    assert sorted((row["arm"], row["n"]) for row in rows) == [("gpt2", 2), ("rope", 2)]
    assert [row["baseline_note"] for row in rows if row["arm"] == "gpt2"] == ["baseline"]
    # the ranked table: one row per arm, the tuning losses at both lrs, rope's difference with its Holm p
    table = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ") and " | " in line}
    assert set(table) == {"arm", "gpt2", "rope"}
    rope = next(row for row in rows if row["arm"] == "rope")
    assert f"{rope['baseline_diff']:+.4f} [" in table["rope"]
    assert f"| {rope['baseline_p']:.3g} / {rope['baseline_p_holm']:.3g} |" in table["rope"]
    # both arms were best at the grid's low edge: each tried 1e-4 on its tuning seed, did worse, and kept 1e-3
    assert [len(list((tmp_path / "out" / "tune" / arm / "widened_0.0001").glob("*/summary.json")))
            for arm in ("gpt2", "rope")] == [1, 1]
    assert table["gpt2"].count(" / ") == 2 and "| baseline |" in table["gpt2"]
    assert "| 7.26M (0.79M) |" in table["gpt2"] and "| 7.23M (0.79M) |" in table["rope"]  # rope: no wpe (256 x 128)
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 10_000


@pytest.mark.slow
def test_mixture_bench_compares_each_domains_bpb_against_the_natural_mixture(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for domain, file in (("kernel", "kernel_docs"), ("python", "python_docs"), ("webster", "webster")):
        with gzip.open(corpus / f"{file}.jsonl.gz", "wt") as f:  # 500 documents: 2% of them (10) are the val split
            f.writelines(json.dumps({"text": f"{domain} doc {i}: " + " ".join(f"{domain}{j % 31}" for j in range(40))})
                         + "\n" for i in range(500))
    out_dir = tmp_path / "out"
    out = bench(str(BENCH / "mixture.py"), "--corpus", str(corpus), "--mixtures", "natural,no_python", "--seeds", "1,2",
                "--steps", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(out_dir))
    summaries = [json.loads((out_dir / "no_python" / str(i) / "summary.json").read_text()) for i in range(2)]
    assert [s["tokens/python"] for s in summaries] == [0, 0]  # weight 0: evaluated, never trained on
    assert all(s["tokens/kernel"] + s["tokens/webster"] == 3 * 8 * 64 for s in summaries)
    assert all(0 < s["final_val_bpb/python"] < 20 for s in summaries)
    rows = json.loads((out_dir / "compare_final_val_bpb_python" / "compare.json").read_text())
    assert sorted((row["mixture"], row["n"]) for row in rows) == [("natural", 2), ("no_python", 2)]
    assert re.search(r"no_python \(1:0:1\)\s+(\d\.\d{4}±\d\.\d{4}\s+){4}", out), out
    assert (out_dir / "mixture.png").stat().st_size > 10_000


@pytest.mark.slow
def test_depth_transfer_writes_each_cell_and_each_depths_best_lr(tmp_path, cache_dir):
    out = bench(str(BENCH / "depth_transfer.py"), "--depths", "1,2", "--lrs", "0.01", "--seeds", "1", "--steps", "2",
                "--parametrizations", "completep", "--cache-dir", str(cache_dir), "--out", str(tmp_path))
    result = json.loads((tmp_path / "depth_transfer.json").read_text())
    assert [(r["depth"], r["lr"], r["seeds"]) for r in result["mean"]] == [(1, 0.01, 1), (2, 0.01, 1)]
    assert all(9 < r["val_loss"] < 11 for r in result["mean"])  # 2 steps from ln(50257) = 10.8
    assert result["best_lr_grid"] == {"completep": {"1": 0.01, "2": 0.01}}
    assert "completep: best lr per depth on the grid" in out and (tmp_path / "depth_transfer.png").is_file()
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2  # each run recorded as it finished
    again = bench(str(BENCH / "depth_transfer.py"), "--depths", "1,2,3", "--lrs", "0.01", "--seeds", "1", "--steps", "2",
                  "--parametrizations", "completep", "--cache-dir", str(cache_dir), "--out", str(tmp_path))
    assert "1 runs to train (2 already" in again  # a sweep started again, or grown, trains only what is missing
    result = json.loads((tmp_path / "depth_transfer.json").read_text())
    assert [r["depth"] for r in result["mean"]] == [1, 2, 3] and result["steps"] == 2


@pytest.mark.slow  # three sweeps in worker processes: ~30 s on 2 busy cores
def test_mup_transfer_records_each_run_at_once_and_resumes_a_killed_sweep(tmp_path, cache_dir):
    args = [str(BENCH / "mup_transfer.py"), "--widths", "16,32", "--lrs", "0.01", "--lrs-at", "32=0.005,0.01,0.02",
            "--steps", "2", "--seeds", "2", "--eval-batches", "2", "--jobs", "2", "--cache-dir", str(cache_dir),
            "--out", str(tmp_path)]
    out = bench(*args)
    assert "8 runs to train (0 already" in out
    log = tmp_path / "runs.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 8 and all(9 < json.loads(line)["val_loss"] < 11 for line in lines)
    # a kill mid-write leaves a cut line and loses two runs: the same command trains those two again, no others
    log.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    out = bench(*args)
    assert "3 runs to train (5 already" in out
    result = json.loads((tmp_path / "mup_transfer.json").read_text())
    assert sorted((r["width"], r["lr"], r["seeds"]) for r in result["mean"]) == [
        (16, 0.01, 2), (32, 0.005, 2), (32, 0.01, 2), (32, 0.02, 2)]
    assert list(result["best_lr_fit"]["mup"]) == ["32"]  # only 32 has 3 lrs to fit a parabola through
    assert list(result["best_lr_grid"]["mup"]) == ["32"]  # nor a best lr for 16, trained at one
    assert [(s["lr"], s["narrow"], s["wide"], s["seeds"]) for s in result["width_steps"]["mup"]] == [(0.01, 16, 32, 2)]
    # a run of another setup in the same dir is not averaged with these
    with log.open("a") as f:
        f.write(json.dumps({**json.loads(lines[0]), "steps": 3}) + "\n")
    with pytest.raises(subprocess.CalledProcessError) as failed:
        bench(str(BENCH / "mup_transfer.py"), "--report-only", "--out", str(tmp_path))
    assert "error: the runs in" in failed.value.stderr and "differ in steps ([2, 3])" in failed.value.stderr


def test_mup_transfer_pairs_widths_by_seed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from mup_transfer import width_steps

    loss = {(64, 0): 6.0, (64, 1): 6.4, (64, 2): 5.9, (128, 0): 5.8, (128, 1): 6.3, (128, 2): 5.95}
    runs = [{"parametrization": "mup", "width": w, "lr": 1e-3, "seed": s, "val_loss": v} for (w, s), v in loss.items()]
    runs.append({"parametrization": "mup", "width": 256, "lr": 2e-3, "seed": 0, "val_loss": 5.0})  # alone at its lr
    [step] = width_steps(runs, "mup")
    diffs = [-0.2, -0.1, 0.05]
    assert (step["narrow"], step["wide"], step["seeds"], step["improved"]) == (64, 128, 3, 2)
    assert step["mean_diff"] == pytest.approx(sum(diffs) / 3)
    expected = stats.ttest_rel([loss[128, s] for s in range(3)], [loss[64, s] for s in range(3)]).pvalue
    assert step["p"] == pytest.approx(expected) and 0.2 < step["p"] < 0.6


@pytest.mark.slow
def test_muon_bench_widens_an_edge_optimum_for_both_arms(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(20000)))
    out = bench(str(BENCH / "muon.py"), "--data-path", str(corpus), "--steps", "3", "--adamw-lrs", "0.001,0.01",
                "--muon-lrs", "0.001,0.01", "--tune-seeds", "7", "--test-seeds", "1,2", "--out", str(tmp_path / "out"))
    tuned = re.search(r"tuned: adamw optim.lr=([\d.e-]+); muon optim.muon_lr=([\d.e-]+) with optim.lr=([\d.e-]+)", out)
    assert tuned and tuned.group(1) == tuned.group(3), out  # Muon's AdamW part at AdamW's own best lr
    # a grid of two lrs has its best at an edge: each arm tried the next lrs out (10x steps) before choosing
    for arm in ("adamw", "muon"):
        widened = {float(p.name.removeprefix("widened_")) for p in (tmp_path / "out" / f"tune_{arm}").glob("widened_*")}
        assert widened and widened <= {1e-5, 1e-4, 0.1, 1.0}, (arm, widened)
        assert len(list((tmp_path / "out" / f"tune_{arm}").glob("widened_*/*/summary.json"))) == len(widened)
    rows = json.loads((tmp_path / "out" / "compare_final_val_loss" / "compare.json").read_text())
    assert sorted(row["n"] for row in rows) == [2, 2]


def test_isoflop_grid_spends_each_budget_in_whole_steps(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    from isoflop_grid import VOCAB, BLOCK, grid_commands
    from gpt_exp.shapes import flops_per_token

    commands = grid_commands([(2, 4), (2, 32)], [5e11, 4e12], tmp_path, ["B=8", "T=32", "data.order=shuffled"])
    for command, width in zip(commands, (4, 32)):
        tokens = [int(v) for v in next(a for a in command if a.startswith("train.max_tokens=")).split("=")[1].split(",")]
        fpt = flops_per_token(2, width, VOCAB, BLOCK, 32)
        assert all(t % (8 * 32) == 0 for t in tokens)  # whole steps of B x T: the trainer does not overshoot
        assert [abs(t * fpt - c) <= 8 * 32 * fpt / 2 for t, c in zip(tokens, (5e11, 4e12))] == [True, True]
        assert ["B=8", "T=32", "data.order=shuffled"] == [a for a in command if a[:2] in ("B=", "T=") or "order" in a]


def test_isoflop_grid_runs_shapes_side_by_side_with_a_log_each(monkeypatch, tmp_path, capsys):
    """--jobs 2: each shape's multirun gets half the cores' threads and its own log; a failed shape is counted and
    the others still run."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    from isoflop_grid import run_shapes

    echo = "import sys; print(sys.argv[1:]); sys.exit('E8' in sys.argv[1])"
    commands = [[sys.executable, "-c", echo, f"hydra.sweep.dir={tmp_path / f'L2_E{w}'}", f"train.max_tokens={t}"]
                for w, t in ((4, "800,1600"), (8, "400,800"), (16, "200,400"))]
    assert run_shapes(commands, 2, tmp_path) == 1
    logs = {w: (tmp_path / f"L2_E{w}.log").read_text() for w in (4, 8, 16)}
    assert all("'device.threads=2'" in log for log in logs.values())
    out = capsys.readouterr().out
    assert "L2_E8: FAILED (exit 1)" in out and out.count(": done in") == 2


def test_best_lr_interval_uses_only_seeds_trained_at_every_lr(monkeypatch):
    """Seeds added later at one lr (to test widths against each other there) must not enter the best lr's parabola:
    that lr's mean would then be over other batch orders than its neighbours'."""
    monkeypatch.syspath_prepend(str(BENCH))
    from lr_sweep import best_lr_interval

    grid = {(1e-3, 0): 7.10, (2e-3, 0): 7.00, (4e-3, 0): 7.05, (1e-3, 1): 7.12, (2e-3, 1): 7.01, (4e-3, 1): 7.09,
            (1e-3, 2): 7.08, (2e-3, 2): 6.99, (4e-3, 2): 7.04}
    runs = [{"parametrization": "mup", "width": 64, "lr": lr, "seed": s, "val_loss": v} for (lr, s), v in grid.items()]
    alone = best_lr_interval(runs, "mup", "width", 64)
    later = runs + [{"parametrization": "mup", "width": 64, "lr": 2e-3, "seed": s, "val_loss": 6.5} for s in (3, 4)]
    assert best_lr_interval(later, "mup", "width", 64) == alone
    losses = [sum(grid[lr, s] for s in range(3)) / 3 for lr in (1e-3, 2e-3, 4e-3)]
    x = np.log([1e-3, 2e-3, 4e-3])
    a, b, _ = np.polyfit(x, losses, 2)
    assert alone["lr"] == pytest.approx(math.exp(-b / (2 * a))) and alone["low"] <= alone["lr"] <= alone["high"]


def test_mup_transfer_tests_the_trend_over_all_widths_at_once(monkeypatch):
    """The slope per doubling of the width, a line per seed over every width, t-tested: one test of "wider is
    better" rather than three of small steps. A seed missing a width is left out; two widths make no trend."""
    monkeypatch.syspath_prepend(str(BENCH))
    from mup_transfer import width_trends

    slopes = {0: -0.02, 1: -0.01, 2: -0.035}  # per doubling; plus a wiggle that the line must average out
    runs = [{"parametrization": "mup", "width": w, "lr": 2e-3, "seed": s, "val_loss": 7.0 + k * slope + wiggle}
            for s, slope in slopes.items() for k, (w, wiggle) in enumerate(((64, 0.01), (128, -0.02), (256, 0.01)))]
    runs.append({"parametrization": "mup", "width": 64, "lr": 2e-3, "seed": 9, "val_loss": 9.0})  # one width only
    runs += [{"parametrization": "mup", "width": w, "lr": 1e-3, "seed": 0, "val_loss": 7.0} for w in (64, 512)]
    [trend] = width_trends(runs, "mup")
    fitted = [np.polyfit([6, 7, 8], [r["val_loss"] for r in runs if r["seed"] == s][:3], 1)[0] for s in slopes]
    assert fitted == pytest.approx(list(slopes.values()))  # the wiggle is symmetric about the middle width
    assert (trend["lr"], trend["widths"], trend["seeds"], trend["improved"]) == (2e-3, [64, 128, 256], 3, 3)
    assert trend["slope"] == pytest.approx(np.mean(fitted))
    assert trend["p"] == pytest.approx(stats.ttest_1samp(fitted, 0.0).pvalue)
