"""Adversarial inputs at the seams where one run meets another: checkpoints edited by hand, signals in a run's last
seconds, two processes and odd files in one run dir. Each test reproduces one way a record lied, work was lost or a
mistake ended in a traceback."""

import math

import pytest
import torch

from gpt_exp.checkpoint import list_checkpoints
from tests.helpers import run_cli

TINY = ["model=tiny", "logger.mode=disabled", "optim.warmup_steps=2"]


def tiny(cache_dir, *extra):
    return [*TINY, f"data.cache_dir={cache_dir}", *extra]


@pytest.fixture
def finished_run(tmp_path, cache_dir):
    run = tmp_path / "done"
    assert run_cli("run", *tiny(cache_dir, "train.max_steps=2", "train.ckpt_every=2", f"hydra.run.dir={run}"),
                   cwd=tmp_path).returncode == 0
    return run


# ---- checkpoints edited by hand ----

# fields the trainer reads back after the checked ones: a wrong type there was a traceback at load (weights_at) or
# only at the first eval, after training had started (best_val_loss)
LATE_FIELDS = {
    "weights_at a string": lambda s: s.update(weights_at="oops"),
    "weights_at a step that is a string": lambda s: s.update(weights_at={"model": "4"}),
    "best_val_loss a string": lambda s: s.update(best_val_loss="low"),
    "best_val_loss NaN": lambda s: s.update(best_val_loss=math.nan),
    "skipped a string": lambda s: s.update(skipped="many"),
}


