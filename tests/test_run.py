"""End to end: `python -m gpt_exp.run` as a user runs it, and everything a run leaves behind."""

import json
import math
import os
import re
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import only_run_dir, read_metrics, run_cli, wandb_records

TINY_RUN = ["model=tiny", "train.max_steps=12", "optim.warmup_steps=3"]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, cache_dir):
    cwd = tmp_path_factory.mktemp("offline_run")
    result = run_cli("run", "data=shakespeare", "B=4", "T=32", *TINY_RUN, f"data.cache_dir={cache_dir}", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result, only_run_dir(cwd)


def test_run_dir_layout(offline_run):
    _, run_dir = offline_run
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}", "/".join(run_dir.parts[-2:]))
    assert run_dir.parent.parent.name == "outputs"
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "run.log", "metrics.jsonl", "loss.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    saved = OmegaConf.load(run_dir / ".hydra/config.yaml")
    assert (saved.B, saved.T, saved.model.name, saved.train.max_steps) == (4, 32, "tiny", 12)  # B, T top-level
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_rows(offline_run):
    _, run_dir = offline_run
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(12))
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tok_per_s", "dt_ms", "tokens", "elapsed_s", "flops"}
    assert [r["tokens"] for r in rows] == [128 * (i + 1) for i in range(12)]
    summary = json.loads((run_dir / "summary.json").read_text())
    flops_per_token = summary["flops_per_token"]  # PaLM's count for tiny at T=32, as MFU counts it
    assert flops_per_token == 6 * (1_226_808 - 256 * 24) + 12 * 2 * 24 * 32  # 1,226,808 params, wpe a lookup
    assert [r["flops"] for r in rows] == [r["tokens"] * flops_per_token for r in rows]
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and 0 < elapsed[0] and elapsed[-1] <= summary["wall_s"]
    assert abs(rows[0]["loss"] - math.log(50257)) < 0.1
    assert rows[0]["lr"] == pytest.approx(2e-4) and rows[2]["lr"] == pytest.approx(6e-4)  # warmup over 3 steps
    assert rows[-1]["lr"] == pytest.approx(6e-4 * 0.1 + 0.5 * (1 + math.cos(math.pi * 8 / 9)) * 5.4e-4)
    assert all(r["tok_per_s"] == pytest.approx(128 / (r["dt_ms"] / 1000), rel=1e-6) for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12 and summary["tokens"] == 1536
    assert summary["train_split_tokens"] == 338_025  # tiny shakespeare, no val split: epochs = tokens / this
    assert summary["final_loss"] == rows[-1]["loss"] and summary["best_loss"] == min(r["loss"] for r in rows)


def test_log_reports_the_lectures_numbers(offline_run):
    result, run_dir = offline_run
    log = (run_dir / "run.log").read_text()
    assert "loaded 338,025 tokens" in log
    assert "1 epoch = 2,640 batches" in log
    assert "model tiny: 1.23M params" in log
    assert "fp32 (matmuls in oneDNN)" in log  # the default on a CPU (gpt_exp/cpu.py)
    final_loss = read_metrics(run_dir)[-1]["loss"]
    assert f"done: 12 steps, final loss {final_loss:.4f}" in log
    assert "step 12/12 | loss" in log  # not a terminal: one progress line per step
    assert "wandb sync" in result.stdout + result.stderr  # offline (no credentials) says how to upload later


def test_wandb_offline_history_matches_metrics(offline_run):
    _, run_dir = offline_run
    [wandb_run] = list((run_dir / "wandb").glob("offline-run-*"))
    records = wandb_records(wandb_run)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["loss"] for h in history] == [r["loss"] for r in read_metrics(run_dir)]
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == "/".join(run_dir.parts[-2:])
    config = run["config"]["update"]
    assert config["B"] == 4 and config["optim"]["lr"] == 0.0006 and config["model"]["name"] == "tiny"
    # what ran, not only what was asked (device=auto, dtype=auto): in the W&B config and in summary.json
    assert config["runtime"]["device"] == "cpu" and config["runtime"]["dtype"] == "fp32"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["runtime"]["world_size"] == 1 and summary["runtime"]["grad_accum_steps"] == 1
    assert summary["runtime"]["torch"] == torch.__version__ and (summary["runtime"]["B"], summary["runtime"]["T"]) == (4, 32)
    # tokens are the x-axis of the curves, and the loss summary keeps the best value, not the last
    # a mixture's per-source curves are defined by a glob (val_loss/*), whose record names it as glob_name
    metrics = {r["metric"].get("name") or r["metric"]["glob_name"]: r["metric"]
               for r in records if r["type"] == "metric"}
    assert metrics["loss"]["step_metric"] == "tokens" and metrics["loss"]["summary"] == {"min": True}
    assert metrics["val_bpb/*"]["step_metric"] == "tokens" and metrics["val_bpb/*"]["summary"] == {"min": True}
    assert metrics["val_loss"]["summary"] == {"min": True} and metrics["lr"]["step_metric"] == "tokens"
    wandb_summary = json.loads(subprocess.run(["wandb", "leet", "inspect", "--summary", "--json", str(wandb_run)],
                                              capture_output=True, text=True, check=True).stdout)["summary"]
    assert wandb_summary["loss"]["min"] == pytest.approx(min(r["loss"] for r in read_metrics(run_dir)))
    assert wandb_summary["status"] == "completed" and wandb_summary["best_loss"] == summary["best_loss"]
    assert wandb_summary["runtime"]["device"] == "cpu"


