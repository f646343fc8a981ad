"""The Hydra entry point: `python -m gpt_exp.run [overrides]` composes and validates the config, then trains.

Glue only: where the run lives (gpt_exp/rundir.py), who this process is under torchrun (distributed.py), what W&B
calls the run; the loop is gpt_exp/trainer.py. A mistake ends as one line and exit code 2 (gpt_exp/cli.py), a
diverged run with 3; in a sweep a failed job ends that job alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt_exp import resolve, rundir
from gpt_exp.checkpoint import Resume, embedding_rows, init_weights, list_checkpoints, open_resume, remove_stale_temp_files
from gpt_exp.cli import fail, is_user_error, user_error_line
from gpt_exp.config import MODEL_SHAPE, RunConfig, register_schema
from gpt_exp.device import resolve_runtime
from gpt_exp.distributed import broadcast, destroy, init_process_group
from gpt_exp.errors import EXIT_SWEEP_FAILED, ConfigError, Diverged, UserError, first_line
from gpt_exp.launch import Dist, is_main_process, launch_env
from gpt_exp.rundir import below_outputs, overrides_name, register_resolvers, sweep_group, swept_keys
from gpt_exp.tracking import RankTracker, Tracker, write_summary
from gpt_exp.trainer import LRSchedule, StopOnSignal, Trainer, probe_B, tokens_per_step

log = logging.getLogger("gpt_exp")


@dataclass(frozen=True)
class Launch:
    """What the launcher knows of this job: where the run lives, what W&B calls it, the cores it may use."""

    run_dir: Path
    name: str
    group: str | None = None
    overrides: tuple[str, ...] = ()
    threads: int | None = None  # CPU threads; None: every core
    job: int | None = None  # the job's number in a sweep

    @classmethod
    def from_hydra(cls, cfg: RunConfig) -> "Launch":
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        name, group = wandb_identity(cfg, hc, run_dir)
        job = hc.job.num if hc.mode == RunMode.MULTIRUN else None
        return cls(run_dir, name, group, tuple(hc.overrides.task), launcher_threads(hc), job)


class JobPrefix(logging.Filter):
    """'[job 3] ' before each console line of a sweep's job, so that parallel jobs' lines can be told apart."""

    def __init__(self, job: int):
        super().__init__()
        self.prefix = f"[job {job}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def prefix_console_lines(job: int) -> None:
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):  # the record is shared: run.log's lines carry it too
            handler.addFilter(JobPrefix(job))


def launcher_threads(hc) -> int | None:
    """CPU threads a job may use under its launcher: joblib's parallel jobs share the cores, a submitit job
    gets its cpus_per_task; None: no limit known (all cores)."""
    if hc.mode != RunMode.MULTIRUN:
        return None
    launcher = hc.launcher
    target = str(launcher.get("_target_", ""))
    if "joblib" in target:
        n_jobs = launcher.get("n_jobs") or 1
        parallel = n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)  # joblib: -1 = every core
        return max(1, (os.cpu_count() or 1) // parallel)
    if "submitit" in target:
        return launcher.get("cpus_per_task")
    return None


def wandb_identity(cfg: RunConfig, hc, run_dir: Path) -> tuple[str, str | None]:
    """(name, group): a sweep's jobs share a group named after the sweep dir and are named by their overrides."""
    if hc.mode == RunMode.MULTIRUN:
        keys = swept_keys(Path(hc.sweep.dir), hc.sweeper.get("params"))
        name = overrides_name(list(hc.overrides.task), keys) or f"job{hc.job.num}"
        return cfg.logger.name or name, cfg.logger.group or sweep_group(Path(hc.sweep.dir), list(hc.overrides.task))
    return cfg.logger.name or below_outputs(run_dir), cfg.logger.group