@pytest.mark.parametrize("damage", LATE_FIELDS)
def test_a_damaged_field_the_trainer_reads_late_is_one_line(tmp_path, cache_dir, finished_run, damage):
    state = torch.load(list_checkpoints(finished_run)[-1], weights_only=True)
    LATE_FIELDS[damage](state)
    torch.save(state, tmp_path / "damaged.pt")
    result = run_cli("run", *tiny(cache_dir, f"resume={tmp_path / 'damaged.pt'}", "train.max_steps=4"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: resume: {tmp_path / 'damaged.pt'} is damaged: its ")
    assert not (tmp_path / "outputs").exists()


def test_a_checkpoint_without_the_optional_fields_still_resumes(tmp_path, cache_dir, finished_run):
    state = torch.load(list_checkpoints(finished_run)[-1], weights_only=True)
    for key in ("skipped", "best_val_loss", "weights_at"):  # an older version's checkpoint wrote none of them
        del state[key]
    torch.save(state, tmp_path / "old.pt")
    result = run_cli("run", *tiny(cache_dir, f"resume={tmp_path / 'old.pt'}", "train.max_steps=3"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_changed_setting_that_prints_alike_is_quoted(tmp_path, cache_dir, finished_run):
    state = torch.load(list_checkpoints(finished_run)[-1], weights_only=True)
    state["config"]["model"]["n_layer"] = "2"  # edited by hand: a string where the run wrote 2
    torch.save(state, tmp_path / "edited.pt")
    result = run_cli("run", *tiny(cache_dir, f"resume={tmp_path / 'edited.pt'}", "train.max_steps=4"), cwd=tmp_path)
    assert result.returncode == 2
    assert "(model.n_layer: '2' -> 2)" in result.stderr  # it read "model.n_layer: 2 -> 2": no change to see


def test_a_damaged_newest_checkpoint_names_the_way_on(tmp_path, cache_dir):
    run = tmp_path / "job"
    args = tiny(cache_dir, "train.max_steps=3", "train.ckpt_every=1", f"hydra.run.dir={run}")
    assert run_cli("run", *args, cwd=tmp_path).returncode == 0
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:90])  # a disk that lost its end
    requeue = run_cli("run", *tiny(cache_dir, "train.max_steps=5", "train.ckpt_every=1", "resume=auto",
                                   f"hydra.run.dir={run}"), cwd=tmp_path)
    assert requeue.returncode == 2
    # "use another one in checkpoints/" led nowhere: resume=.../step_0000002.pt in the run's own dir is refused as
    # another history while the damaged step_0000003.pt is the newest
    assert requeue.stderr.strip().endswith(f"move it out of {run / 'checkpoints'} and the run continues from "
                                           f"step_0000002.pt")
    newest.rename(tmp_path / "damaged.pt")
    assert run_cli("run", *tiny(cache_dir, "train.max_steps=5", "train.ckpt_every=1", "resume=auto",
                                f"hydra.run.dir={run}"), cwd=tmp_path).returncode == 0


# ---- the last seconds of a run ----

def test_a_stop_right_after_a_cadence_checkpoint_writes_it_once(tmp_path, cache_dir, monkeypatch):
    import signal

    from gpt_exp import trainer as trainer_module
    from gpt_exp.trainer import StopOnSignal
    from tests.helpers import Collect, make_trainer

    written = []
    real = trainer_module.save_checkpoint
    monkeypatch.setattr(trainer_module, "save_checkpoint",
                        lambda run_dir, state, keep: written.append(state["step"]) or real(run_dir, state, keep))
    trainer = make_trainer(cache_dir, "train.max_steps=10", "train.ckpt_every=1", run_dir=tmp_path)
    stop = StopOnSignal()
    stop.requested = signal.SIGTERM  # SLURM's SIGTERM during step 1, whose checkpoint is due
    assert trainer.fit(Collect(), stop) == "interrupted"
    assert written == [1]  # not [1, 1]: a 124M run's 1.5 GB written twice in a preemption's grace time
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001.pt"]


def test_a_second_signal_during_the_plot_leaves_a_true_summary(tmp_path, monkeypatch):
    import json

    from gpt_exp import tracking
    from gpt_exp.config import LoggerConfig, LoggerMode
    from gpt_exp.metrics import StepMetrics

    def interrupted(*args, **kwargs):  # the second Ctrl-C or SIGTERM, while loss.png is drawn
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "plot_loss_curve", interrupted)
    tracker = tracking.Tracker(tmp_path, LoggerConfig(mode=LoggerMode.disabled), "run", None, {}, total_steps=1)
    tracker.log_step(StepMetrics(0, 10.9, 6e-4, 1.0, 10.0, 1000.0, 128))
    with pytest.raises(KeyboardInterrupt):
        tracker.close("completed")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1  # not `running` beside a run that has ended


def test_a_run_that_cannot_write_its_weights_names_a_fix_of_the_run(tmp_path, cache_dir, monkeypatch):
    import errno

    from gpt_exp import hf
    from gpt_exp.errors import UserError
    from tests.helpers import make_trainer

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(hf, "atomic_write_bytes", disk_full)
    trainer = make_trainer(cache_dir, "train.max_steps=1", run_dir=tmp_path)
    with pytest.raises(UserError) as e:
        trainer.save_weights("model")
    assert "export" not in str(e.value)  # it said "or export elsewhere": a run is not an export
    assert str(e.value).endswith("or train in another dir (hydra.run.dir=DIR), or keep no weights "
                                 "(train.save_model=none)")
    assert not (tmp_path / "model").exists() and not list(tmp_path.glob(".*"))


def test_a_kill_before_model_is_renamed_into_place_leaves_nothing_the_next_start_keeps(tmp_path, cache_dir):
    import subprocess
    import sys

    from tests.helpers import cli_env

    run = tmp_path / "job"
    args = tiny(cache_dir, "resume=auto", "train.max_steps=2", "train.ckpt_every=1", f"hydra.run.dir={run}")
    script = ("import os, signal, sys\n"
              "import gpt_exp.run as run, gpt_exp.trainer as trainer\n"
              "def killed(new, target):\n"
              "    os.kill(os.getpid(), signal.SIGKILL)  # the whole new model/ is written, not yet in place\n"
              "trainer.replace_dir = killed\n"
              f"sys.argv = ['gpt_exp.run', *{args!r}]\n"
              "run.main()\n")
    killed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9
    assert [p.name for p in run.glob(".model*")]  # a whole model's copy (500 MB for GPT-2, 6 GB for XL)
    requeued = run_cli("run", *tiny(cache_dir, "resume=auto", "train.max_steps=3", "train.ckpt_every=1",
                                    f"hydra.run.dir={run}"), cwd=tmp_path)
    assert requeued.returncode == 0, requeued.stderr
    assert [p.name for p in run.glob(".model*")] == []  # `.model.new-PID` stayed there forever
    assert (run / "model" / "config.json").is_file()


# ---- found at the seams of run.py, resolve.py and rundir.py ----

def test_a_lock_file_that_is_a_symlink_never_writes_through(tmp_path, cache_dir, finished_run):
    precious = tmp_path / "notes.txt"
    precious.write_text("my notes\n")
    (finished_run / ".gpt_exp.lock").symlink_to(precious)
    run_cli("run", *tiny(cache_dir, "resume=auto", f"hydra.run.dir={finished_run}", "train.max_steps=2"), cwd=tmp_path)
    assert precious.read_text() == "my notes\n"


def test_a_requeue_while_the_first_job_starts_names_the_holder(tmp_path, cache_dir):
    import fcntl
    import os

    run = tmp_path / "job"
    run.mkdir()
    (run / "run.log").write_text("")  # the first job's Hydra log, before its .hydra is written
    fd = os.open(run / ".gpt_exp.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b'{"host": "node1", "pid": 4242, "started": "2026-12-06 03:00:00"}')
    fcntl.flock(fd, fcntl.LOCK_EX)  # the first job holds it
    try:
        result = run_cli("run", *tiny(cache_dir, "resume=auto", f"hydra.run.dir={run}", "train.max_steps=2"),
                         cwd=tmp_path)
    finally:
        os.close(fd)
    assert result.returncode == 2
    assert "in use by another gpt_exp process (host node1, pid 4242" in result.stderr


def test_a_lock_path_that_is_a_dir_is_one_error_line(tmp_path, cache_dir, finished_run):
    import subprocess
    import sys

    from tests.helpers import cli_env

    (finished_run / ".gpt_exp.lock").mkdir()
    # a process of its own: in this one, pytest would catch the warning that a user sees on stderr
    result = subprocess.run([sys.executable, "-m", "gpt_exp.run", *tiny(cache_dir, "resume=auto",
                                                                          f"hydra.run.dir={finished_run}")],
                            cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and ".gpt_exp.lock" in line


def test_sigterm_while_the_data_loads_leaves_a_dir_a_requeue_can_use(tmp_path, cache_dir):
    import subprocess
    import sys

    from tests.helpers import cli_env

    run = tmp_path / "job"
    args = tiny(cache_dir, "resume=auto", f"hydra.run.dir={run}", "train.max_steps=2")
    script = ("import os, signal, sys\n"
              "import gpt_exp.run as run, gpt_exp.trainer as trainer\n"
              "def loading(*a, **k):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)  # SLURM's preemption, while the corpus is tokenized\n"
              "trainer.prepare_tokens = loading\n"
              f"sys.argv = ['gpt_exp.run', *{args!r}]\n"
              "run.main()\n")
    killed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode != 0
    requeued = run_cli("run", *args, cwd=tmp_path)
    assert requeued.returncode == 0, requeued.stderr


def test_a_resume_is_checked_against_the_checkpoints_settings(tmp_path, cache_dir):
    run = tmp_path / "mup"
    assert run_cli("run", *tiny(cache_dir, "model.parametrization=mup", "train.max_steps=2", "train.ckpt_every=2",
                                f"hydra.run.dir={run}"), cwd=tmp_path).returncode == 0
    result = run_cli("run", "logger.mode=disabled", f"data.cache_dir={cache_dir}", f"resume={run}",
                     "model.mup_embed_lr_mult=2.0", "train.max_steps=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_resume_refused_for_its_history_keeps_the_record(tmp_path, cache_dir, finished_run):
    import yaml

    metrics = finished_run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], '{"step": 1, "loss": 10.8', *lines[2:]]) + "\n")  # a line cut mid-way
    before = (finished_run / ".hydra" / "config.yaml").read_text()
    result = run_cli("run", *tiny(cache_dir, "resume=auto", f"hydra.run.dir={finished_run}", "train.max_steps=6",
                                  "train.ckpt_every=2"), cwd=tmp_path)
    assert result.returncode == 2 and "metrics.jsonl line 2 is not JSON" in result.stderr
    assert yaml.safe_load((finished_run / ".hydra" / "config.yaml").read_text())["train"]["max_steps"] == 2
    assert (finished_run / ".hydra" / "config.yaml").read_text() == before


def test_a_checkpoint_setting_of_the_wrong_type_names_the_checkpoint(tmp_path, cache_dir, finished_run):
    state = torch.load(list_checkpoints(finished_run)[-1], weights_only=True)
    state["config"]["train"]["max_steps"] = "ten"
    torch.save(state, tmp_path / "edited.pt")
    result = run_cli("run", *tiny(cache_dir, f"resume={tmp_path / 'edited.pt'}", "train.max_steps=4"), cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert str(tmp_path / "edited.pt") in line


def test_a_run_dir_with_a_tilde_is_guarded_where_it_is_written(tmp_path, cache_dir):
    result = run_cli("run", *tiny(cache_dir, "train.max_steps=1", 'hydra.run.dir="~/r"'), cwd=tmp_path)  # HOME: cwd
    written = tmp_path / "~" / "r"
    if result.returncode == 0:
        assert (written / "summary.json").is_file()
    assert not (tmp_path / "r").exists()  # a dir of the user's home the run never wrote into
