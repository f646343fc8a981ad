"""Tests for what compare computes to compare runs fairly: the x axis and the common point on it, seed groups'
curves on a common grid, Welch's t-test against a baseline, --target, and the legends. The expected numbers are
computed here from the formulas, independently of compare.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from gpt_exp.compare import (
    compare_table,
    format_table,
    curve_label,
    default_x,
    holm,
    load_runs,
    loss_curves,
    main,
    seeds_needed,
    short_value,
    varying_keys,
)
from gpt_exp.metrics import read_metrics
from gpt_exp.plots import loss_figure, overlay_figure, plot_loss_curve, robust_ylim
from gpt_exp.shapes import flops_per_token
from tests.test_compare import make_run

A = [3.1, 3.3, 3.2, 3.5]  # final losses of four seeds at lr=1e-3
BASE = [3.6, 3.4, 3.9]  # and of three at lr=3e-4, the baseline


def seed_groups(root: Path, groups: dict[float, list[float]]) -> None:
    """One run per (lr, final loss), seeds 0, 1, ... within each lr."""
    for lr, finals in groups.items():
        for seed, final in enumerate(finals):
            make_run(root / f"{lr}-{seed}", [5.0, final], lr=lr, seed=seed)


def welch_expected(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """(mean difference, CI low, CI high, two-sided p) from the Welch-Satterthwaite formulas."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    diff, se = np.mean(a) - np.mean(b), math.sqrt(va + vb)
    half = stats.t.ppf(0.975, dof) * se
    return diff, diff - half, diff + half, 2 * stats.t.sf(abs(diff) / se, dof)


def seeds_expected(a: list[float], b: list[float]) -> int:
    """The smallest n per side at which a two-sided Student t-test at 0.05 has 80% power, by brute force."""
    pooled = math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / (len(a) + len(b) - 2))
    return seeds_for(abs(np.mean(a) - np.mean(b)) / pooled)


def seeds_for(effect: float) -> int:
    """The same for a difference of `effect` standard deviations."""
    for n in range(2, 10_000):
        df, nc = 2 * n - 2, effect * math.sqrt(n / 2)
        critical = stats.t.ppf(0.975, df)
        if stats.nct.sf(critical, df, nc) + stats.nct.cdf(-critical, df, nc) >= 0.8:
            return n
    raise AssertionError("no n found")