def test_second_run_reuses_the_token_cache(offline_run, tmp_path, cache_dir):
    result = run_cli("run", *TINY_RUN, "train.max_steps=2", "logger.mode=disabled", "device.cpu_matmul=blas",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (only_run_dir(tmp_path) / "run.log").read_text()
    assert "token cache hit" in log and "tokenized" not in log
    assert "fp32 (matmuls in torch's BLAS)" in log
    assert not (only_run_dir(tmp_path) / "wandb").exists()  # logger.mode=disabled


@pytest.mark.parametrize(
    "env, warning",
    [
        ({}, "logger.mode=online but no W&B API key (run `wandb login` or set WANDB_API_KEY)"),
        ({"WANDB_API_KEY": "f" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}, "W&B server unreachable (127.0.0.1:9"),
    ],
)
def test_wandb_failure_is_one_warning_and_the_run_goes_on(tmp_path, cache_dir, env, warning):
    result = run_cli("run", *TINY_RUN, "train.max_steps=3", "logger.mode=online", f"data.cache_dir={cache_dir}",
                     cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    warnings = [line for line in (run_dir / "run.log").read_text().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and warning in warnings[0] and "logging offline instead" in warnings[0]
    assert len(read_metrics(run_dir)) == 3 and (run_dir / "loss.png").exists()
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))  # the history is kept, to sync later
    assert len([r for r in wandb_records(offline) if r["type"] == "history"]) == 3


def test_api_key_is_never_written(tmp_path, cache_dir):
    key = "0123456789abcdef0123456789abcdef01234567"
    result = run_cli("run", *TINY_RUN, "train.max_steps=2", "logger.mode=offline", f"data.cache_dir={cache_dir}",
                     cwd=tmp_path, env={"WANDB_API_KEY": key})
    assert result.returncode == 0, result.stderr
    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]
    assert len(files) > 8
    assert not [p for p in files if key.encode() in p.read_bytes()]


