"""Tests for gpt_exp.compare on synthetic run dirs: the table's numbers, seed groups, broken runs, files, errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from gpt_exp.metrics import MetricsError
from gpt_exp.compare import (
    RUNNING,
    CompareError,
    compare_table,
    load_runs,
    loss_curves,
    main,
    varying_keys,
)
from gpt_exp.config import inert_settings
from gpt_exp.plots import moving_average


def make_run(
    run_dir: Path,
    losses: list[float],
    lr: float = 1e-3,
    B: int = 4,
    seed: int = 0,
    status: str | None = "completed",
    val_losses: list[float] = (),
    tail: str = "",
    config: dict | None = None,
    columns: dict[str, list] | None = None,
    drop: tuple[str, ...] = (),
    summary_extra: dict | None = None,
) -> Path:
    """A run dir as `python -m gpt_exp.run` leaves it; status None means no summary.json (still running).
    Each step trains on B*T tokens. config: nested settings merged into the config; columns: more values per step
    row (e.g. {"elapsed_s": [...]}); drop: row keys that older versions did not write."""
    sections = {
        "B": B,
        "T": 32,
        "data": {"name": "shakespeare", "cache_dir": f"/tmp/cache/{run_dir.name}"},
        "model": {"name": "tiny"},
        "train": {"max_steps": 100, "seed": seed},
        "optim": {"lr": lr, "warmup_steps": 2, "weight_decay": 0.1},
        "logger": {"name": f"run-{run_dir.name}", "group": run_dir.parent.name},
    }
    for section, values in (config or {}).items():
        sections[section] = {**sections.get(section, {}), **values} if isinstance(values, dict) else values
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(sections))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optim.lr={lr}", f"train.seed={seed}"]))
    rows = [
        dict(step=s, loss=loss, lr=lr, grad_norm=1.0, dt_ms=10.0, tok_per_s=1e3 * (s + 1), tokens=B * 32 * (s + 1))
        for s, loss in enumerate(losses)
    ]
    for s, row in enumerate(rows):
        row.update({key: values[s] for key, values in (columns or {}).items()})
        for key in drop:
            del row[key]
    rows += [{"step": len(losses), "val_loss": v} for v in val_losses]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    if status is not None:
        summary = {"status": status, "steps": len(losses), "wall_s": 2.5, "tokens": B * 32 * len(losses)}
        summary["median_tok_per_s"] = 1234.0
        if losses:
            summary |= {"final_loss": losses[-1], "best_loss": min(losses)}
        (run_dir / "summary.json").write_text(json.dumps(summary | (summary_extra or {})))
    return run_dir


def test_varying_keys_skip_logger_and_paths(tmp_path: Path) -> None:
    make_run(tmp_path / "0", [3.0], lr=1e-3, B=4)
    make_run(tmp_path / "1", [3.0], lr=3e-4, B=4)
    make_run(tmp_path / "2", [3.0], lr=3e-4, B=8)
    assert varying_keys(load_runs([str(tmp_path)])) == ["B", "optim.lr"]


def test_runs_on_different_data_files_are_not_seeds_of_one_configuration(tmp_path: Path) -> None:
    """data.path is what a run learns from, not where it writes: two corpora are two rows, never one seed group."""
    for seed, corpus in enumerate(("a.txt", "b.txt")):
        make_run(tmp_path / corpus, [3.0 + seed], seed=seed, config={"data": {"path": f"/data/{corpus}"}})
    rows = compare_table(load_runs([str(tmp_path)]))
    assert [(r["data.path"], r["n"]) for r in rows] == [("/data/a.txt", 1), ("/data/b.txt", 1)]


def test_a_setting_a_run_did_not_use_neither_labels_nor_splits_it(tmp_path: Path) -> None:
    """AdamW runs record optim.muon_lr (Muon's default) without using it: beside Muon runs at another muon_lr their
    cell is blank, and AdamW runs launched with two muon_lr values are seeds of one setting."""
    for seed, muon_lr in enumerate((0.01, 0.02)):
        make_run(tmp_path / f"adamw{seed}", [3.0 + seed], seed=seed,
                 config={"optim": {"name": "adamw", "muon_lr": muon_lr, "muon_momentum": 0.95}})
    make_run(tmp_path / "muon", [2.5], config={"optim": {"name": "muon", "muon_lr": 0.005, "muon_momentum": 0.95}})
    rows = compare_table(load_runs([str(tmp_path)]))
    assert [(r["optim.name"], r.get("optim.muon_lr"), r["n"]) for r in rows] == [("muon", 0.005, 1),
                                                                                  ("adamw", None, 2)]
    assert [r["optim.muon_momentum"] for r in rows] == [0.95, None]  # Muon's row only: AdamW's has none


@pytest.mark.parametrize("flat, unused", [
    ({"optim.name": "adamw", "optim.muon_lr": 0.01, "optim.lr": 1e-3}, {"optim.muon_lr"}),
    ({"optim.name": "muon", "optim.muon_lr": 0.01}, set()),
    ({"model.pos": "learned", "model.rope_theta": 1e4}, {"model.rope_theta"}),
    ({"model.pos": "rope", "model.rope_theta": 1e4}, set()),
    ({"model.parametrization": "sp", "model.mup_base_width": 64, "model.depth_base": 2},
     {"model.mup_base_width", "model.depth_base"}),
    ({"model.parametrization": "mup", "model.mup_attn_mult": 1.0, "model.depth_alpha": 1.0}, {"model.depth_alpha"}),
    ({"model.parametrization": "completep", "model.mup_attn_mult": 1.0, "model.depth_alpha": 1.0}, set()),
])
def test_inert_settings_are_those_the_run_never_read(flat: dict, unused: set) -> None:
    assert inert_settings(flat) == unused


def test_losses_come_from_metrics_and_summary(tmp_path: Path) -> None:
    make_run(tmp_path / "done", [5.0, 3.0, 4.0], val_losses=[4.5, 4.25])
    make_run(tmp_path / "going", [6.0, 2.5, 2.75], status=None)
    done, going = load_runs([str(tmp_path / "done"), str(tmp_path / "going")])
    assert (done.final_loss, done.best_loss, done.final_val_loss) == (4.0, 3.0, 4.25)
    assert (done.status, done.steps, done.tokens, done.wall_s) == ("completed", 3, 384, 2.5)
    # Without summary.json every number is read from metrics.jsonl.
    assert (going.final_loss, going.best_loss, going.final_val_loss) == (2.75, 2.5, None)
    assert (going.status, going.steps, going.tokens, going.wall_s) == (RUNNING, 3, 384, None)
    assert going.median_tok_per_s == 2000.0  # median of 1000, 2000, 3000


def test_table_sorted_by_metric_missing_last(tmp_path: Path) -> None:
    make_run(tmp_path / "0", [5.0, 1.0, 3.0], lr=1e-3)  # final 3.0, best 1.0
    make_run(tmp_path / "1", [2.0, 2.0], lr=3e-4)  # final 2.0, best 2.0
    make_run(tmp_path / "2", [], lr=1e-4, status=None)  # started, no step yet
    runs = load_runs([str(tmp_path)])
    by_final = compare_table(runs)
    assert [r["optim.lr"] for r in by_final] == [3e-4, 1e-3, 1e-4]
    assert [r["final_loss"] for r in by_final] == [2.0, 3.0, None]
    assert [r["optim.lr"] for r in compare_table(runs, "best_loss")] == [1e-3, 3e-4, 1e-4]
    assert [r["optim.lr"] for r in compare_table(runs, "optim.lr")] == [1e-4, 3e-4, 1e-3]
    with pytest.raises(CompareError, match="unknown --metric"):
        compare_table(runs, "accuracy")


def test_seeds_grouped_with_mean_and_sample_std(tmp_path: Path) -> None:
    for seed, final in enumerate([1.0, 2.0, 3.0]):
        make_run(tmp_path / str(seed), [6.0, final - 0.5, final], lr=1e-3, seed=seed)
    make_run(tmp_path / "3", [6.0, 4.0], lr=3e-4, seed=0)
    rows = compare_table(load_runs([str(tmp_path)]))
    assert len(rows) == 2 and "train.seed" not in rows[0]
    grouped, single = rows
    assert (grouped["optim.lr"], grouped["n"], grouped["final_loss"], grouped["final_loss_std"]) == (1e-3, 3, 2.0, 1.0)
    assert (grouped["best_loss"], grouped["best_loss_std"]) == (1.5, 1.0)
    assert len(grouped["run_dirs"]) == 3
    assert (single["n"], single["final_loss"], single["final_loss_std"]) == (1, 4.0, None)


def test_seed_curve_is_mean_with_std_band(tmp_path: Path) -> None:
    make_run(tmp_path / "0", [1.0, 2.0, 3.0], seed=0)
    make_run(tmp_path / "1", [3.0, 4.0, 5.0], seed=1)
    make_run(tmp_path / "2", [9.0], seed=2, status="failed")  # stopped early: left out of the mean
    (curve,) = loss_curves(load_runs([str(tmp_path)]))
    assert curve.label == "all seeds (n=2)"
    np.testing.assert_allclose(curve.x, [0, 1, 2])
    np.testing.assert_allclose(curve.loss, [2.0, 3.0, 4.0])
    np.testing.assert_allclose(curve.std, [np.sqrt(2)] * 3)
    (smoothed,) = loss_curves(load_runs([str(tmp_path)]), smooth=2)
    np.testing.assert_allclose(smoothed.loss, [2.0, 2.5, 3.5])


def test_moving_average_keeps_length() -> None:
    np.testing.assert_allclose(moving_average(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(moving_average(np.array([1.0, 2.0]), 1), [1.0, 2.0])


def test_failed_and_running_jobs_in_a_sweep(tmp_path: Path) -> None:
    make_run(tmp_path / "0", [4.0, 3.0], lr=1e-3)
    make_run(tmp_path / "1", [4.0, 8.0], lr=1e-2, status="failed")
    make_run(tmp_path / "2", [4.0, 3.5], lr=3e-4, status=None, tail='{"step": 2, "loss": 3.')
    rows = {r["optim.lr"]: r for r in compare_table(load_runs([str(tmp_path)]))}
    assert (rows[1e-2]["status"], rows[1e-2]["final_loss"]) == ("failed", 8.0)
    assert (rows[3e-4]["status"], rows[3e-4]["final_loss"], rows[3e-4]["steps"]) == (RUNNING, 3.5, 2)


def test_seed_group_uses_completed_runs_and_reports_the_mix(tmp_path: Path) -> None:
    make_run(tmp_path / "0", [1.0], seed=0)
    make_run(tmp_path / "1", [3.0], seed=1)
    make_run(tmp_path / "2", [9.0], seed=2, status="failed")
    (row,) = compare_table(load_runs([str(tmp_path)]))
    assert (row["n"], row["final_loss"], row["status"]) == (2, 2.0, "2 completed, 1 failed")


def test_broken_middle_line_is_an_error(tmp_path: Path) -> None:
    run = make_run(tmp_path / "0", [4.0, 3.0])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", lines[1]]) + "\n")
    with pytest.raises(MetricsError, match="line 2 is not JSON"):
        load_runs([str(run)])


def test_cli_writes_csv_json_png_to_sweep_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "multirun" / "2026-11-25" / "09-01-33"
    (sweep / "multirun.yaml").parent.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    make_run(sweep / "0", [5.0, 4.0, 3.0], lr=1e-3, val_losses=[3.25])
    make_run(sweep / "1", [5.0, 4.5, 4.0], lr=3e-4)
    make_run(sweep / "2", [5.0, 4.75], lr=1e-4, status=None, tail="\n")
    assert main([str(sweep), "--smooth", "2", "--logx"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "final_val_loss" in out and RUNNING in out
    assert (sweep / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((sweep / "compare.json").read_text())
    assert [r["final_loss"] for r in table] == [3.0, 4.0, 4.75]
    assert table[0]["final_val_loss"] == 3.25
    with open(sweep / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["optim.lr"]) for r in rows] == [1e-3, 3e-4, 1e-4]
    assert rows[2]["status"] == RUNNING


def test_cli_glob_and_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_run(tmp_path / "runs" / "a", [3.0], lr=1e-3)
    make_run(tmp_path / "runs" / "b", [2.0], lr=3e-4)
    assert main([str(tmp_path / "runs" / "*"), "--out", str(tmp_path / "report")]) == 0
    assert [r["final_loss"] for r in json.loads((tmp_path / "report" / "compare.json").read_text())] == [2.0, 3.0]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith(f"error: no runs under {tmp_path / 'empty'}")
    make_run(tmp_path / "run", [3.0])
    assert main([str(tmp_path / "run"), "--metric", "accuracy"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_missing_path_subprocess(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_sweep"
    result = subprocess.run([sys.executable, "-m", "gpt_exp.compare", str(missing)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {missing} does not exist")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_outputs_are_replaced_together_or_not_at_all(tmp_path: Path, capsys, monkeypatch) -> None:
    make_run(tmp_path / "a", [3.0], lr=1e-3)
    make_run(tmp_path / "b", [2.0], lr=3e-4)
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "report")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    assert sorted(before) == ["compare.csv", "compare.json", "compare.png"]

    def disk_full(curves, path, title, **options):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("gpt_exp.compare.plot_overlay", disk_full)
    make_run(tmp_path / "c", [1.0], lr=1e-4)
    capsys.readouterr()
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--out", str(tmp_path / "report")]) == 2
    assert capsys.readouterr().err == (f"error: cannot write compare.csv, compare.json, compare.png to "
                                       f"{tmp_path / 'report'} (No space left on device); pass --out DIR with a dir "
                                       f"you can write\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == before  # no temp files, no mix


def test_a_cut_last_line_is_skipped_but_garbage_is_not(tmp_path: Path) -> None:
    run = make_run(tmp_path / "0", [4.0, 3.0], tail='{"step": 2, "loss": 2.')
    assert load_runs([str(run)])[0].steps == 2  # a write in progress: no newline yet
    (run / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes() + b"5}\n\x00\x00\x00\x00")
    with pytest.raises(MetricsError, match=r"metrics.jsonl line 4 is not JSON; repair or delete that line"):
        load_runs([str(run)])


def test_a_dir_that_cannot_be_read_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    # chmod 000 does not stop root (as in CI containers), so the permission check itself is stubbed here;
    # tests/test_bad_input_tools.py runs the real chmod where the tests are not root
    run = make_run(tmp_path / "run", [3.0])
    monkeypatch.setattr("gpt_exp.compare.os.access", lambda path, mode: Path(path) != run)
    assert main([str(run)]) == 2
    assert capsys.readouterr().err == f"error: cannot read {run} (permission denied); fix its permissions (chmod u+rx)\n"


def test_the_default_sort_is_the_val_loss_when_every_run_has_one(tmp_path, capsys):
    """The last training loss is one batch's and keeps falling while a model overfits: with a val loss in every
    run, compare ranks by it (the overfit run has the lower training loss and the higher val loss)."""
    from gpt_exp import compare

    for name, train_loss, val_loss in (("overfit", 3.0, 4.5), ("fits", 3.5, 4.0)):
        run = tmp_path / "sweep" / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"optim:\n  lr: {0.01 if name == 'overfit' else 0.001}\n")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": train_loss, "tokens": 128}) + "\n"
                                           + json.dumps({"step": 0, "val_loss": val_loss, "tokens": 128}) + "\n")
        (run / "summary.json").write_text(json.dumps({"status": "completed", "final_loss": train_loss,
                                                      "final_val_loss": val_loss}))
    assert compare.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["0.001", "0.01"]  # val 4.0 first, though its loss is higher
    assert lines[3] == "sorted by final_val_loss (every run has a val loss; --metric final_loss for the last " \
                       "training batch's)"
    assert compare.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report"), "--metric", "final_loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["0.01", "0.001"] and not lines[3].startswith("sorted by")


def test_a_glob_skips_what_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`compare 'SWEEP/*'` matches the sweep's multirun.yaml and compare's own outputs too: a glob skips them (and
    a dir without runs); a file named as a path is still an error, and so is a glob that matches no run."""
    sweep = tmp_path / "sweep"
    make_run(sweep / "0", [3.0], lr=1e-3)
    make_run(sweep / "1", [2.0], lr=3e-4)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    (sweep / ".submitit").mkdir()
    assert main([str(sweep / "*")]) == 0
    assert [r["final_loss"] for r in json.loads((sweep / "compare.json").read_text())] == [2.0, 3.0]
    assert main([str(sweep / "*")]) == 0  # again, now that compare.csv, .json and .png match too
    assert len(json.loads((sweep / "compare.json").read_text())) == 2
    capsys.readouterr()
    assert main([str(sweep / "multirun.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {sweep / 'multirun.yaml'} is a file, not a run dir")
    assert main([str(sweep / "*.yaml")]) == 2
    assert capsys.readouterr().err == (f"error: {sweep / '*.yaml'} matches no run dir (a run dir holds "
                                       f".hydra/config.yaml); pass run or sweep dirs from outputs/\n")


def test_log_axes_leave_out_what_they_cannot_show(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--logx leaves out step 0, --logy a loss <= 0, each with a one-line note; a plot with nothing left on its log
    axes is one error line, with no traceback and no files."""
    make_run(tmp_path / "a", [3.0, 2.0, 0.0], lr=1e-3)
    make_run(tmp_path / "b", [3.0, 2.5, 2.0], lr=3e-4)
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--logx", "--logy", "--out", str(tmp_path / "r")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["--logx: left out 2 points with step <= 0 (a log axis cannot show them)",
                          "--logy: left out 1 point with a loss <= 0 (a log axis cannot show them)",
                          f"wrote compare.csv, compare.json, compare.png to {tmp_path / 'r'}"]
    for seed in (0, 1):  # a seed group of one step each: only x = 0 (a traceback from matplotlib before)
        make_run(tmp_path / "one" / str(seed), [3.0], seed=seed)
    make_run(tmp_path / "zero", [0.0, 0.0])
    for run, flags, expected in (
            ("one", ["--logx"], "--logx: every point has step <= 0, which a log axis cannot show; drop --logx"),
            ("zero", ["--logy"], "--logy: every point has a loss <= 0, which a log axis cannot show; drop --logy"),
            ("zero", ["--logx", "--logy"], "--logx and --logy: every point has step <= 0 or a loss <= 0, which a log "
                                           "axis cannot show; drop --logx and --logy")):
        assert main([str(tmp_path / run), *flags, "--out", str(tmp_path / "none")]) == 2
        assert capsys.readouterr() == ("", f"error: {expected}\n")
    assert not (tmp_path / "none").exists()
