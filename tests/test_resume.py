"""Checkpoints and exact resume: a run killed (SIGKILL) or stopped (SIGTERM) and resumed gives the losses of a
run that never stopped; a shared token cache survives parallel first runs; a diverged run stops cleanly."""

import json
import re
import signal
import time

import pytest
import yaml
import torch

from gpt_exp.checkpoint import list_checkpoints
from tests.helpers import only_run_dir, read_metrics, run_cli, run_cli_async

STEPS = 40
RUN = ["model=tiny", f"train.max_steps={STEPS}", "optim.warmup_steps=5", "logger.mode=offline"]


@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory, cache_dir):
    """Losses of runs that never stopped, by LR schedule (computed once)."""
    losses = {}

    def get(schedule: str) -> list[float]:
        if schedule not in losses:
            cwd = tmp_path_factory.mktemp(f"straight_{schedule}")
            # W&B does not touch the losses: the straight run goes without it (in this process)
            result = run_cli("run", *RUN[:-1], "logger.mode=disabled", f"optim.schedule={schedule}",
                             f"data.cache_dir={cache_dir}", cwd=cwd)
            assert result.returncode == 0, result.stderr
            losses[schedule] = [row["loss"] for row in read_metrics(only_run_dir(cwd))]
        return losses[schedule]

    return get


def start_and_stop(cwd, cache_dir, sig, after_rows, *extra):
    """Start a run, send `sig` once metrics.jsonl has `after_rows` rows, wait for it to exit; returns (rc, run dir)."""
    proc = run_cli_async("run", *RUN, f"data.cache_dir={cache_dir}", *extra, cwd=cwd)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = list((cwd / "outputs").glob("*/*/metrics.jsonl"))
        if metrics and metrics[0].read_text().count("\n") >= after_rows:
            break
        assert proc.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.005)
    proc.send_signal(sig)
    return proc.wait(timeout=300), metrics[0].parent


