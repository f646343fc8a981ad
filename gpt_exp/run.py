"""The Hydra entry point: `python -m gpt_exp.run [overrides]` composes the config and wires the modules.

User mistakes (config or data) end as one line on stderr and exit code 2; anything else is a bug and raises.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt_exp.checkpoint import load_resume, remove_stale_temp_files, rng_state, save_checkpoint
from gpt_exp.config import (ConfigError, CpuMatmul, DataError, DType, RunConfig, Strategy, UserError, register_schema,
                            validate)
from gpt_exp.data import BatchLoader, ShardedTokens, prepare_tokens, split_tokens
from gpt_exp.device import Runtime, resolve_runtime
from gpt_exp.distributed import Dist, broadcast, destroy, full_state, init_process_group, launch_env, shard_model
from gpt_exp.errors import is_user_error, user_error_line
from gpt_exp import rundir
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.rundir import below_outputs, overrides_name, register_resolvers, swept_keys
from gpt_exp.tracking import RankTracker, Tracker, write_summary
from gpt_exp.train import Diverged, LRSchedule, StepMetrics, StopOnSignal, evaluate, train

log = logging.getLogger("gpt_exp")


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
        return cfg.logger.name or name, cfg.logger.group or below_outputs(Path(hc.sweep.dir))
    return cfg.logger.name or below_outputs(run_dir), cfg.logger.group


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def run(dict_cfg: DictConfig) -> float:
    """One training run; returns the final val loss, or the final training loss without a val split."""
    started_at = time.perf_counter()
    cfg: RunConfig = OmegaConf.to_object(dict_cfg)
    validate(cfg)
    hc = HydraConfig.get()
    d = launch_env()
    runtime = resolve_runtime(cfg.device, launcher_threads(hc), local_rank=d.local_rank)
    init_process_group(d, runtime.device_type)
    if not d.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one console: rank 0's
    run_dir = Path(broadcast(hc.runtime.output_dir, d))  # rank 0 decides where the run lives
    try:
        return train_run(cfg, dict_cfg, hc, d, runtime, run_dir, started_at)
    finally:
        destroy(d)


def train_run(cfg: RunConfig, dict_cfg: DictConfig, hc, d: Dist, runtime: Runtime, run_dir: Path,
              started_at: float) -> float:
    config = OmegaConf.to_container(dict_cfg, resolve=True, enum_to_str=True)
    resumed = load_resume(cfg.resume, config, run_dir) if cfg.resume else None
    seed_everything(cfg.train.seed)

    tokens = prepare_tokens(cfg.data).load()
    train_tokens, val_tokens = split_tokens(tokens, cfg.data.val_fraction)
    log.info("loaded %s tokens (train %s, val %s)", f"{len(tokens):,}", f"{len(train_tokens):,}", f"{len(val_tokens):,}")
    loader = BatchLoader(train_tokens, cfg.B, cfg.T, d.rank, d.world_size, cfg.train.overfit_batches,
                         shuffle_seed=cfg.data.shuffle_seed)
    log.info("1 epoch = %s batches", f"{loader.batches_per_epoch:,}")
    val_loader = val_batches(val_tokens, cfg, d) if cfg.train.eval_every else None

    micro_batch = cfg.B * cfg.T * d.world_size
    tokens_per_step = cfg.train.total_batch_size or micro_batch
    if tokens_per_step % micro_batch:
        raise ConfigError(f"train.total_batch_size={tokens_per_step} is not a multiple of B*T*world_size = "
                          f"{cfg.B}*{cfg.T}*{d.world_size} = {micro_batch}; change it or B")
    grad_accum_steps = tokens_per_step // micro_batch
    m = cfg.model
    model = GPT(GPTConfig(m.block_size, m.vocab_size, m.n_layer, m.n_head, m.n_embd)).to(runtime.device)
    if resumed:
        resumed.restore_model(model)
    if runtime.device_type == "cpu" and not d.enabled:
        model.sparse_embedding_grad()
    onednn = model.onednn_matmuls(cfg.device.cpu_matmul == CpuMatmul.onednn)
    precision = runtime.dtype.value
    if runtime.device_type == "cpu" and runtime.dtype == DType.fp32:
        precision += " (matmuls in oneDNN)" if onednn else " (matmuls in torch's BLAS)"
    sharded = d.enabled and cfg.train.strategy == Strategy.fsdp
    if sharded:
        shard_model(model)  # before the optimizer: it must hold the sharded parameters
    o = cfg.optim
    optimizer = model.configure_optimizer(o.lr, o.weight_decay, tuple(o.betas), o.eps, runtime.device_type,
                                          fused=not sharded)
    start_step, start_tokens = resumed.restore_training(model, optimizer, loader, sharded) if resumed else (0, 0)
    log.info(
        "model %s: %.2fM params | device %s (%d CPU threads), %s, compile %s | %s tokens/step = %d x %d x %d "
        "micro-steps x %d ranks%s", m.name, model.num_params() / 1e6, runtime.device, torch.get_num_threads(),
        precision, "on" if runtime.compile else "off", f"{tokens_per_step:,}", cfg.B, cfg.T,
        grad_accum_steps, d.world_size, " (fsdp)" if sharded else "",
    )
    step_model = torch.compile(model) if runtime.compile else model
    if d.enabled and not sharded:
        step_model = DDP(step_model, device_ids=[d.local_rank] if runtime.device_type == "cuda" else None)
    schedule = LRSchedule(o.lr, o.warmup_steps, cfg.train.max_steps, o.min_lr_ratio, o.schedule)

    name, group = wandb_identity(cfg, hc, run_dir)
    if d.is_main:
        rundir.mark_started(run_dir)  # from here on, whatever fails, the run's files stay
        remove_stale_temp_files(run_dir)
    tracker = Tracker(
        run_dir, cfg.logger, name, group, {**config, "overrides": list(hc.overrides.task)}, cfg.train.max_steps,
        cfg.train.log_every, started_at=started_at, previous_rows=resumed.metrics_before() if resumed else [],
        wandb_id=resumed.wandb_id if resumed else None, summary_extra=resumed.summary() if resumed else {},
        flops_per_token=model.flops_per_token(cfg.T),
        peak_flops=runtime.peak_flops * d.world_size if runtime.peak_flops else None,
    ) if d.is_main else RankTracker()

    def save(step: int, tokens_seen: int) -> None:
        # a checkpoint is the last good state: weights that are no longer finite are never written
        require_finite_weights(model, step)
        model_state, optimizer_state = full_state(model, optimizer, sharded)  # every rank takes part under FSDP
        if not d.is_main:  # rank 0 writes the whole state once
            return
        state = {"step": step, "tokens": tokens_seen, "model": model_state, "optimizer": optimizer_state,
                 "sharded": sharded, "loader": loader.state_dict(), "rng": rng_state(), "config": config,
                 "wandb_id": tracker.wandb_id}
        log.info("checkpoint: %s", save_checkpoint(run_dir, state, cfg.train.keep_ckpts))

    def on_step(metrics: StepMetrics) -> None:
        tracker.log_step(metrics)
        done = metrics.step + 1
        if val_loader and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps):
            tracker.log_eval(metrics.step, evaluate(model, val_loader, runtime, cfg.train.eval_batches, d))
        if cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0 and done < cfg.train.max_steps:
            save(done, metrics.tokens)

    status, error = "failed", None
    try:
        with StopOnSignal() as stop:
            next_step = train(step_model, optimizer, loader, schedule, runtime, start_step=start_step,
                              max_steps=cfg.train.max_steps, grad_accum_steps=grad_accum_steps,
                              grad_clip=cfg.train.grad_clip, on_step=on_step, start_tokens=start_tokens, stop=stop, d=d,
                              skip_nonfinite=cfg.train.skip_nonfinite, on_skip=tracker.log_skip)
        status = "completed" if next_step == cfg.train.max_steps else "interrupted"
        if cfg.train.ckpt_every and next_step > start_step:
            save(next_step, tracker.tokens_seen)
    except BaseException as e:  # noqa: BLE001 -- recorded in the summary, then raised on
        error = out_of_memory(e, cfg, grad_accum_steps) or e
        status = ("diverged" if isinstance(error, Diverged) else
                  "interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
    # the summary says how the run ended; a failure to write it never hides the error that ended the run
    summary = tracker.close(status, reason=failure_line(error), raise_errors=error is None)
    if error is not None:
        raise error
    if status == "interrupted":
        log.info("interrupted at step %d; continue with resume=%s", next_step, run_dir)
        raise SystemExit(128 + (stop.requested or signal.SIGINT))
    return summary.get("final_val_loss", summary.get("final_loss", math.nan))  # what a sweeper minimizes


def failure_line(e: BaseException | None) -> str | None:
    """The one line that says why a run ended early (None: it did not fail)."""
    if e is None or isinstance(e, KeyboardInterrupt):
        return None
    if is_user_error(e):
        return user_error_line(e)
    return f"{type(e).__name__}: {_first_line(e)} (a bug in gpt_exp: the traceback is in run.log)"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def out_of_memory(e: BaseException, cfg: RunConfig, grad_accum_steps: int) -> UserError | None:
    """A device or host out-of-memory as one line naming the knobs that fix it; None for anything else."""
    cpu_oom = isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or cpu_oom):
        return None
    tokens_per_step = cfg.B * cfg.T * grad_accum_steps
    return UserError(f"out of memory at B={cfg.B} (T={cfg.T}, model {cfg.model.name}); lower B, e.g. B={max(1, cfg.B // 2)}, "
                     f"with train.total_batch_size={tokens_per_step} to keep the tokens per step by gradient accumulation")


def require_finite_weights(model: torch.nn.Module, step: int) -> None:
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise Diverged(f"the weights are no longer finite after step {step}; lower optim.lr or raise "
                       f"optim.warmup_steps, and resume from the last checkpoint")


def val_batches(val_tokens: ShardedTokens, cfg: RunConfig, d: Dist) -> BatchLoader:
    needed = cfg.B * cfg.T * d.world_size + 1
    if len(val_tokens) < needed:
        raise DataError(f"the val split has {len(val_tokens):,} tokens but one batch needs B*T*world_size+1 = "
                        f"{needed:,}; raise data.val_fraction or lower B or T")
    return BatchLoader(val_tokens, cfg.B, cfg.T, d.rank, d.world_size)


def _fail(e: BaseException) -> None:
    if rundir.is_main_process():  # every rank meets the same mistake; one line is enough
        print(f"error: {user_error_line(e)}", file=sys.stderr)
    raise SystemExit(getattr(e, "exit_code", 2))


def sweep_job(cfg: DictConfig, hc, run_dir: Path) -> float:
    """One job of a sweep: whatever fails ends this job alone, as a failed row with its reason; the sweep goes on.
    Returns NaN for a failed job, which Optuna records as a failed trial."""
    try:
        return run(cfg)
    except Exception as e:  # noqa: BLE001 -- even a bug must not take the other jobs down
        if not is_user_error(e):
            log.error("job %d failed:\n%s", hc.job.num, traceback.format_exc())
        summary = run_dir / "summary.json"
        if rundir.is_main_process() and not summary.exists():  # failed before the run wrote its own summary
            write_summary(run_dir, {"status": "diverged" if isinstance(e, Diverged) else "failed",
                                    "error": failure_line(e)})
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
    except UserError as e:
        # Caught here, not in main(), so Hydra adds no "Error executing job" report. A run that failed its checks
        # removes what it created (so nothing can pass for a run) and nothing else.
        if rundir.is_main_process():
            rundir.discard(run_dir)
        _fail(e)


def main() -> None:
    # Hydra raises its composition errors to us instead of printing a multi-line report: we print one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    scratch = None
    if not rundir.is_main_process():
        sys.argv, scratch = rundir.scratch_argv(sys.argv)
    try:
        _hydra_main()
    except Exception as e:
        if not is_user_error(e):
            raise
        rundir.discard_all()
        _fail(e)
    except rundir.Refused as refused:
        _fail(refused.error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)  # this rank's own Hydra files, in a dir it made
    if rundir.sweep_failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
