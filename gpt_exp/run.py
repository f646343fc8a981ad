"""The Hydra entry point: `python -m gpt_exp.run [overrides]`: compose, resolve, build, fit, exit code.

Glue only: where the run lives and who owns it (rundir.py), what the run trains with (resolve.py), the loop
(trainer.py). A mistake ends as one line and exit code 2 (cli.py), a diverged run with 3; a sweep's failed job
ends that job alone.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gpt_exp import resolve, rundir
from gpt_exp.checkpoint import embedding_rows, remove_stale_temp_files
from gpt_exp.cli import fail, is_user_error, restore_ctrl_c
from gpt_exp.config import register_schema
from gpt_exp.device import resolve_runtime
from gpt_exp.distributed import broadcast, destroy, init_process_group
from gpt_exp.errors import EXIT_SWEEP_FAILED, Finished
from gpt_exp.job import Launch, fit, prefix_console_lines, same_job, sweep_job
from gpt_exp.launch import is_main_process, launch_env
from gpt_exp.trainer import Trainer, interrupt_on_signals, out_of_memory

log = logging.getLogger("gpt_exp")


def run(dict_cfg: DictConfig, launch: Launch | None = None) -> float:
    """One training run; returns the final val loss, or the final training loss without a val split (what a sweeper
    minimizes). `launch` defaults to what Hydra says of this job."""
    started_at = time.perf_counter()
    OmegaConf.to_object(dict_cfg)  # an interpolation that cannot resolve fails here, naming its key
    cfg = resolve.fresh(dict_cfg, launch.overrides if launch else tuple(HydraConfig.get().overrides.task))
    launch = launch or Launch.from_hydra(cfg)
    if launch.job is not None:
        prefix_console_lines(launch.job)
    d = launch_env()
    init_process_group(d, resolve_runtime(cfg.device, launch.threads, local_rank=d.local_rank).device_type)
    if not d.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one console: rank 0's
    run_dir = Path(broadcast(str(launch.run_dir), d))  # rank 0 decides where the run lives
    try:
        with interrupt_on_signals():
            if d.is_main:
                rundir.lock(run_dir)
            r = resolve.resolve_run(cfg, dict_cfg, launch.overrides, run_dir, d, launch.threads)
            if r.resumed is not None and launch.job is not None and cfg.resume == "auto":
                same_job(r.resumed.config, r.config, launch.swept, launch.job)
            trainer = Trainer(r.cfg, r.runtime, d, run_dir, r.config, autobatch=r.autobatch,
                              saved_vocab_rows=embedding_rows(r.resumed.state["model"]) if r.resumed else None)
            if r.resumed:
                trainer.resume(r.resumed)
            elif r.init is not None:
                trainer.load_weights(r.init[0].state_dict(), f"init_from={r.cfg.init_from}")
                log.info("initialized from %s (weights only: a fresh optimizer, step 0)", r.init[1])
            history = r.resumed.metrics_before() if r.resumed and d.is_main else []  # a broken one: before a record
        if d.is_main:
            rundir.record(run_dir, r.config, launch.overrides)  # only now: a start that failed records nothing
            rundir.mark_started(run_dir)  # from here on, whatever fails, the run's files stay
            remove_stale_temp_files(run_dir)
        return fit(trainer, r, launch, run_dir, started_at, history)
    except BaseException as e:
        if (oom := out_of_memory(e, cfg)) is not None:
            raise oom from None
        raise
    finally:
        if d.is_main:
            rundir.unlock(run_dir)
        destroy(d)


register_schema()
rundir.register_resolvers()


@hydra.main(config_path="pkg://gpt_exp.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        return sweep_job(run, cfg, hc, run_dir)
    try:
        return run(cfg)
    except Exception as e:
        if not is_user_error(e):  # a bug: Hydra reports it with its traceback
            raise
        # Caught here, not in main(), so Hydra adds no "Error executing job" report. A start that failed its checks
        # (or found nothing to do) removes what it created, and nothing else.
        if is_main_process():
            rundir.discard(run_dir)
        if isinstance(e, Finished):
            log.info("%s", e)
            return math.nan
        fail(e)


def main() -> None:
    # Hydra raises its composition errors to us instead of printing a multi-line report: we print one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    restore_ctrl_c()
    # A log line that cannot be written (a full disk) is dropped, not a traceback: the run's own writes fail there
    # with one error line.
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
        rundir.discard_all()  # what the guard made before it refused (its lock, a dir): nothing else
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
