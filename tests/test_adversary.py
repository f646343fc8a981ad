"""Adversarial inputs at the seams where one run meets another: checkpoints edited by hand, signals in a run's last
seconds, two processes and odd files in one run dir. Each test reproduces one way a record lied, work was lost or a
mistake ended in a traceback. The xfail ones are known bugs whose fix belongs to run.py, resolve.py or rundir.py."""

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
