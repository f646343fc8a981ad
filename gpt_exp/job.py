"""The `run` command's view of its job: where the run lives, what W&B calls it, which job of a sweep it is and the
CPU threads its launcher gives it; a sweep job's `[job N]` console prefix, and how a failed job ends (alone)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt_exp import rundir
from gpt_exp.checkpoint import list_checkpoints
from gpt_exp.cli import is_user_error, user_error_line
from gpt_exp.config import RunConfig, flatten
from gpt_exp.errors import ConfigError, Diverged, Finished, UserError, first_line
from gpt_exp.launch import is_main_process
from gpt_exp.resolve import Resolved
from gpt_exp.rundir import below_outputs, overrides_name, sweep_group, swept_keys
from gpt_exp.tracking import RankTracker, Tracker, write_summary
from gpt_exp.trainer import StopOnSignal, Trainer, out_of_memory

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
    swept: frozenset[str] = frozenset()  # the keys (or groups) its sweep varies

    @classmethod
    def from_hydra(cls, cfg: RunConfig) -> "Launch":
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        name, group = wandb_identity(cfg, hc, run_dir)
        if hc.mode != RunMode.MULTIRUN:
            return cls(run_dir, name, group, tuple(hc.overrides.task), launcher_threads(hc))
        swept = swept_keys(Path(hc.sweep.dir), hc.sweeper.get("params")) or set()
        return cls(run_dir, name, group, tuple(hc.overrides.task), launcher_threads(hc), hc.job.num, frozenset(swept))


def same_job(saved: dict, config: dict, swept: frozenset[str], job: int) -> None:
    """A requeued sweep's job goes on only from its own run: every key (or group) the sweep varies must be what the
    job dir's checkpoint trained with. A resubmission that reorders or changes the values would otherwise continue
    one configuration's run under another's name."""
    old, new = flatten(saved), flatten(config)
    differ = sorted(k for k in old.keys() | new.keys() if any(k == s or k.startswith(f"{s}.") for s in swept)
                    and old.get(k) != new.get(k))
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in differ)
        raise ConfigError(f"resume=auto: job {job}'s dir holds another configuration of the sweep ({shown}); resubmit "
                          f"the sweep with the same values in the same order, or give a new hydra.sweep.dir")


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


def fit(trainer: Trainer, r: Resolved, launch: Launch, run_dir: Path, started_at: float, history: list[dict]) -> float:
    """Train, with the run's end (checkpoint, weights, summary) protected from signals like its middle."""
    cfg, d, status, error = r.cfg, trainer.d, "failed", None
    with StopOnSignal() as stop:
        tracker = Tracker(
            run_dir, cfg.logger, launch.name, launch.group, {**r.config, "overrides": list(launch.overrides)},
            trainer.max_steps, cfg.train.log_every, started_at=started_at, previous_rows=history,
            wandb_id=r.resumed.wandb_id if r.resumed else None,
            summary_extra={**(r.resumed.summary() if r.resumed else {}),
                           "train_split_tokens": trainer.train_split_tokens},
            flops_per_token=trainer.model.flops_per_token(cfg.T), runtime=trainer.what_runs(),
            peak_flops=r.runtime.peak_flops * d.world_size if r.runtime.peak_flops else None,
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
        log.info("interrupted at step %d; %s", trainer.step,
                 f"continue with: python -m gpt_exp.run resume={run_dir}" if list_checkpoints(run_dir) else
                 "no checkpoint to continue from (train.ckpt_every=N keeps them)")
        raise SystemExit(128 + (trainer.stop_signal or signal.SIGINT))
    return summary.get("final_val_loss", summary.get("final_loss", math.nan))


def failure_line(e: BaseException | None) -> str | None:
    """The one line that says why a run ended early (None: it did not fail)."""
    if e is None or isinstance(e, KeyboardInterrupt):
        return None
    if is_user_error(e):
        return user_error_line(e)
    return f"{type(e).__name__}: {first_line(e)} (a bug in gpt_exp: the traceback is in run.log)"


def sweep_job(run: Callable[[DictConfig], float], cfg: DictConfig, hc, run_dir: Path) -> float:
    """One job of a sweep: whatever fails ends this job alone, as a failed row with its reason; the sweep goes on.
    Returns NaN for a failed job, which Optuna records as a failed trial."""
    summary = run_dir / "summary.json"
    earlier = summary.read_bytes() if summary.is_file() else None  # a requeued job's: kept unless the run starts
    try:
        return run(cfg)
    except Finished as done:  # a requeued job whose run has trained all its steps
        log.info("%s", done)
        return math.nan
    except Exception as e:  # noqa: BLE001 -- even a bug must not take the other jobs down
        if not is_user_error(e):
            log.error("job %d failed:\n%s", hc.job.num, traceback.format_exc())
        if is_main_process() and earlier is not None and summary.is_file() and summary.read_bytes() == earlier:
            rundir.jobs_failed_beside_results.append(hc.job.num)  # refused before it started: the summary is not its
        if is_main_process() and not summary.exists():  # failed before the run's own summary
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
