"""Where one run meets another: resume chains, requeues, two processes in one dir, signals at a run's end, and files
gpt_exp did not write. Each test reproduces a way work was lost or a record lied before."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from gpt_exp.checkpoint import list_checkpoints, prune
from gpt_exp.config import TrainConfig, schema_keys
from gpt_exp.rundir import LOCK
from gpt_exp.trainer import LRSchedule, Schedule
from tests.helpers import Collect, cli_env, make_trainer, read_metrics, run_cli, run_cli_async

TINY = ["model=tiny", "logger.mode=disabled", "optim.warmup_steps=2"]


def tiny(cache_dir, *extra):
    return [*TINY, f"data.cache_dir={cache_dir}", *extra]


def tree(path):
    """Every file under `path` with its bytes: what 'nothing changed' compares."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def recorded(run_dir):
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def wait_for_rows(run_dir, rows, proc):
    deadline = time.time() + 300
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and path.read_text().count("\n") >= rows:
            return
        assert proc.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.01)
    raise AssertionError("no progress")


# ---- one owner per run dir ----

def test_resume_auto_refuses_a_dir_of_the_users_own_files(tmp_path, cache_dir):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("# the user's package\n")
    (tmp_path / "loss.png").write_bytes(b"my figure")
    before = tree(tmp_path)
    result = run_cli("run", *tiny(cache_dir, "resume=auto", "hydra.run.dir=."), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: hydra.run.dir=. holds files a run writes (loss.png, model) but no gpt_exp run")
    assert tree(tmp_path) == before  # not a file added, replaced or removed


def test_resume_auto_of_a_finished_run_without_checkpoints_changes_nothing(tmp_path, cache_dir):
    run = tmp_path / "run"
    assert run_cli("run", *tiny(cache_dir, "train.max_steps=3", f"hydra.run.dir={run}"), cwd=tmp_path).returncode == 0
    before = {k: v for k, v in tree(run).items() if k != "run.log"}
    result = run_cli("run", *tiny(cache_dir, "train.max_steps=3", "resume=auto", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "has finished; nothing to do" in (run / "run.log").read_text()
    assert {k: v for k, v in tree(run).items() if k != "run.log"} == before
    assert not (run / LOCK).exists()


def test_resume_auto_refuses_an_unfinished_run_without_checkpoints(tmp_path, cache_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("B: 4\n")
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 10.9}\n')
    before = tree(run)
    result = run_cli("run", *tiny(cache_dir, "resume=auto", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert result.returncode == 2
    assert "holds a run (no summary) without a checkpoint to continue from" in result.stderr
    assert tree(run) == before


def test_a_second_process_is_refused_with_the_holder_named(tmp_path, cache_dir):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from gpt_exp import rundir; rundir.lock(Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(120)", str(run)], stdout=subprocess.PIPE, text=True, env=cli_env(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cli("run", *tiny(cache_dir, "train.max_steps=2", f"hydra.run.dir={run}"), cwd=tmp_path)
        assert result.returncode == 2
        assert f"is in use by another gpt_exp process (host {os.uname().nodename}, pid {holder.pid}, started" in result.stderr
        assert sorted(p.name for p in run.iterdir()) == [LOCK]  # the holder's lock, nothing of the refused run
    finally:
        holder.kill()
        holder.wait()
    # the holder died without letting go: its lock is stale and the next run takes it over
    result = run_cli("run", *tiny(cache_dir, "train.max_steps=2", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"took over the lock of a process that is gone (host {os.uname().nodename}, pid {holder.pid}" in \
        result.stdout + result.stderr
    assert not (run / LOCK).exists()  # released at the end


def test_two_resume_auto_jobs_in_one_dir_never_both_train(tmp_path, cache_dir):
    """The SLURM requeue that starts while the old job still runs: one trains, the other is refused."""
    run = tmp_path / "run"
    args = tiny(cache_dir, "train.max_steps=60", "train.ckpt_every=10", "resume=auto", f"hydra.run.dir={run}")
    first = run_cli_async("run", *args, cwd=tmp_path)
    wait_for_rows(run, 3, first)
    second = run_cli("run", *args, cwd=tmp_path)
    assert second.returncode == 2 and "is in use by another gpt_exp process" in second.stderr
    assert first.wait(timeout=300) == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(60))  # one history, none of it replaced
    assert (run / "run.log").read_text().count("done: 60 steps") == 1


# ---- a checkpoint is self-sufficient; what is recorded is what trained ----

def stop_at(tmp_path, args, run_dir, rows, sig=signal.SIGTERM):
    proc = run_cli_async("run", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    wait_for_rows(run_dir, rows, proc)
    proc.send_signal(sig)
    return proc.wait(timeout=300)


def test_a_chain_of_three_resumes_equals_a_straight_run_with_its_settings(tmp_path, cache_dir):
    settings = tiny(cache_dir, "model.n_layer=3", "optim.lr=1e-3", "train.max_steps=30", "train.ckpt_every=4",
                    "train.eval_every=10", "data.val_fraction=0.1", "train.save_model=best")
    straight = tmp_path / "straight"
    assert run_cli("run", *settings, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    a, b, c = (tmp_path / n for n in "abc")
    assert stop_at(tmp_path, settings, a, 9) == 128 + signal.SIGTERM
    assert stop_at(tmp_path, ["logger.mode=disabled", f"resume={a}"], b, 18) == 128 + signal.SIGTERM
    result = run_cli("run", "logger.mode=disabled", f"resume={b}", f"hydra.run.dir={c}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    losses = lambda d: [r["loss"] for r in read_metrics(d) if "loss" in r]  # noqa: E731
    assert losses(c) == losses(straight)  # bitwise
    # the val loss sums per-token losses (for val_bpb); a subprocess and this test process may reduce them in
    # another order (their thread counts differ), so it agrees to float rounding rather than bitwise
    assert [r["val_loss"] for r in read_metrics(c) if "val_loss" in r] == \
        pytest.approx([r["val_loss"] for r in read_metrics(straight) if "val_loss" in r], rel=1e-6)
    for run in (b, c):  # every segment records the settings it trained with, not the command line's defaults
        config = recorded(run)
        assert (config["model"]["n_layer"], config["optim"]["lr"], config["train"]["ckpt_every"]) == (3, 1e-3, 4)
        assert config["train"]["save_model"] == "best" and config["train"]["eval_every"] == 10
    assert {k: v for k, v in recorded(c).items() if k != "resume"} == \
        {k: v for k, v in recorded(straight).items() if k != "resume"}
    summary = json.loads((c / "summary.json").read_text())
    assert summary["wall_s"] > summary["segment_wall_s"] > 0  # the whole run's time, this segment's beside it
    assert summary["status"] == "completed" and summary["steps"] == 30


def test_a_failed_resume_into_its_own_dir_keeps_its_record(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = tiny(cache_dir, "train.max_steps=4", "train.ckpt_every=2", f"hydra.run.dir={run}")
    assert run_cli("run", *args, cwd=tmp_path).returncode == 0
    before = tree(run)
    result = run_cli("run", "logger.mode=disabled", f"resume={run}", f"hydra.run.dir={run}", "T=9999", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: T=9999 is invalid")
    assert tree(run) == before  # .hydra/config.yaml still says what the run trained with


def test_a_resumed_run_records_what_trained_for_compare_and_wandb(tmp_path, cache_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("run", *tiny(cache_dir, "model.n_layer=3", "optim.lr=1e-3", "train.max_steps=6",
                                "train.ckpt_every=3", f"hydra.run.dir={a}"), cwd=tmp_path).returncode == 0
    result = run_cli("run", "logger.mode=offline", f"resume={a}", "train.max_steps=9", f"hydra.run.dir={b}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = recorded(b)
    assert (config["model"]["name"], config["model"]["n_layer"], config["optim"]["lr"]) == ("tiny", 3, 1e-3)
    assert config["train"]["max_steps"] == 9
    compare = run_cli("compare", str(a), str(b), "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert compare.returncode == 0, compare.stderr
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert "gpt2" not in json.dumps(rows)  # b is not shown as a 124M run
    from tests.helpers import wandb_records
    [wandb_dir] = list((b / "wandb").glob("offline-run-*"))
    [run_record] = [r for r in wandb_records(wandb_dir) if r.get("type") == "run"]
    assert '"n_layer": 3' in json.dumps(run_record) or "'n_layer': 3" in str(run_record)


def test_init_from_hf_records_the_adopted_shape(tmp_path, cache_dir):
    src = tmp_path / "src"
    assert run_cli("run", *tiny(cache_dir, "model.n_layer=3", "train.max_steps=2", f"hydra.run.dir={src}"),
                   cwd=tmp_path).returncode == 0
    dst = tmp_path / "dst"
    result = run_cli("run", "logger.mode=disabled", f"data.cache_dir={cache_dir}", f"init_from=hf:{src / 'model'}",
                     "train.max_steps=2", f"hydra.run.dir={dst}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = recorded(dst)["model"]
    assert (model["name"], model["n_layer"], model["n_embd"], model["block_size"]) == ("model", 3, 24, 256)


def test_a_checkpoint_stores_the_resolved_settings_and_the_best_weights_state(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = tiny(cache_dir, "train.max_steps=6", "train.ckpt_every=3", "train.eval_every=3", "data.val_fraction=0.1",
                "train.save_model=best", f"hydra.run.dir={run}")
    assert run_cli("run", *args, cwd=tmp_path).returncode == 0
    state = torch.load(list_checkpoints(run)[-1], weights_only=True)
    assert state["config"] == recorded(run) and "overrides" not in state
    assert state["weights_at"]["model"] in (3, 6) and state["best_val_loss"] < 11


def test_a_resume_does_not_replace_the_best_weights_with_worse_ones(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = ("train.max_steps=4", "train.eval_every=2", "data.val_fraction=0.1", "train.save_model=best")
    trainer = make_trainer(cache_dir, *args, run_dir=run)
    run.mkdir()
    state = trainer.state_dict()
    state["best_val_loss"] = 0.5  # better than any val loss this run will see
    state["weights_at"] = {"model": 0}
    resumed = make_trainer(cache_dir, *args, run_dir=run)
    resumed.load_state_dict(state)
    assert resumed.fit(Collect()) == "completed"
    assert not (run / "model").exists()  # its evaluations were all worse than the best it resumed with


# ---- explicit beats default ----

def test_max_tokens_alone_is_the_budget_and_both_given_is_an_error(tmp_path, cache_dir):
    run = tmp_path / "run"
    result = run_cli("run", *tiny(cache_dir, "train.max_tokens=1280", f"hydra.run.dir={run}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_metrics(run)) == 10  # 1280 tokens / 128 per step
    assert recorded(run)["train"]["max_steps"] is None and recorded(run)["train"]["max_tokens"] == 1280
    both = run_cli("run", *tiny(cache_dir, "train.max_tokens=1280", "train.max_steps=5"), cwd=tmp_path)
    assert both.returncode == 2
    assert both.stderr == ("error: train.max_steps=5 and train.max_tokens=1280 exclude each other; give one of "
                           "them\n")


def test_a_sweep_over_max_tokens_runs_every_job(tmp_path, cache_dir):
    result = run_cli("run", "-m", *tiny(cache_dir, "train.max_tokens=256,512"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 jobs: 2 completed" in result.stderr


# ---- the end of a run is protected like its middle ----

def test_sigterm_during_the_final_weights_still_writes_them_and_the_summary(tmp_path, cache_dir, monkeypatch):
    from gpt_exp.trainer import Trainer
    original = Trainer.save_weights

    def signalled(self, name):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the run's end is written
        return original(self, name)

    monkeypatch.setattr(Trainer, "save_weights", signalled)
    run = tmp_path / "run"
    result = run_cli("run", *tiny(cache_dir, "train.max_steps=3", "train.ckpt_every=3", f"hydra.run.dir={run}"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr  # every step had trained: the run is complete
    assert (run / "model" / "model.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert [p.name for p in list_checkpoints(run)] == ["step_0000003.pt"]


def test_sighup_stops_a_run_with_a_checkpoint_and_a_summary(tmp_path, cache_dir):
    run = tmp_path / "run"
    rc = stop_at(tmp_path, tiny(cache_dir, "train.max_steps=500", "train.ckpt_every=1000"), run, 3, signal.SIGHUP)
    assert rc == 128 + signal.SIGHUP
    summary = json.loads((run / "summary.json").read_text())
    [ckpt] = list_checkpoints(run)
    assert summary["status"] == "interrupted" and int(ckpt.stem.split("_")[1]) == summary["steps"]


def test_an_interrupted_run_without_checkpoints_offers_no_continue_line(tmp_path, cache_dir):
    run = tmp_path / "run"
    assert stop_at(tmp_path, tiny(cache_dir, "train.max_steps=500"), run, 3) == 128 + signal.SIGTERM
    log = (run / "run.log").read_text()
    assert "continue with" not in log and "no checkpoint to continue from (train.ckpt_every=N keeps them)" in log


def test_sigterm_during_the_start_leaves_no_skeleton(tmp_path, cache_dir, monkeypatch):
    import gpt_exp.resolve as resolve_module

    def probe(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)

    monkeypatch.setattr(resolve_module, "probe_B", probe)
    result = run_cli("run", *tiny(cache_dir, "B=auto", "train.total_batch_size=256"), cwd=tmp_path)
    assert result.returncode == 130 and result.stderr.strip().endswith("interrupted")
    assert not (tmp_path / "outputs").exists()


# ---- resumes that cannot work ----

@pytest.fixture
def finished_run(tmp_path, cache_dir):
    run = tmp_path / "done"
    assert run_cli("run", *tiny(cache_dir, "train.max_steps=4", "train.ckpt_every=2", f"hydra.run.dir={run}"),
                   cwd=tmp_path).returncode == 0
    return run


def test_a_resume_that_ends_before_its_checkpoint_is_refused(tmp_path, finished_run):
    result = run_cli("run", "logger.mode=disabled", f"resume={finished_run}", "train.max_steps=3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: train.max_steps=3 ends at step 3, before the checkpoint's step 4")
    assert not (tmp_path / "outputs").exists()
    same = run_cli("run", "logger.mode=disabled", f"resume={finished_run}", cwd=tmp_path)
    assert same.returncode == 0 and not (tmp_path / "outputs").exists()  # nothing to train: nothing made


@pytest.mark.parametrize("change", ["model.mup_base_width=32", "model.parametrization=mup"])
def test_a_resume_cannot_change_what_the_weights_mean(tmp_path, finished_run, change):
    result = run_cli("run", "logger.mode=disabled", f"resume={finished_run}", "train.max_steps=6", change,
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "error: resume: the checkpoint's model has another shape or parametrization (model." in result.stderr


def test_resume_and_init_from_exclude_each_other(tmp_path, finished_run):
    result = run_cli("run", "logger.mode=disabled", f"resume={finished_run}", f"init_from={finished_run}",
                     cwd=tmp_path)
    assert result.returncode == 2 and "exclude each other" in result.stderr and "Traceback" not in result.stderr


DAMAGE = {
    "step a string": lambda s: s.update(step="12"),
    "config a string": lambda s: s.update(config="model: tiny"),
    "an empty rng": lambda s: s.update(rng={}),
    "a negative loader position": lambda s: s["loader"].update({k: -5 for k, v in s["loader"].items()
                                                                  if isinstance(v, int)}),
    "empty param groups": lambda s: s["optimizer"].update(param_groups=[]),
    "tokens None": lambda s: s.update(tokens=None),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_field_is_one_line(tmp_path, finished_run, damage):
    state = torch.load(list_checkpoints(finished_run)[-1], weights_only=True)
    DAMAGE[damage](state)
    torch.save(state, tmp_path / "damaged.pt")
    result = run_cli("run", "logger.mode=disabled", f"resume={tmp_path / 'damaged.pt'}", "train.max_steps=8",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: resume: {tmp_path / 'damaged.pt'} is damaged: its ") and "Traceback" not in line


def test_an_interpolation_in_a_checkpoint_is_refused_not_resolved(tmp_path, finished_run):
    state = torch.load(list_checkpoints(finished_run)[-1], weights_only=True)
    state["config"]["logger"]["group"] = "${oc.env:SECRET_TOKEN}"
    torch.save(state, tmp_path / "foreign.pt")
    result = run_cli("run", "logger.mode=offline", f"resume={tmp_path / 'foreign.pt'}", "train.max_steps=8",
                     cwd=tmp_path, env={"SECRET_TOKEN": "hunter2-secret"})
    assert result.returncode == 2
    assert "logger.group='${oc.env:SECRET_TOKEN}' holds an interpolation, which gpt_exp never resolves" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()


# ---- what a run keeps ----

def test_a_mup_run_keeps_its_weights_without_ckpt_every(tmp_path, cache_dir):
    run = tmp_path / "run"
    result = run_cli("run", *tiny(cache_dir, "model.parametrization=mup", "train.max_steps=3", f"hydra.run.dir={run}"),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [ckpt] = list_checkpoints(run)
    assert ckpt.name == "step_0000003.pt" and not (run / "model").exists()


def test_pruning_never_deletes_through_a_link(tmp_path):
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    for step in (1, 2, 3):
        (elsewhere / f"step_{step:07d}.pt").write_bytes(b"x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(elsewhere)
    prune(run, keep=1)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["step_0000001.pt", "step_0000002.pt", "step_0000003.pt"]
    (run / "checkpoints").unlink()
    (run / "checkpoints").mkdir()
    for step in (1, 2, 3):
        (run / "checkpoints" / f"step_{step:07d}.pt").write_bytes(b"x")
    (run / "checkpoints" / "step_0000000.pt").symlink_to(elsewhere / "step_0000001.pt")
    prune(run, keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000000.pt", "step_0000003.pt"]
    assert (elsewhere / "step_0000001.pt").exists()


def test_wsd_with_a_tiny_decay_fraction_still_decays():
    schedule = LRSchedule(1.0, 0, 100, 0.1, Schedule.wsd, decay_fraction=0.001)
    assert schedule(98) == 1.0 and schedule(99) == pytest.approx(0.1)


def test_steps_of_a_token_budget_are_computed_in_one_place():
    assert TrainConfig(max_steps=None, max_tokens=1000).steps(128) == 8
    assert TrainConfig(max_steps=5).steps(128) == 5
    assert "train.max_tokens" in schema_keys()


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.2])
def test_ctrl_c_while_the_command_starts_is_interrupted_not_a_traceback(tmp_path, cache_dir, delay):
    proc = subprocess.Popen([sys.executable, "-m", "gpt_exp.run", *tiny(cache_dir, "train.max_steps=2")],
                            cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(delay)  # within the imports (torch takes seconds), or Hydra's start
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err  # 0: the tiny run finished before the signal came
    assert "Traceback" not in out + err
    if proc.returncode == 130:
        assert err.strip().endswith("interrupted")


def test_a_killed_in_place_resume_leaves_no_stale_completed_summary(tmp_path, cache_dir):
    run = tmp_path / "run"
    assert run_cli("run", *tiny(cache_dir, "train.max_steps=4", "train.ckpt_every=2", f"hydra.run.dir={run}"),
                   cwd=tmp_path).returncode == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    proc = run_cli_async("run", "logger.mode=disabled", f"resume={run}", f"hydra.run.dir={run}", "train.max_steps=400",
                         cwd=tmp_path)
    wait_for_rows(run, 8, proc)
    proc.kill()
    proc.wait(timeout=60)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "running" and summary["resumed_at_step"] == 4  # not the first segment's `completed`


@pytest.mark.parametrize("args, expected", [
    (["sample.seed=4294967296"], "error: sample.seed=4294967296 is invalid: it must be in [0, 2**32)"),
    (["train.sample_every=1", "model.block_size=8", "T=8", "sample.prompts=[one two three four five six seven eight]"],
     "error: sample.prompts=[one two three four f...] is invalid: a prompt of 8 tokens fills model.block_size=8"),
    (["init_from=no/such/run"], "error: init_from=no/such/run does not exist"),
])
def test_settings_that_would_fail_mid_run_fail_before_it(tmp_path, cache_dir, args, expected):
    result = run_cli("run", *tiny(cache_dir, "train.max_steps=2"), *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(expected), result.stderr
    assert not (tmp_path / "outputs").exists()


def test_resumed_and_requeued_runs_are_read_as_what_trained_by_the_tools(tmp_path, cache_dir):
    """compare's and scaling's reader (run_reader), and scaling's N, see the 3-layer model a resume and a requeue
    trained, not the command line's default (gpt2: 12 layers)."""
    from gpt_exp.run_reader import architecture, load_run
    from gpt_exp.shapes import param_counts

    a, b, auto = tmp_path / "a", tmp_path / "b", tmp_path / "auto"
    shape = ("model.n_layer=3", "optim.lr=1e-3", "train.ckpt_every=2")
    assert run_cli("run", *tiny(cache_dir, *shape, "train.max_steps=4", f"hydra.run.dir={a}"), cwd=tmp_path).returncode == 0
    assert run_cli("run", "logger.mode=disabled", f"resume={a}", "train.max_steps=6", f"hydra.run.dir={b}",
                   cwd=tmp_path).returncode == 0
    assert stop_at(tmp_path, [*tiny(cache_dir, *shape, "train.max_steps=400", "resume=auto")], auto, 3) == 143
    # the requeue's line is the job's own, with a shorter budget (a group such as model=tiny names the whole section:
    # given alone on a resume it would bring tiny's 2 layers, which the checkpoint's weights refuse)
    requeue = run_cli("run", *tiny(cache_dir, *shape, "resume=auto", "train.max_steps=6", f"hydra.run.dir={auto}"),
                      cwd=tmp_path)
    assert requeue.returncode == 0, requeue.stderr
    for run in (b, auto):
        record = load_run(run)
        assert record.params["model.n_layer"] == 3 and record.params["optim.lr"] == 1e-3
        assert record.status == "completed"
        n = param_counts(3, 24, 50257, 256, **architecture(record.params))[0]
        assert n == param_counts(3, 24, 50257, 256)[0] != param_counts(12, 24, 50257, 256)[0]


def test_a_setting_this_version_lacks_is_ignored_not_listed_as_a_change(tmp_path, finished_run):
    state = torch.load(list_checkpoints(finished_run)[-1], weights_only=True)
    state["config"]["train"]["max_stepz"] = 9  # a key of another version
    torch.save(state, tmp_path / "older.pt")
    result = run_cli("run", "logger.mode=disabled", f"resume={tmp_path / 'older.pt'}", "train.max_steps=6",
                     f"hydra.run.dir={tmp_path / 'next'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "next" / "run.log").read_text()
    assert "the checkpoint's settings train.max_stepz no longer exist; ignored" in log
    assert "; changed: train.max_steps: 4 -> 6\n" in log  # and nothing about max_stepz
