"""Smoke runs of the benchmarks at tiny sizes, so that they do not rot; no assertion on speed."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_depth_transfer_writes_each_cell_and_each_depths_best_lr(tmp_path, cache_dir):
    out = bench(str(BENCH / "depth_transfer.py"), "--depths", "1,2", "--lrs", "0.01", "--seeds", "1", "--steps", "2",
                "--parametrizations", "completep", "--cache-dir", str(cache_dir), "--out", str(tmp_path))
    result = json.loads((tmp_path / "depth_transfer.json").read_text())
    assert [(r["depth"], r["lr"], r["seeds"]) for r in result["mean"]] == [(1, 0.01, 1), (2, 0.01, 1)]
    assert all(9 < r["val_loss"] < 11 for r in result["mean"])  # 2 steps from ln(50257) = 10.8
    assert result["best_lr_grid"] == {"completep": {"1": 0.01, "2": 0.01}}
    assert "completep: best lr per depth on the grid" in out and (tmp_path / "depth_transfer.png").is_file()