def test_welch_difference_ci_p_and_seeds_match_the_formulas(tmp_path: Path) -> None:
    seed_groups(tmp_path, {1e-3: A, 3e-4: BASE})
    rows = {r["optim.lr"]: r for r in compare_table(load_runs([str(tmp_path)]), baseline=["optim.lr=3e-4"])}
    diff, low, high, p = welch_expected(A, BASE)
    tested = rows[1e-3]
    assert tested["baseline_diff"] == pytest.approx(diff, rel=1e-12) and diff == pytest.approx(3.275 - 3.6 - 0.1 / 3)
    assert (tested["baseline_ci_low"], tested["baseline_ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert tested["baseline_p"] == pytest.approx(p, rel=1e-9)
    assert tested["baseline_p"] == pytest.approx(stats.ttest_ind(A, BASE, equal_var=False).pvalue, rel=1e-12)
    assert tested["seeds_needed"] == seeds_expected(A, BASE) == 7
    assert tested["baseline_note"] is None
    assert rows[3e-4]["baseline_note"] == "baseline" and rows[3e-4]["baseline_p"] is None


def test_seed_count_is_the_t_test_one() -> None:
    # The textbook sample sizes of a two-sided two-sample t-test at alpha 0.05 and 80% power: 64 per group for
    # half a standard deviation and 17 for one (the normal approximation says 63 and 16).
    assert seeds_needed(0.5, 1.0) == 64
    assert seeds_needed(-1.0, 1.0) == 17
    assert seeds_needed(0.0, 1.0) is None  # no difference to resolve
    assert seeds_needed(0.3, 0.0) == 2  # no spread: the fewest a t-test takes


def test_baseline_columns_in_the_table_csv_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    seed_groups(tmp_path / "sweep", {1e-3: A, 3e-4: BASE, 1e-4: [4.5]})
    assert main([str(tmp_path / "sweep"), "--baseline", "optim.lr=0.0003", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, best, base, single = lines[:4]
    assert header.split()[:6] == ["optim.lr", "n", "data", "varies", "final_loss", "best_loss"]
    assert "Δfinal_loss" in header and "95% CI" in header and "p (Welch)" in header and "seeds/side" in header
    diff, low, high, p = welch_expected(A, BASE)
    assert best.split()[:3] == ["0.001", "4", "no"]
    assert f" {diff:+.4f} " in best and f" [{low:+.4f}, {high:+.4f}] " in best and f" {p:.3g} " in best
    assert "baseline" in base
    assert f"{4.5 - np.mean(BASE):+.4f}" in single and "n=1: no test" in single  # one seed: the difference only
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [r["baseline_note"] for r in rows] == [None, "baseline", "n=1: no test"]
    assert rows[0]["baseline_p"] == pytest.approx(p) and rows[2]["baseline_p"] is None
    csv_header = (tmp_path / "compare.csv").read_text().splitlines()[0].split(",")
    assert {"baseline_diff", "baseline_ci_low", "baseline_ci_high", "baseline_p", "seeds_needed"} <= set(csv_header)


def test_a_single_run_baseline_tests_nothing(tmp_path: Path) -> None:
    seed_groups(tmp_path, {1e-3: A, 3e-4: [3.6]})
    rows = {r["optim.lr"]: r for r in compare_table(load_runs([str(tmp_path)]), baseline=["optim.lr=0.0003"])}
    assert rows[1e-3]["baseline_note"] == "n=1: no test"
    assert rows[1e-3]["baseline_diff"] == pytest.approx(np.mean(A) - 3.6)
    assert rows[1e-3]["baseline_p"] is None and rows[1e-3]["seeds_needed"] is None


def test_baseline_on_best_loss_and_a_group_choice(tmp_path: Path) -> None:
    for seed, (final, best) in enumerate([(3.0, 2.0), (3.0, 2.5), (3.0, 2.25)]):
        make_run(tmp_path / f"a{seed}", [best, final], seed=seed, config={"model": {"name": "tiny"}})
        make_run(tmp_path / f"b{seed}", [best + 1, final + 1], seed=seed, config={"model": {"name": "small"}})
    runs = load_runs([str(tmp_path)])
    rows = {r["model.name"]: r for r in compare_table(runs, "best_loss", baseline=["model=tiny"])}
    assert rows["small"]["baseline_diff"] == pytest.approx(1.0)
    assert rows["small"]["baseline_p"] == pytest.approx(welch_expected([3, 3.5, 3.25], [2, 2.5, 2.25])[3])


@pytest.mark.parametrize("args, expected", [
    (["--baseline", "optim.lr"], "error: --baseline optim.lr must be KEY=VALUE, e.g. --baseline optim.lr=0.001\n"),
    (["--baseline", "optim.lr=0.01"], "error: --baseline optim.lr=0.01 matches no run; optim.lr is 0.0003, 0.001 "
                                      "in these runs\n"),
    (["--baseline", "optim.lrr=0.01"], "error: --baseline optim.lrr=0.01: optim.lrr is not a config key of these "
                                       "runs; the swept keys are B, optim.lr\n"),
    (["--baseline", "optim.lr=1e-3"], "error: --baseline optim.lr=1e-3 matches 2 configurations (B=4, B=16); add "
                                      "--baseline B=VALUE to pick one\n"),
    (["--baseline", "B=4", "--metric", "steps"], "error: --baseline tests a loss; use --metric final_loss, "
                                                 "best_loss, final_val_loss, loss_at_x, final_val_bpb (or a "
                                                 "mixture's final_val_bpb/NAME, ...), not --metric steps\n"),
    (["--target", "nan"], "error: --target nan must be a finite loss, e.g. --target 3.5\n"),
])
def test_bad_baseline_or_target_is_one_line(tmp_path: Path, capsys, args: list[str], expected: str) -> None:
    for lr, B in ((1e-3, 4), (1e-3, 16), (3e-4, 4)):
        make_run(tmp_path / f"{lr}-{B}", [4.0, 3.0], lr=lr, B=B)
    assert main([str(tmp_path), "--out", str(tmp_path / "report"), *args]) == 2
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "report").exists()


def test_target_crossing_is_interpolated_in_tokens_and_time(tmp_path: Path) -> None:
    # B=4, T=32: 128 tokens per step, so the losses 4, 3, 2, 1 are logged at 128, 256, 384, 512 tokens and (10 ms
    # a step) at 0.01 .. 0.04 s: 2.5 is crossed halfway between the 2nd and 3rd rows, at 320 tokens and 0.025 s.
    make_run(tmp_path / "fast", [4.0, 3.0, 2.0, 1.0], lr=1e-3)
    make_run(tmp_path / "slow", [4.0, 3.5, 3.0, 2.75], lr=3e-4)
    make_run(tmp_path / "timed", [4.0, 2.0, 1.5, 1.0], lr=1e-4, columns={"elapsed_s": [1.0, 3.0, 4.0, 5.0]})
    rows = {r["optim.lr"]: r for r in compare_table(load_runs([str(tmp_path)]), target=2.5)}
    assert rows[1e-3]["tokens_to_target"] == pytest.approx(320.0)
    assert rows[1e-3]["time_to_target"] == pytest.approx(0.025)
    assert (rows[3e-4]["tokens_to_target"], rows[3e-4]["time_to_target"]) == (None, None)  # never reached
    assert rows[3e-4]["runs_reached_target"] == 0 and rows[1e-3]["runs_reached_target"] == 1
    assert rows[1e-4]["tokens_to_target"] == pytest.approx(128 + 128 * 0.75)  # 4 -> 2 between 128 and 256 tokens
    assert rows[1e-4]["time_to_target"] == pytest.approx(2.5)  # elapsed_s, not the sum of dt_ms
    assert rows[1e-3]["target_note"] == "n=1: no test" and rows[1e-3]["p_below_target"] is None
    # smoothed over 2 steps the fast run is at 3.5, 2.5 at 256, 384 tokens: it reaches 2.5 at 384
    smoothed = {r["optim.lr"]: r for r in compare_table(load_runs([str(tmp_path)]), target=2.5, smooth=2)}
    assert smoothed[1e-3]["tokens_to_target"] == pytest.approx(384.0)


def test_target_p_value_is_one_sided_below(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    finals = [2.0, 2.2, 2.4]
    seed_groups(tmp_path / "sweep", {1e-3: finals, 3e-4: [2.6, 2.9]})
    assert main([str(tmp_path / "sweep"), "--target", "2.5", "--out", str(tmp_path)]) == 0
    rows = {r["optim.lr"]: r for r in json.loads((tmp_path / "compare.json").read_text())}
    t = (np.mean(finals) - 2.5) / (np.std(finals, ddof=1) / math.sqrt(3))
    assert rows[1e-3]["p_below_target"] == pytest.approx(stats.t.cdf(t, 2), rel=1e-9)
    t = (2.75 - 2.5) / (np.std([2.6, 2.9], ddof=1) / math.sqrt(2))
    assert rows[3e-4]["p_below_target"] == pytest.approx(stats.t.cdf(t, 1), rel=1e-9)
    assert rows[3e-4]["tokens_to_target"] is None
    # every seed of 1e-3 went from 5.0 to below 2.5 in its second step (128 -> 256 tokens)
    expected = np.mean([128 + 128 * (5.0 - 2.5) / (5.0 - f) for f in finals])
    assert rows[1e-3]["tokens_to_target"] == pytest.approx(expected)
    header = capsys.readouterr().out.splitlines()[0]
    assert "p(final_loss<2.5)" in header and "tokens to 2.5" in header and "time to 2.5" in header


def test_batch_sizes_compare_at_the_tokens_both_reached(tmp_path: Path) -> None:
    # B=4: 128 tokens a step, 6 steps -> 768 tokens; B=16: 512 tokens a step, 8 steps -> 4096 tokens.
    make_run(tmp_path / "b4", [6.0, 5.0, 4.5, 4.0, 3.75, 3.5], B=4)
    make_run(tmp_path / "b16", [5.0, 3.0, 2.5, 2.25, 2.0, 1.9, 1.8, 1.7], B=16)
    runs = load_runs([str(tmp_path)])
    assert default_x(runs) == "tokens"
    rows = {r["B"]: r for r in compare_table(runs)}  # the default: x=tokens
    assert rows[4]["x_axis"] == "tokens" and rows[4]["x_common"] == 768.0
    assert rows[4]["loss_at_x"] == 3.5  # its last step
    assert rows[16]["loss_at_x"] == pytest.approx(4.0)  # 768 is halfway from 512 (5.0) to 1024 (3.0)
    by_step = {r["B"]: r for r in compare_table(runs, x="step")}
    assert by_step[16]["x_common"] == 5.0 and by_step[16]["loss_at_x"] == 1.9
    # --smooth 2 averages over the same tokens in both: 2 steps of B=16 (1024 tokens), 8 steps of B=4
    smoothed = {r["B"]: r for r in compare_table(runs, x="tokens", smooth=2)}
    assert smoothed[4]["loss_at_x"] == pytest.approx(np.mean([6.0, 5.0, 4.5, 4.0, 3.75, 3.5]))
    assert smoothed[16]["loss_at_x"] == pytest.approx((5.0 + 4.0) / 2)  # halfway from 5.0 to mean(5, 3)


def test_the_table_shows_loss_at_the_common_x(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_run(tmp_path / "b4", [6.0, 5.0, 4.5, 4.0, 3.75, 3.5], B=4)
    make_run(tmp_path / "b16", [5.0, 3.0, 2.5, 2.25, 2.0, 1.9, 1.8, 1.7], B=16)
    assert main([str(tmp_path), "--out", str(tmp_path)]) == 0
    header, first, second = capsys.readouterr().out.splitlines()[:3]
    assert header.split()[:5] == ["B", "final_loss", "best_loss", "loss@768", "tokens"]
    assert first.split()[:4] == ["16", "1.7000", "1.7000", "4.0000"]
    assert second.split()[:4] == ["4", "3.5000", "3.5000", "3.5000"]


def test_default_x(tmp_path: Path) -> None:
    make_run(tmp_path / "a" / "0", [3.0, 2.0], lr=1e-3)
    make_run(tmp_path / "a" / "1", [3.0, 2.0], lr=3e-4)
    assert default_x(load_runs([str(tmp_path / "a")])) == "step"  # same tokens per step
    make_run(tmp_path / "a" / "2", [3.0, 2.0], B=8)
    assert default_x(load_runs([str(tmp_path / "a")])) == "tokens"
    make_run(tmp_path / "a" / "3", [3.0, 2.0], B=16, drop=("tokens",))  # rows that cannot say
    assert default_x(load_runs([str(tmp_path / "a")])) == "step"


def test_flops_and_time_axes_and_their_fallbacks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_run(tmp_path / "new", [3.0, 2.0], lr=1e-3, columns={"flops": [1e9, 2e9], "elapsed_s": [0.5, 1.5]})
    make_run(tmp_path / "summary", [3.0, 2.5, 2.0], lr=3e-4, summary_extra={"flops_per_token": 1e6})
    runs = load_runs([str(tmp_path / "new"), str(tmp_path / "summary")])
    rows = {r["optim.lr"]: r for r in compare_table(runs, x="flops")}
    assert runs[1].curve_flops.tolist() == [128e6, 256e6, 384e6]  # 128 tokens a step * 1e6 FLOPs per token
    assert rows[1e-3]["x_common"] == 384e6  # as far as the older run got
    assert rows[3e-4]["loss_at_x"] == 2.0 and rows[1e-3]["loss_at_x"] is None  # its first row is at 1e9
    assert runs[0].curve_elapsed.tolist() == [0.5, 1.5] and runs[1].curve_elapsed.tolist() == [0.01, 0.02, 0.03]
    make_run(tmp_path / "old", [3.0, 2.0], lr=1e-4)
    assert main([str(tmp_path / "new"), str(tmp_path / "old"), "--x", "flops", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: --x flops needs runs made by this version of gpt_exp "
                                       f"({tmp_path / 'old' / 'metrics.jsonl'} has no flops and "
                                       f"{tmp_path / 'old' / 'summary.json'} no flops_per_token); use --x tokens\n")
    shape = {"n_layer": 2, "n_embd": 32, "vocab_size": 50257, "block_size": 256}  # T=32: make_run's
    make_run(tmp_path / "older", [3.0, 2.0], lr=1e-4, config={"model": shape})
    fpt = flops_per_token(2, 32, 50257, 256, 32)  # a run older than summary.json's flops_per_token: the shape's
    assert load_runs([str(tmp_path / "older")])[0].curve_flops.tolist() == [128 * fpt, 256 * fpt]
    make_run(tmp_path / "untimed", [3.0, 2.0], lr=1e-5, drop=("dt_ms",))
    assert main([str(tmp_path / "new"), str(tmp_path / "untimed"), "--x", "time", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: --x time needs elapsed_s or dt_ms in every row of "
                                       f"{tmp_path / 'untimed' / 'metrics.jsonl'}; use --x step\n")


def test_seed_group_curve_is_averaged_on_a_common_x_grid(tmp_path: Path) -> None:
    # Two seeds that logged the same steps at different wall times: the mean is taken at equal seconds.
    make_run(tmp_path / "0", [4.0, 3.0, 2.0], seed=0, columns={"elapsed_s": [1.0, 2.0, 3.0]})
    make_run(tmp_path / "1", [5.0, 4.0, 3.0], seed=1, columns={"elapsed_s": [1.5, 2.5, 3.5]})
    (curve,) = loss_curves(load_runs([str(tmp_path)]), x="time")
    np.testing.assert_allclose(curve.x, [1.5, 2.0, 2.5, 3.0])  # where both have a value
    seed0, seed1 = np.array([3.5, 3.0, 2.5, 2.0]), np.array([5.0, 4.5, 4.0, 3.5])
    np.testing.assert_allclose(curve.loss, (seed0 + seed1) / 2)
    np.testing.assert_allclose(curve.std, np.std([seed0, seed1], axis=0, ddof=1))


def test_data_varies_says_whether_seeds_read_different_batches(tmp_path: Path) -> None:
    for seed in (0, 1):
        make_run(tmp_path / f"shuffled{seed}", [3.0], lr=1e-3, seed=seed, config={"data": {"order": "shuffled"}})
        make_run(tmp_path / f"sequential{seed}", [3.0], lr=3e-4, seed=seed, config={"data": {"order": "sequential"}})
        make_run(tmp_path / f"older{seed}", [3.0], lr=1e-4, seed=seed)  # before data.order existed
    make_run(tmp_path / "single", [3.0], lr=1e-5, config={"data": {"order": "shuffled"}})
    rows = {r["optim.lr"]: r for r in compare_table(load_runs([str(tmp_path)]))}
    assert [rows[lr]["data_varies"] for lr in (1e-3, 3e-4, 1e-4, 1e-5)] == ["yes", "no", "no", None]


def test_legend_names_only_the_swept_keys_short(tmp_path: Path) -> None:
    bookkeeping = {"train": {"ckpt_every": 0, "keep_ckpts": 2, "log_every": 1, "eval_batches": 20},
                   "device": {"threads": None}, "resume": None, "hydra": {"run": {"dir": "x"}}}
    for i, (lr, B) in enumerate([(1e-3, 4), (3.162e-4, 16)]):
        config = {section: {k: f"{v}-{i}" for k, v in values.items()} if isinstance(values, dict) else f"r{i}"
                  for section, values in bookkeeping.items()}
        make_run(tmp_path / str(i), [3.0 - i], lr=lr, B=B, config=config)
    runs = load_runs([str(tmp_path)])
    assert varying_keys(runs) == ["B", "optim.lr"]  # logger.name, data.cache_dir and the bookkeeping differ too
    curves = loss_curves(runs, best=str(tmp_path / "1"))
    assert [c.label for c in curves] == ["B=4 lr=1e-3", "B=16 lr=3.162e-4 (best)"]
    assert [c.best for c in curves] == [False, True]
    assert curve_label(["model.name", "optim.lr", "sched.lr"], {"model.name": "tiny", "optim.lr": 6e-4,
                                                                "sched.lr": 0.5}, n=3) \
        == "model=tiny optim.lr=6e-4 sched.lr=0.5 (n=3)"  # equal short names keep their section
    assert [short_value(v) for v in (0.95, 1e-5, 23456.0, 0.1, 3, (0.9, 0.95), 0.0)] == \
        ["0.95", "1e-5", "2.346e4", "0.1", "3", "0.9,0.95", "0"]


def test_the_plot_has_val_lr_and_the_best_curve(tmp_path: Path) -> None:
    make_run(tmp_path / "0", [5.0, 4.0, 3.0], lr=1e-3, val_losses=[3.25])
    make_run(tmp_path / "1", [5.0, 4.5, 4.0], lr=3e-4)
    assert main([str(tmp_path), "--out", str(tmp_path), "--logy", "--x", "tokens"]) == 0
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best, other = loss_curves(load_runs([str(tmp_path)]), x="tokens", best=str(tmp_path / "0"))
    assert best.label == "lr=1e-3 (best)" and other.label == "lr=3e-4"
    np.testing.assert_allclose(best.val_x, [384.0])  # its val row's step 3 is past the last row: 384 tokens
    np.testing.assert_allclose(best.lr, [1e-3] * 3)
    assert other.val_x is None
    fig = overlay_figure([best, other], "sweep", x="tokens", logy=True)
    loss_ax, lr_ax = fig.axes
    assert [t.get_text() for t in fig.legends[0].texts] == ["lr=1e-3 (best)", "lr=3e-4", "val loss"]
    fig.canvas.draw()  # lays the figure out: the legend sits under both panels, not on them
    assert fig.legends[0].get_window_extent().y1 < lr_ax.get_tightbbox().y0
    best_line, val_line, other_line = loss_ax.get_lines()
    assert best_line.get_linewidth() > other_line.get_linewidth()
    assert (val_line.get_linestyle(), val_line.get_color()) == ("--", best_line.get_color())
    assert (lr_ax.get_ylabel(), lr_ax.get_xlabel(), loss_ax.get_yscale()) == ("lr", "tokens", "log")


def test_loss_png_smooths_keeps_the_spike_off_the_scale_and_uses_tokens(tmp_path: Path) -> None:
    losses = list(np.linspace(6.0, 3.0, 100))
    losses[60] = 40.0  # one spike
    run = make_run(tmp_path / "run", losses, val_losses=[3.1])
    rows = read_metrics(run / "metrics.jsonl") + [{"step": 100, "skipped": "non-finite loss"}]
    fig = loss_figure(rows, "run")
    loss_ax, lr_ax = fig.axes
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == \
        ["train loss", "train loss, mean of 2 steps", "val loss"]
    assert 6.0 < loss_ax.get_ylim()[1] < 8.0 and loss_ax.get_ylim()[0] < 3.0
    assert (lr_ax.get_xlabel(), lr_ax.get_ylabel()) == ("tokens", "lr")
    np.testing.assert_allclose(loss_ax.get_lines()[0].get_xdata()[[0, -1]], [128, 12800])
    without_tokens = [{k: v for k, v in r.items() if k != "tokens"} for r in rows]
    assert loss_figure(without_tokens, "run").axes[-1].get_xlabel() == "step"
    plot_loss_curve(rows, tmp_path / "loss.png", "run")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_y_limits_ignore_one_spike() -> None:
    losses = np.concatenate([np.linspace(4.0, 3.0, 100), [50.0]])
    low, high = robust_ylim(losses)
    assert low < 3.0 and 4.0 < high < 5.0
    assert robust_ylim(np.array([3.0, 2.0])) == pytest.approx((1.95, 3.05))  # a few points: all of them
    assert robust_ylim(np.array([np.nan])) is None


def holm_by_hand(p: list[float]) -> list[float]:
    """Holm (1979): sorted ascending, p_(i) x (m - i + 1), each at least the one before, capped at 1."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    adjusted, previous = {}, 0.0
    for rank, i in enumerate(order):
        previous = adjusted[i] = max(previous, min(1.0, (len(p) - rank) * p[i]))
    return [adjusted[i] for i in range(len(p))]


def test_holm_adjusts_the_p_values_of_several_groups_against_one_baseline(tmp_path, capsys) -> None:
    C, D = [3.55, 3.45, 3.7], [3.0, 3.1, 2.95, 3.05]
    seed_groups(tmp_path / "sweep", {1e-3: A, 3e-4: BASE, 1e-4: C, 3e-3: D})
    assert main([str(tmp_path / "sweep"), "--baseline", "optim.lr=3e-4", "--out", str(tmp_path)]) == 0
    rows = {r["optim.lr"]: r for r in json.loads((tmp_path / "compare.json").read_text())}
    raw = [stats.ttest_ind(g, BASE, equal_var=False).pvalue for g in (A, C, D)]
    assert [rows[lr]["baseline_p"] for lr in (1e-3, 1e-4, 3e-3)] == pytest.approx(raw, rel=1e-12)
    adjusted = holm_by_hand(raw)
    assert [rows[lr]["baseline_p_holm"] for lr in (1e-3, 1e-4, 3e-3)] == pytest.approx(adjusted, rel=1e-12)
    # D the smallest p (0.047) x 3 = 0.14, then A's (0.114) x 2 = 0.23, then C's (0.71) x 1
    assert adjusted == pytest.approx([2 * raw[0], raw[1], 3 * raw[2]]) and adjusted[2] > 0.05 > raw[2]
    assert rows[3e-4]["baseline_p_holm"] is None
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    assert "p (Welch)  p (Holm)  seeds/side (post hoc)" in header
    d_line = next(line for line in lines if line.startswith("0.003 "))
    assert d_line.split()[8:10] == [f"{raw[2]:.3g}", f"{adjusted[2]:.3g}"] == ["0.0467", "0.14"]
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.2]) == [0.5, 0.4] and holm([0.6, 0.7]) == [1.0, 1.0]  # non-decreasing, capped at 1


def test_seeds_needed_is_post_hoc_unless_an_effect_is_given(tmp_path, capsys) -> None:
    seed_groups(tmp_path / "sweep", {1e-3: A, 3e-4: BASE})
    assert main([str(tmp_path / "sweep"), "--baseline", "optim.lr=3e-4", "--effect", "0.1", "--out",
                 str(tmp_path)]) == 0
    assert "seeds/side for Δ=0.1" in capsys.readouterr().out.splitlines()[0]
    row = next(r for r in json.loads((tmp_path / "compare.json").read_text()) if r["optim.lr"] == 1e-3)
    pooled = math.sqrt((3 * np.var(A, ddof=1) + 2 * np.var(BASE, ddof=1)) / 5)
    observed = seeds_expected(A, BASE)  # 7 for the observed difference of 0.358
    assert row["seeds_needed"] == seeds_for(0.1 / pooled) == 69 > observed
    assert (row["seeds_needed_effect"], row["seeds_needed_post_hoc"]) == (0.1, False)
    rows = compare_table(load_runs([str(tmp_path / "sweep")]), baseline=["optim.lr=3e-4"])
    assert rows[0]["seeds_needed"] == observed and rows[0]["seeds_needed_post_hoc"] is True


@pytest.mark.parametrize("args, expected", [
    (["--baseline", "optim.lr=3e-4", "--effect", "0"], "--effect 0.0 must be a positive difference in the metric, "
                                                       "e.g. --effect 0.02"),
    (["--effect", "0.1"], "--effect sizes the seeds of --baseline's test; add --baseline KEY=VALUE"),
])
def test_bad_effect_is_one_line(tmp_path, capsys, args, expected) -> None:
    seed_groups(tmp_path / "sweep", {1e-3: A, 3e-4: BASE})
    assert main([str(tmp_path / "sweep"), *args, "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr() == ("", f"error: {expected}\n")


def test_a_line_says_when_seeds_share_the_data_order(tmp_path, capsys) -> None:
    line = ("seeds share the data order (data.order=sequential: every seed reads the same batches), so the spread "
            "over seeds and the tests measure the init's variance alone; data.order=shuffled gives each seed its own "
            "order")
    for order in ("sequential", "shuffled"):
        for seed in (0, 1):
            make_run(tmp_path / order / str(seed), [3.0 + seed], seed=seed, config={"data": {"order": order}})
        assert main([str(tmp_path / order)]) == 0
        assert (line in capsys.readouterr().out.splitlines()) == (order == "sequential")


def test_baseline_tests_bits_per_byte_overall_and_per_source(tmp_path: Path) -> None:
    """val bpb is a loss (lower is better): --baseline tests it, and a mixture's per-source bpb, with scipy's Welch."""
    bpb = {1e-3: [1.50, 1.52, 1.49], 3e-3: [1.44, 1.47, 1.45]}
    for lr, values in bpb.items():
        for seed, value in enumerate(values):
            run = make_run(tmp_path / f"{lr}-{seed}", [5.0, 4.0], lr=lr, seed=seed)
            with (run / "metrics.jsonl").open("a") as f:  # an evaluation's row, as a data=mix run writes it
                f.write(json.dumps({"step": 1, "val_loss": 3.0, "val_bpb": value, "val_loss/web": 3.1,
                                    "val_bpb/web": value + 0.1}) + "\n")
    runs = load_runs([str(tmp_path)])
    expected = stats.ttest_ind(bpb[3e-3], bpb[1e-3], equal_var=False).pvalue
    for metric in ("final_val_bpb", "final_val_bpb/web"):
        rows = compare_table(runs, metric=metric, baseline=["optim.lr=0.001"])
        tested = next(row for row in rows if row["optim.lr"] == 3e-3)
        assert tested["baseline_diff"] == pytest.approx(np.mean(bpb[3e-3]) - np.mean(bpb[1e-3]))
        assert tested["baseline_p"] == pytest.approx(expected)
        assert tested[f"{metric}_std"] == pytest.approx(np.std(np.array(bpb[3e-3]) + (metric != "final_val_bpb") * 0.1,
                                                               ddof=1))
        table = format_table(rows, tmp_path, metric)
        assert f"{metric}  Δ{metric}" in table.splitlines()[0]  # its own column, ± std, before the test's