def test_text_corpus_with_val_split(tmp_path, cache_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"Document number {i}. " * 200)
    result = run_cli("run", "data=text", f"data.path={corpus}", *TINY_RUN, "train.max_steps=2", "logger.mode=disabled",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (only_run_dir(tmp_path) / "run.log").read_text()
    total = int(re.search(r"loaded ([\d,]+) tokens", log).group(1).replace(",", ""))
    val = int(re.search(r"val ([\d,]+)\)", log).group(1).replace(",", ""))
    assert val == int(total * 0.1) and "tokenized 3 document(s)" in log


@pytest.mark.slow
def test_readme_main_job(tmp_path, cache_dir):
    """The README's first command: the 124M model, 50 steps of B=4, T=32 on tiny shakespeare."""
    result = run_cli("run", "data=shakespeare", "B=4", "T=32", "logger.mode=offline", f"data.cache_dir={cache_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_metrics(only_run_dir(tmp_path))
    assert len(rows) == 50 and abs(rows[0]["loss"] - math.log(50257)) < 0.3
    assert rows[-1]["loss"] < 7.5  # the lecture's 50 steps from scratch reach ~6-7


def test_validation_loss_rows(tmp_path, cache_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    result = run_cli("run", "data=text", f"data.path={corpus}", *TINY_RUN, "train.max_steps=7", "train.eval_every=3",
                     "train.eval_batches=2", "logger.mode=offline", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    rows = read_metrics(run_dir)
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 5, 6]  # every 3 steps and at the end
    assert all(set(r) == {"step", "val_loss", "val_bpb", "tokens"} for r in val)  # `loss` stays the training loss only
    assert [r["tokens"] for r in val] == [384, 768, 896]  # the val curve has the tokens axis too
    assert len([r for r in rows if "loss" in r]) == 7
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_loss"] == val[-1]["val_loss"] and summary["steps"] == 7
    assert summary["best_val_loss"] == min(r["val_loss"] for r in val)
    train_split = int(re.search(r"\(train ([\d,]+), val", (run_dir / "run.log").read_text()).group(1).replace(",", ""))
    assert summary["train_split_tokens"] == train_split
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    history = [r["history"]["item"] for r in wandb_records(offline) if r["type"] == "history"]
    assert [h["val_loss"] for h in history if "val_loss" in h] == [r["val_loss"] for r in val]


def test_out_of_memory_is_one_line_naming_B():
    from gpt_exp.config import RunConfig
    from gpt_exp.run import out_of_memory

    cfg = RunConfig(B=64, T=1024)
    cfg.train.total_batch_size = 524288
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 105396551680 bytes. Error code 12 (Cannot allocate memory)")
    assert str(out_of_memory(cpu, cfg)) == (
        "out of memory at B=64, T=1024 (model gpt2); use B=auto train.total_batch_size=524288 (the largest micro-batch "
        "that fits, the same tokens per step), or a smaller B, e.g. B=32 train.total_batch_size=524288")
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory"), cfg) is not None
    assert out_of_memory(RuntimeError("shape mismatch"), cfg) is None  # a bug stays a bug


@pytest.mark.slow
def test_out_of_memory_run_is_one_line(tmp_path, cache_dir):
    result = run_cli("run", "model=tiny", "B=1300", "T=256", "train.max_steps=2", "logger.mode=disabled",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: out of memory at B=1300, T=256 (model tiny); use B=auto train.total_batch_size=332800 (the largest "
        "micro-batch that fits, the same tokens per step), or a smaller B, e.g. B=650 train.total_batch_size=332800"]


def test_a_token_budget_gives_runs_of_other_batch_shapes_the_same_data(cache_dir):
    from tests.helpers import Collect, make_trainer

    ends = {}
    for B in (4, 16):
        trainer = make_trainer(cache_dir, f"B={B}", "train.max_steps=null", "train.max_tokens=2000")
        tracker = Collect()
        assert trainer.fit(tracker) == "completed"
        ends[B] = (trainer.max_steps, tracker.steps[-1].tokens)
    assert ends == {4: (16, 2048), 16: (4, 2048)}  # ceil(2000 / 128) and ceil(2000 / 512) steps, equal tokens


def test_an_in_process_run_sees_the_environment_a_fresh_process_would(tmp_path, cache_dir, monkeypatch):
    """The helper that runs the CLI in the test process keeps PATH and the rest (a compiler run by torch.compile
    needs them), drops W&B credentials and sets HOME, as `cli_env` does for a subprocess."""
    from tests.helpers import cli_env, run_in_process

    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    seen = {}
    monkeypatch.setattr("gpt_exp.run.run", lambda cfg: seen.update(os.environ) or 0.0)
    result = run_in_process("run", [*TINY_RUN, "train.max_steps=1", f"data.cache_dir={cache_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr
    expected = cli_env(tmp_path)
    assert seen["PATH"] == os.environ["PATH"] and seen["HOME"] == str(tmp_path) and "WANDB_API_KEY" not in seen
    assert {k: seen.get(k) for k in expected} == expected
    assert os.environ["WANDB_API_KEY"] == "f" * 40  # and the test process gets its own back