def run(dict_cfg: DictConfig, launch: Launch | None = None) -> float:
    """One training run; returns the final val loss, or the final training loss without a val split (what a sweeper
    minimizes). `launch` defaults to what Hydra says of this job."""
    started_at = time.perf_counter()
    OmegaConf.to_object(dict_cfg)  # an interpolation that cannot resolve fails here, naming its key
    overrides = launch.overrides if launch else tuple(HydraConfig.get().overrides.task)
    cfg = resolve.fresh(dict_cfg, overrides)  # the command's own settings, checked before anything else
    launch = launch or Launch.from_hydra(cfg)
    if launch.job is not None:
        prefix_console_lines(launch.job)
    d = launch_env()
    runtime = resolve_runtime(cfg.device, launch.threads, local_rank=d.local_rank)
    init_process_group(d, runtime.device_type)
    if not d.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one console: rank 0's
    run_dir = Path(broadcast(str(launch.run_dir), d))  # rank 0 decides where the run lives
    try:
        with interrupt_on_signals():  # until training starts, SIGTERM and SIGHUP end the start as Ctrl-C does
            if d.is_main:
                rundir.lock(run_dir)
            resumed = resume_target(cfg, run_dir)
            cfg, init = resolved(cfg, dict_cfg, launch, resumed)
            autobatch = probe_B(cfg, runtime, d) if cfg.B == "auto" else None
            if autobatch is not None:
                cfg = resolve.with_B(cfg, autobatch.B)
            runtime = resolve_runtime(cfg.device, launch.threads, local_rank=d.local_rank)
            config = resolve.as_dict(cfg)  # what the run trains with, and so what it records everywhere
            if resumed is not None:
                resumed.check(config)
        return train(cfg, config, launch, d, runtime, run_dir, started_at, resumed, init, autobatch)
    except BaseException as e:
        if (oom := out_of_memory(e, cfg)) is not None:
            raise oom from None
        raise
    finally:
        if d.is_main:
            rundir.unlock(run_dir)
        destroy(d)


@contextlib.contextmanager
def interrupt_on_signals():
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so that a start they stop removes what it made."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resume_target(cfg: RunConfig, run_dir: Path) -> Resume | None:
    """The checkpoint to continue from: resume=RUN_DIR or PATH.pt, or resume=auto: this run dir's newest complete
    checkpoint when it has one (a requeued SLURM job goes on), a fresh start in a dir without a run."""
    if cfg.resume and cfg.init_from:
        raise ConfigError(f"resume={cfg.resume} and init_from={cfg.init_from} exclude each other: resume continues a "
                          f"run (its optimizer, data position, step), init_from starts a new one from weights; give one")
    if cfg.resume != "auto":
        return open_resume(cfg.resume, run_dir) if cfg.resume else None
    if list_checkpoints(run_dir):
        return open_resume(str(run_dir), run_dir)
    if (run_dir / "summary.json").exists() or (run_dir / "metrics.jsonl").exists():
        status = read_status(run_dir)
        if status == "completed":
            raise Finished(f"resume=auto: the run in {run_dir} has finished; nothing to do")
        raise ConfigError(f"resume=auto: {run_dir} holds a run ({status}) without a checkpoint to continue from; give a "
                          f"new dir (train.ckpt_every=N keeps checkpoints to continue from)")
    log.info("resume=auto: no checkpoint in %s yet; starting fresh", run_dir)
    return None


class Finished(UserError):
    """A requeue of a run that has finished: it says so and changes nothing."""