@pytest.mark.parametrize("schedule", [pytest.param("cosine", marks=pytest.mark.slow), "constant"])
def test_sigkill_then_resume_gives_the_straight_losses(straight_losses, tmp_path, cache_dir, schedule):
    expected = straight_losses(schedule)
    rc, killed_dir = start_and_stop(tmp_path, cache_dir, signal.SIGKILL, 17, "train.ckpt_every=5",
                                    f"optim.schedule={schedule}")
    assert rc == -signal.SIGKILL
    latest = list_checkpoints(killed_dir)[-1]
    assert int(latest.stem.split("_")[1]) in (15, 20)  # the newest complete one, whatever the kill interrupted

    result = run_cli("run", *RUN, f"optim.schedule={schedule}", f"resume={killed_dir}", f"data.cache_dir={cache_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [resumed_dir] = [d for d in (tmp_path / "outputs").glob("*/*") if d != killed_dir]
    rows = read_metrics(resumed_dir)
    assert [r["step"] for r in rows] == list(range(STEPS))  # the numbering continues; the history is complete
    resumed = [r["loss"] for r in rows]
    max_delta = max(abs(a - b) for a, b in zip(resumed, expected))
    assert max_delta <= 1e-6, max_delta  # CPU fp32: bitwise in practice
    summary = json.loads((resumed_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(latest) and summary["status"] == "completed"
    assert summary["tokens"] == STEPS * 4 * 32
    [old_wandb] = list((killed_dir / "wandb").glob("offline-run-*"))
    [new_wandb] = list((resumed_dir / "wandb").glob("offline-run-*"))
    assert old_wandb.name.split("-")[-1] == new_wandb.name.split("-")[-1]  # the same W&B run id continues


def test_sigterm_checkpoints_and_resumes_exactly(straight_losses, tmp_path, cache_dir):
    expected = straight_losses("cosine")
    rc, stopped_dir = start_and_stop(tmp_path, cache_dir, signal.SIGTERM, 12, "train.ckpt_every=1000")
    assert rc == 128 + signal.SIGTERM
    summary = json.loads((stopped_dir / "summary.json").read_text())
    [ckpt] = list_checkpoints(stopped_dir)  # written at the interruption (ckpt_every never came)
    assert summary["status"] == "interrupted" and int(ckpt.stem.split("_")[1]) == summary["steps"]
    hint = f"continue with: python -m gpt_exp.run resume={stopped_dir}"
    assert hint in (stopped_dir / "run.log").read_text()

    # the printed command as printed: no override retyped (model, steps, cache dir come from the checkpoint), one
    # setting changed on top of it
    result = run_cli("run", *hint.split("python -m gpt_exp.run ")[1].split(), "train.log_every=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [resumed_dir] = [d for d in (tmp_path / "outputs").glob("*/*") if d != stopped_dir]
    log = (resumed_dir / "run.log").read_text()
    assert "; changed: train.log_every: 1 -> 10\n" in log and "model tiny:" in log
    assert [r["loss"] for r in read_metrics(resumed_dir)] == expected


def test_resume_refuses_another_model_shape(tmp_path, cache_dir):
    result = run_cli("run", *RUN, "train.max_steps=2", "train.ckpt_every=1", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0
    run_dir = only_run_dir(tmp_path)
    result = run_cli("run", *RUN, "model.n_layer=3", f"resume={run_dir}", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "error: resume: the checkpoint's model has another shape or parametrization (model.n_layer: 2 -> 3)" in result.stderr


def test_keep_last_k_checkpoints(tmp_path, cache_dir):
    result = run_cli("run", *RUN, "train.max_steps=7", "train.ckpt_every=2", "train.keep_ckpts=2",
                     "logger.mode=disabled", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in list_checkpoints(only_run_dir(tmp_path))] == ["step_0000006.pt", "step_0000007.pt"]


def test_diverged_run_stops_with_one_line_and_keeps_its_checkpoint(tmp_path, cache_dir):
    result = run_cli("run", *RUN, "optim.lr=1e3", "optim.warmup_steps=0", "train.grad_clip=0", "train.ckpt_every=1",
                     "logger.mode=disabled", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 3
    [line] = result.stderr.strip().splitlines()
    # a NaN/inf loss or gradient norm is caught before the update: the step is never applied
    assert re.match(r"error: the (loss|grad norm) is (nan|inf) at step ", line)
    assert "(lr " in line and "the step was not applied" in line
    run_dir = only_run_dir(tmp_path)
    bad_step = int(line.split("at step ")[1].split()[0])
    assert [p.name for p in list_checkpoints(run_dir)][-1] == f"step_{bad_step:07d}.pt"  # the last good one
    state = torch.load(list_checkpoints(run_dir)[-1], weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"


def test_parallel_first_runs_share_one_fresh_cache(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i} of a corpus that takes a moment to tokenize.\n" for i in range(60_000)))
    cache = tmp_path / "fresh_cache"
    procs = [run_cli_async("run", *RUN, "train.max_steps=1", "logger.mode=disabled", "data=text",
                           f"data.path={corpus}", f"data.cache_dir={cache}", cwd=tmp_path) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    logs = [d.joinpath("run.log").read_text() for d in (tmp_path / "outputs").glob("*/*")]
    assert len(logs) == 3
    assert sum("tokenized 1 document(s)" in log for log in logs) == 1  # exactly one process tokenized
    assert sum("token cache hit" in log for log in logs) == 2
    assert len(list(cache.glob("*.bin"))) == 1 and not list(cache.glob("*.tmp"))


def test_resume_auto_starts_then_continues(tmp_path, cache_dir):
    """One job script, requeued unchanged: the first start trains from scratch, the second goes on."""
    args = ["model=tiny", "train.max_steps=6", "train.ckpt_every=3", "logger.mode=disabled", "resume=auto",
            f"hydra.run.dir={tmp_path / 'job'}", f"data.cache_dir={cache_dir}"]
    first = run_cli("run", *args, cwd=tmp_path)
    assert first.returncode == 0 and "resume=auto: no checkpoint" in (tmp_path / "job" / "run.log").read_text()
    second = run_cli("run", *args[:1], "train.max_steps=9", *args[2:], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in (tmp_path / "job" / "run.log").read_text()
    assert [r["step"] for r in read_metrics(tmp_path / "job")] == list(range(9))
    assert [p.name for p in list_checkpoints(tmp_path / "job")] == ["step_0000006.pt", "step_0000009.pt"]


@pytest.mark.parametrize("damage", ["drop the embedding", "a tensor of another shape"])
def test_a_damaged_checkpoint_resumes_as_one_line(tmp_path, cache_dir, damage):
    result = run_cli("run", *RUN[:-1], "logger.mode=disabled", "train.max_steps=2", "train.ckpt_every=1",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    state = torch.load(list_checkpoints(only_run_dir(tmp_path))[-1], weights_only=True)
    if damage == "drop the embedding":
        del state["model"]["transformer.wte.weight"]
    else:
        state["model"]["transformer.h.0.attn.c_attn.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "damaged.pt")
    result = run_cli("run", f"resume={tmp_path / 'damaged.pt'}", "logger.mode=disabled", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: resume: the checkpoint's weights do not fit this model (")
    assert line.endswith("the file is damaged: resume from another checkpoint of the run")
    assert ("e.g. transformer.wte.weight" if damage == "drop the embedding" else "1 of another shape") in line
    assert len(list((tmp_path / "outputs").glob("*/*/.hydra"))) == 1  # the failed resume left no run dir


def test_the_users_labels_are_recorded_carried_on_resume_and_pick_a_compare_baseline(tmp_path, cache_dir):
    """`+arm=rope` is the user's label, not a setting: it is recorded beside the settings (config.yaml, checkpoint),
    a resume keeps it unless the command gives another, and compare groups and picks its baseline by it."""
    common = ["model=tiny", "B=2", "T=16", "logger.mode=disabled", "train.ckpt_every=2", f"data.cache_dir={cache_dir}"]
    for arm, seed in (("gpt2", 1), ("gpt2", 2), ("rope", 1), ("rope", 2)):
        extra = ["model.pos=rope"] if arm == "rope" else []
        result = run_cli("run", *common, "train.max_steps=2", f"+arm={arm}", f"train.seed={seed}", *extra,
                         f"hydra.run.dir={arm}{seed}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    recorded = yaml.safe_load((tmp_path / "rope1" / ".hydra" / "config.yaml").read_text())
    assert recorded["arm"] == "rope" and recorded["model"]["pos"] == "rope"
    ckpt = list_checkpoints(tmp_path / "rope1")[-1]
    assert torch.load(ckpt, weights_only=False)["config"]["arm"] == "rope"

    resumed = run_cli("run", "resume=rope1", "train.max_steps=3", "hydra.run.dir=rope1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "no longer exist" not in resumed.stdout + resumed.stderr  # a label is not an old version's setting
    assert yaml.safe_load((tmp_path / "rope1" / ".hydra" / "config.yaml").read_text())["arm"] == "rope"
    relabelled = run_cli("run", "resume=rope1", "train.max_steps=4", "+arm=rope_long", "hydra.run.dir=rope1",
                         cwd=tmp_path)
    assert relabelled.returncode == 0, relabelled.stderr
    assert "arm: rope -> rope_long" in relabelled.stdout
    assert yaml.safe_load((tmp_path / "rope1" / ".hydra" / "config.yaml").read_text())["arm"] == "rope_long"

    compared = run_cli("compare", "gpt21", "gpt22", "rope2", "rope1", "--baseline", "arm=gpt2", "--out", "cmp",
                       cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert sorted((row["arm"], row["n"]) for row in rows) == [("gpt2", 2), ("rope", 1), ("rope_long", 1)]
    assert [row["baseline_note"] for row in rows if row["arm"] == "gpt2"] == ["baseline"]