def read_status(run_dir: Path) -> str:
    try:
        return str(json.loads((run_dir / "summary.json").read_text()).get("status", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "no summary"


def resolved(cfg: RunConfig, dict_cfg: DictConfig, launch: Launch, resumed: Resume | None):
    """The settings the run trains with (resume: the checkpoint's, this command's changes on top; init_from=hf:DIR:
    that dir's shape), and the weights init_from names."""
    if resumed is not None:
        where = f"resume: {resumed.path}"
        return resolve.resumed(resumed.config, resumed.state.get("B"), dict_cfg, launch.overrides, where), None
    init = init_weights(cfg.init_from) if cfg.init_from else None
    if init is not None and cfg.init_from.startswith("hf:"):
        shape = {key: getattr(init[0].config, key) for key in MODEL_SHAPE}
        cfg = resolve.adopt_shape(cfg, shape, cfg.init_from, launch.overrides)
    return cfg, init


def check_steps_left(trainer: Trainer, resumed: Resume) -> None:
    """A resume must have steps to train: one whose steps end at its checkpoint has nothing to do, one that ends
    before it is refused."""
    steps, t = trainer.max_steps, trainer.cfg.train
    if steps < resumed.step:
        key, value = ("train.max_steps", t.max_steps) if t.max_steps else ("train.max_tokens", t.max_tokens)
        raise ConfigError(f"{key}={value} ends at step {steps}, before the checkpoint's step {resumed.step}; give more "
                          f"steps to continue, or branch from an earlier checkpoint (resume=RUN_DIR/checkpoints/"
                          f"step_N.pt)")
    if steps == resumed.step:
        raise Finished(f"resume: the run has trained its {steps} steps (checkpoint {resumed.path}); nothing to do")


def train(cfg: RunConfig, config: dict, launch: Launch, d: Dist, runtime, run_dir: Path, started_at: float,
          resumed: Resume | None = None, init: tuple[torch.nn.Module, str] | None = None, autobatch=None) -> float:
    rows = embedding_rows(resumed.state["model"]) if resumed else None
    trainer = Trainer(cfg, runtime, d, run_dir, config, saved_vocab_rows=rows, autobatch=autobatch)
    if resumed:
        trainer.load_state_dict(resumed.state)
        check_steps_left(trainer, resumed)
        log.info("resumed from %s at step %d%s", resumed.path, resumed.step,
                 f"; changed: {', '.join(resumed.changes)}" if resumed.changes else "")
        if (note := schedule_change(resumed, trainer)) is not None:
            log.info("%s", note)
    elif init is not None:
        model, source = init
        trainer.load_weights(model.state_dict(), f"init_from={cfg.init_from}")
        log.info("initialized from %s (weights only: a fresh optimizer, step 0)", source)
    if d.is_main:
        rundir.record(run_dir, config, launch.overrides)  # only now: a start that failed records nothing
        rundir.mark_started(run_dir)  # from here on, whatever fails, the run's files stay
        remove_stale_temp_files(run_dir)
    status, error = "failed", None
    with StopOnSignal() as stop:  # the end of a run is protected like its middle: checkpoint, weights, summary
        tracker = Tracker(
            run_dir, cfg.logger, launch.name, launch.group, {**config, "overrides": list(launch.overrides)},
            trainer.max_steps, cfg.train.log_every, started_at=started_at,
            previous_rows=resumed.metrics_before() if resumed else [], wandb_id=resumed.wandb_id if resumed else None,
            summary_extra={**(resumed.summary() if resumed else {}), "train_split_tokens": len(trainer.loader.source)},
            flops_per_token=trainer.model.flops_per_token(cfg.T),
            peak_flops=runtime.peak_flops * d.world_size if runtime.peak_flops else None, runtime=trainer.what_runs(),
        ) if d.is_main else RankTracker()
        try:
            status = trainer.fit(tracker, stop)
        except BaseException as e:  # noqa: BLE001 -- recorded in the summary, then raised on
            error = out_of_memory(e, cfg) or e
            status = ("diverged" if isinstance(error, Diverged) else
                      "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
        # the summary says how the run ended; a failure to write it never hides the error that ended the run
        summary = tracker.close(status, reason=failure_line(error), raise_errors=error is None)
    if error is not None:
        raise error
    if status == "interrupted":
        if list_checkpoints(run_dir):  # the checkpoint holds the run's settings: the line works as printed
            log.info("interrupted at step %d; continue with: python -m gpt_exp.run resume=%s", trainer.step, run_dir)
        else:
            log.info("interrupted at step %d; no checkpoint to continue from (train.ckpt_every=N keeps them)",
                     trainer.step)
        raise SystemExit(128 + (trainer.stop_signal or signal.SIGINT))
    return summary.get("final_val_loss", summary.get("final_loss", math.nan))


def schedule_change(resumed: Resume, trainer: Trainer) -> str | None:
    """One line when the resumed run's lr schedule differs from the checkpoint's at the step it resumes from (a
    longer or shorter cosine moves the lr at once; wsd's stable phase does not)."""
    saved = resolve.settings_of_checkpoint(resumed.config)
    before = LRSchedule.of(saved.optim, saved.train.steps(trainer.tokens_per_step))(resumed.step)
    after = trainer.schedule(resumed.step)
    if math.isclose(before, after, rel_tol=1e-9):
        return None
    return (f"resume: the lr at step {resumed.step} is {after:.3g} (it was {before:.3g} under the checkpoint's "
            f"schedule, train.max_steps {saved.train.steps(trainer.tokens_per_step)} -> {trainer.max_steps}); "
            f"optim.schedule=wsd extends a run without a jump")


def failure_line(e: BaseException | None) -> str | None:
    """The one line that says why a run ended early (None: it did not fail)."""
    if e is None or isinstance(e, KeyboardInterrupt):
        return None
    if is_user_error(e):
        return user_error_line(e)
    return f"{type(e).__name__}: {first_line(e)} (a bug in gpt_exp: the traceback is in run.log)"


def out_of_memory(e: BaseException, cfg: RunConfig) -> UserError | None:
    """A device or host out-of-memory as one line naming B=auto and the knobs that fix it; None for anything else."""
    cpu_oom = isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or cpu_oom):
        return None
    B = cfg.B if isinstance(cfg.B, int) else 1
    step = cfg.train.total_batch_size or B * cfg.T
    return UserError(f"out of memory at B={B}, T={cfg.T} (model {cfg.model.name}); use B=auto "
                     f"train.total_batch_size={step} (the largest micro-batch that fits, the same tokens per step), "
                     f"or a smaller B, e.g. B={max(1, B // 2)} train.total_batch_size={step}")


def sweep_job(cfg: DictConfig, hc, run_dir: Path) -> float:
    """One job of a sweep: whatever fails ends this job alone, as a failed row with its reason; the sweep goes on.
    Returns NaN for a failed job, which Optuna records as a failed trial."""
    try:
        return run(cfg)
    except Exception as e:  # noqa: BLE001 -- even a bug must not take the other jobs down
        if not is_user_error(e):
            log.error("job %d failed:\n%s", hc.job.num, traceback.format_exc())
        summary = run_dir / "summary.json"
        if is_main_process() and not summary.exists():  # failed before the run wrote its own summary
            write_summary(run_dir, {"status": "diverged" if isinstance(e, Diverged) else "failed",
                                    "error": failure_line(e)})
            if not (run_dir / rundir.RECORD).exists():  # what the job was asked to train, so compare shows its row
                with contextlib.suppress(OmegaConfBaseException):  # an override that cannot resolve: no record
                    rundir.record(run_dir, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                                  list(hc.overrides.task))
        line = f"job {hc.job.num} ({run_dir}): {failure_line(e)}"
        print(f"error: {line}", file=sys.stderr)
        if "optuna" in str(hc.sweeper.get("_target_", "")):
            # Optuna's Hydra plugin records a trial as failed only when its job raises (a NaN breaks the plugin)
            tolerant = hc.sweeper.get("max_failure_rate", 0) >= 1
            raise JobFailed(line if tolerant else f"{line}; an Optuna search stops at a failed trial unless "
                            f"hydra.sweeper.max_failure_rate=1.0 (as +experiment=optuna_search sets)") from None
        return math.nan


class JobFailed(UserError):
    """A sweep job that failed, raised for a sweeper that counts failures itself (Optuna)."""


register_schema()
register_resolvers()


@hydra.main(config_path="pkg://gpt_exp.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        return sweep_job(cfg, hc, run_dir)
    try:
        return run(cfg)
    except Finished as done:
        log.info("%s", done)
        rundir.discard(run_dir)  # only what this start made (its lock): the finished run is left as it was
        return math.nan
    except Exception as e:
        if not is_user_error(e):  # a bug: Hydra reports it with its traceback
            raise
        # Caught here, not in main(), so Hydra adds no "Error executing job" report. A run that failed its checks
        # removes what it created (so nothing can pass for a run) and nothing else.
        if is_main_process():
            rundir.discard(run_dir)
        fail(e)


def main() -> None:
    # Hydra raises its composition errors to us instead of printing a multi-line report: we print one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    # A log line that cannot be written (a full disk) is dropped, not reported as a traceback: the run's own writes
    # fail on the same disk with one error line.
    logging.raiseExceptions = False
    scratch = None
    if not is_main_process():
        sys.argv, scratch = rundir.scratch_argv(sys.argv)
    try:
        _hydra_main()
    except Exception as e:
        if not is_user_error(e):
            raise
        rundir.discard_all()
        fail(e)
    except rundir.Refused as refused:
        fail(refused.error)
    except KeyboardInterrupt:
        rundir.discard_all()  # a start stopped before training leaves nothing; a run that trained keeps its files
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)  # this rank's own Hydra files, in a dir it made
    if rundir.sweep_failures:
        sys.exit(EXIT_SWEEP_FAILED)


if __name__ == "__main__":
    main()
