"""The training loop and everything it trains with: a Trainer built from the validated config.

`Trainer.fit()` is the loop, on one screen as in the lecture: a step, then when it evaluates, checkpoints and logs.
Every stateful piece (model, optimizer, loader, RNG, step, tokens) is in `state_dict()`: a checkpoint is that dict,
and a resume is `load_state_dict()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import math
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt_exp.atomic import make_temp_dir, replace_dir
from gpt_exp.autobatch import (CPU_MAX_B, AutoBatch, candidates, choose_micro_batch, cuda_devices,
                               release_probe_memory, training_step_fn)
from gpt_exp.checkpoint import Resume, save_checkpoint
from gpt_exp.config import CpuMatmul, DataSource, DType, OptimConfig, RunConfig, SaveModel, Schedule, Strategy
from gpt_exp.core import core_results, load_bundle, metrics_row, score_tasks
from gpt_exp.cpu import apply_cpu_fast_paths
from gpt_exp.data.cache import prepare_tokens, split_tokens
from gpt_exp.data.loader import BatchLoader, DeviceBatches
from gpt_exp.data.mixture import MixtureLoader, build_mixture
from gpt_exp.device import Runtime, device_name
from gpt_exp.distributed import (all_reduce_mean, all_reduce_min, full_model_state, full_state, load_full_model_state,
                                 load_full_optimizer_state, set_grad_sync, shard_model)
from gpt_exp.errors import ConfigError, DataError, Diverged, Finished, UserError
from gpt_exp.generation import SampleArgs, sample_texts
from gpt_exp.hellaswag import hellaswag_scores, load_hellaswag
from gpt_exp.hf import load_checked_weights, save_hf_gpt2
from gpt_exp.launch import Dist
from gpt_exp.model import GPT, GPTConfig, fit_padding, is_gpt2_arch
from gpt_exp.optim import build_optimizer, describe_optimizer
from gpt_exp.metrics import StepMetrics
from gpt_exp.tokenizer import token_byte_lengths

log = logging.getLogger("gpt_exp")


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at `max_steps`, constant after warmup, or wsd:
    warmup, stable at `lr`, then a linear decay to `min_lr_ratio * lr` over the last `decay_fraction` of the steps.

    Stateless: the position in the schedule is the optimizer step, which the checkpoint holds.
    """

    lr: float
    warmup_steps: int
    max_steps: int
    min_lr_ratio: float = 0.1
    kind: Schedule = Schedule.cosine

    decay_fraction: float = 0.2  # wsd only

    @classmethod
    def of(cls, o: OptimConfig, max_steps: int) -> "LRSchedule":
        return cls(o.lr, o.warmup_steps, max_steps, o.min_lr_ratio, o.schedule, o.decay_fraction)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == Schedule.constant:
            return self.lr
        min_lr = self.lr * self.min_lr_ratio
        if step >= self.max_steps:
            return min_lr
        if self.kind == Schedule.wsd:  # stable until the decay starts: a longer run shares the shorter one's steps
            decay_steps = max(1, round(self.decay_fraction * self.max_steps))  # a tiny fraction still decays
            decay_start = max(self.warmup_steps, self.max_steps - decay_steps)
            if step < decay_start:
                return self.lr
            return self.lr - (self.lr - min_lr) * (step - decay_start + 1) / max(1, self.max_steps - decay_start)
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - min_lr)


class StopOnSignal:
    """Turns SIGINT (Ctrl-C), SIGTERM (SLURM before preemption) and SIGHUP (a closed terminal or ssh session) into a
    request to stop after the current step, so the run can write its checkpoint, weights and summary; a second
    signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None:  # asked twice: stop now, whatever is being written (writes are atomic)
            raise KeyboardInterrupt
        self.requested = signum


@contextlib.contextmanager
def interrupt_on_signals():
    """Before training starts, SIGTERM and SIGHUP raise KeyboardInterrupt as Ctrl-C does, so that a start they stop
    removes what it made (their default would kill the process and leave it)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


class Tracking(Protocol):
    """Where the loop reports (tracking.Tracker on rank 0, RankTracker elsewhere)."""

    wandb_id: str | None
    elapsed_s: float  # the run's wall time so far, over all its segments

    def log_step(self, m: StepMetrics) -> None: ...
    def log_eval(self, step: int, val_loss: float, val_bpb: float, by_source: dict | None = None) -> None: ...
    def log_skip(self, step: int, reason: str) -> None: ...
    def log_samples(self, step: int, samples: list[dict]) -> None: ...
    def log_hellaswag(self, step: int, scores: dict) -> None: ...
    def log_core(self, step: int, scores: dict) -> None: ...


@dataclass
class Queued:
    """A step queued on the device, its loss and gradient norm not yet read."""

    step: int
    lr: float
    loss: torch.Tensor
    norm: torch.Tensor
    t0: float
    source_tokens: dict[str, int] | None = None  # data=mix: the step's training tokens from each source


@dataclass
class Skipped:
    """A step whose loss or gradient norm was NaN or inf: its update was not applied."""

    step: int
    reason: str


class Trainer:
    """Data, model, optimizer, schedule and wrappers for one run, built from its validated config."""

    def __init__(self, cfg: RunConfig, runtime: Runtime, d: Dist = Dist(), run_dir: Path | None = None,
                 config: dict | None = None, saved_vocab_rows: int | None = None, autobatch: AutoBatch | None = None):
        """run_dir: where checkpoints and weights go (None: a Trainer of a test or benchmark writes nothing); config:
        the resolved config as the checkpoints record it; saved_vocab_rows: a resumed checkpoint's embedding rows, so
        that a run padded on a GPU (model.pad_vocab) resumes padded anywhere; autobatch: how B=auto chose `cfg.B`
        (a config still at B=auto is resolved here, by the same probe)."""
        if cfg.B == "auto":
            autobatch = probe_B(cfg, runtime, d)
            cfg = dataclasses.replace(cfg, B=autobatch.B)
        self.cfg, self.runtime, self.d, self.run_dir, self.config = cfg, runtime, d, run_dir, config or {}
        self.autobatch = autobatch
        seed_everything(cfg.train.seed)
        self.model, self.fast_paths = build_model(cfg, runtime, d, saved_vocab_rows)
        self.sharded = d.enabled and cfg.train.strategy == Strategy.fsdp
        if self.sharded:
            shard_model(self.model)  # before the optimizer: it must hold the sharded parameters
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o, runtime.device_type, self.sharded)
        self.loader, self.val_loader, self.val_sources = build_loaders(cfg, d)
        self.grad_accum_steps = grad_accum_steps(cfg, d)
        self.max_steps = cfg.train.steps(self.tokens_per_step)
        evaluates = bool(self.val_loader or self.val_sources)
        self.cadence = Cadence(self.max_steps, {"eval": cfg.train.eval_every if evaluates else 0,
                                                "sample": cfg.train.sample_every,
                                                "hellaswag": cfg.train.hellaswag_every, "core": cfg.train.core_every,
                                                "ckpt": cfg.train.ckpt_every})
        self.schedule = LRSchedule.of(o, self.max_steps)
        self.step_model = torch.compile(self.model) if runtime.compile else self.model
        if d.enabled and not self.sharded:
            self.step_model = DDP(self.step_model, device_ids=[d.local_rank] if runtime.device_type == "cuda" else None)
        self.batches = DeviceBatches(self.loader, runtime.device)
        if self.sharded and (cfg.train.sample_every or cfg.train.hellaswag_every or cfg.train.core_every):
            raise ConfigError("train.sample_every, train.hellaswag_every and train.core_every run on one rank's whole "
                              "model: not with train.strategy=fsdp; sample and score the run's weights after it "
                              "(python -m gpt_exp.sample, python -m gpt_exp.eval)")
        # loaded now, so that a missing or damaged file is one line before step 0, not hours in
        self.hellaswag = (load_hellaswag(Path(cfg.eval.hellaswag_path).expanduser(), cfg.eval.hellaswag_limit)
                          if cfg.train.hellaswag_every else [])
        # each token id's UTF-8 bytes, on the device once: what every evaluation's bits per byte divides by
        self.byte_lengths = torch.tensor(token_byte_lengths(), device=runtime.device) if evaluates else None
        self.core_tasks = (load_bundle(Path(cfg.eval.core_bundle).expanduser(), cfg.eval.core_limit)
                           if cfg.train.core_every else [])
        self.step, self.tokens, self.skipped = 0, 0, 0  # optimizer steps done, tokens trained on, steps skipped
        # data=mix: the tokens trained on from each source (they add up to self.tokens); None for one corpus
        self.source_tokens = dict.fromkeys(self.loader.names, 0) if self.mixed else None
        # on a GPU a step's loss is read after the next step is queued, so the host never waits on the hot path
        self.defer = runtime.device_type == "cuda"
        self.best_val_loss = math.inf  # what model_best/ (or model/ under save_model=best) holds: a checkpoint keeps it
        self.weights_at: dict[str, int] = {}  # the step of the weights in model/ and model_best/
        log.info("%s", self.describe())

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.cfg, self.d.world_size)

    @property
    def mixed(self) -> bool:
        return isinstance(self.loader, MixtureLoader)

    @property
    def train_split_tokens(self) -> int:
        """The training split's size (a mixture's: its trained sources' together): tokens / this = epochs."""
        return self.loader.train_tokens if self.mixed else len(self.loader.source)

    def describe(self) -> str:
        precision = self.runtime.dtype.value
        if self.runtime.device_type == "cpu" and self.runtime.dtype == DType.fp32:
            precision += " (matmuls in oneDNN)" if "onednn" in self.fast_paths else " (matmuls in torch's BLAS)"
        return (f"model {self.cfg.model.name}: {self.model.num_params() / 1e6:.2f}M params | device "
                f"{self.runtime.device} ({torch.get_num_threads()} CPU threads), {precision}, compile "
                f"{'on' if self.runtime.compile else 'off'} | {self.tokens_per_step:,} tokens/step = {self.cfg.B} x "
                f"{self.cfg.T} x {self.grad_accum_steps} micro-steps x {self.d.world_size} ranks"
                f"{' (fsdp)' if self.sharded else ''} | {describe_optimizer(self.cfg.optim)}")

    def what_runs(self) -> dict:
        """What the config resolved to on this machine (device=auto, dtype=auto, ...), for summary.json and W&B."""
        return {"device": str(self.runtime.device), "device_name": device_name(self.runtime.device),
                "dtype": self.runtime.dtype.value, "compile": self.runtime.compile, "world_size": self.d.world_size,
                "strategy": "fsdp" if self.sharded else "ddp" if self.d.enabled else "single",
                "grad_accum_steps": self.grad_accum_steps, "B": self.cfg.B, "T": self.cfg.T,
                "tokens_per_step": self.tokens_per_step, "max_steps": self.max_steps,
                "cpu_fast_paths": self.fast_paths, "threads": torch.get_num_threads(),
                "autobatch": self.autobatch.as_dict() if self.autobatch else None, **code_version()}

    def fit(self, tracker: Tracking, stop: StopOnSignal | None = None) -> str:
        """Train to train.max_steps (or the steps of train.max_tokens): 'completed', or 'interrupted' when Ctrl-C,
        SIGTERM or SIGHUP asked to stop (after the step in flight, with a checkpoint when checkpoints are on). `stop`:
        the caller's handler, when it must also cover what the caller writes after the loop."""
        t, max_steps = self.cfg.train, self.max_steps
        with contextlib.nullcontext(stop) if stop is not None else StopOnSignal() as stop:
            pending = None  # on a GPU: a queued step whose numbers are read once the next one is queued
            while self.step < max_steps:
                queued = self.queue_step()
                if pending is not None:  # the last step's loss and norm, read while this one runs on the device
                    self.report(self.read_step(pending), tracker)
                pending = queued
                if self.defer and not (self.cadence.any_due(self.step) or stop.requested):
                    continue
                self.report(self.read_step(pending), tracker)
                pending = None
                if stop.requested:
                    self.stop_signal = stop.requested
                    break
            # the end, or where Ctrl-C / SIGTERM stopped the run (unless its cadence has just written this very step:
            # twice would double the writing in a preemption's grace time)
            if self.keeps_checkpoints and self.step > self.start_step and self.checkpointed_at != self.step:
                self.save_checkpoint(tracker)
            if t.save_model == SaveModel.final and self.step > self.start_step and self.run_dir is not None:
                self.save_weights("model")
        return "completed" if self.step == max_steps else "interrupted"

    @property
    def keeps_checkpoints(self) -> bool:
        """Checkpoints on (train.ckpt_every), or a model that no Hugging Face GPT-2 dir holds (muP's scales, another
        architecture): its final checkpoint is where its weights stay (train.save_model=none opts out)."""
        no_hf_dir = self.cfg.model.parametrization != "sp" or not is_gpt2_arch(self.cfg.model)
        keeps_weights = no_hf_dir and self.cfg.train.save_model != SaveModel.none and self.run_dir is not None
        return bool(self.cfg.train.ckpt_every) or keeps_weights

    def report(self, result: StepMetrics | Skipped, tracker: Tracking) -> None:
        """What happens after a step, as the lecture's loop does it: log it, then evaluate, sample, score HellaSwag
        and CORE, and checkpoint when their turn has come."""
        t = self.cfg.train
        if isinstance(result, Skipped):
            tracker.log_skip(result.step, result.reason)
            return
        tracker.log_step(result)
        done, due = result.step + 1, self.cadence.due
        if due("eval", done):
            val_loss, val_bpb, by_source = self.evaluate_sources()
            tracker.log_eval(result.step, val_loss, val_bpb, by_source)
            if val_loss < self.best_val_loss and t.save_model != SaveModel.none and self.run_dir is not None:
                self.best_val_loss = val_loss
                self.save_weights("model" if t.save_model == SaveModel.best else "model_best")
        if due("sample", done):
            tracker.log_samples(result.step, self.samples())
        if due("hellaswag", done):
            tracker.log_hellaswag(result.step, self.hellaswag_scores())
        if due("core", done):
            tracker.log_core(result.step, self.core_scores())
        if due("ckpt", done) and done < self.max_steps:  # the last checkpoint is fit()'s, after the loop
            self.save_checkpoint(tracker)

    start_step = 0  # where this process started (after a resume: the checkpoint's step)
    checkpointed_at: int | None = None  # the step of the last checkpoint this process wrote
    stop_signal: int | None = None  # the signal that stopped the run early

    def train_step(self) -> StepMetrics | Skipped:
        """One optimizer step over grad_accum_steps micro-batches: the lecture's step, with a non-finite loss or
        gradient norm never applied (up to train.skip_nonfinite such steps are skipped; the next raises)."""
        return self.read_step(self.queue_step())

    def queue_step(self) -> Queued:
        """The step's work, queued on the device without waiting for it (no .item(): on a GPU the host goes on to
        the next step while this one runs); a non-finite step is skipped on the device by fused AdamW's found_inf."""
        t0 = time.perf_counter()
        model, optimizer = self.step_model, self.optimizer
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=self.runtime.device)
        drawn = self.loader.tokens_drawn if self.mixed else None
        for micro_step in range(self.grad_accum_steps):
            x, y = self.batches.next_batch()
            if self.d.enabled:  # all-reduce the gradients once, on the last micro-step, not on every one
                set_grad_sync(model, micro_step == self.grad_accum_steps - 1)
            with self.runtime.autocast():
                _, loss = model(x, y)
            loss = loss / self.grad_accum_steps  # the mean over the whole accumulated batch, not a sum of means
            loss_accum += loss.detach()
            loss.backward()
        all_reduce_mean(loss_accum, self.d)  # the logged loss is the mean over all ranks
        norm = clip_gradients(self.model, self.cfg.train.grad_clip, on_cpu=self.runtime.device_type == "cpu")
        lr = self.schedule(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices: their own peak, the same curve
        step_if_finite(optimizer, loss_accum, norm)
        self.step += 1
        step_tokens = {k: v - drawn[k] for k, v in self.loader.tokens_drawn.items()} if self.mixed else None
        return Queued(self.step - 1, lr, loss_accum, norm, t0, step_tokens)

    def read_step(self, queued: Queued) -> StepMetrics | Skipped:
        """The queued step's numbers (waits for the device: dt is the time until they were there)."""
        loss_value, norm_value = queued.loss.item(), queued.norm.item()
        dt = time.perf_counter() - queued.t0
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            return self._skip(queued.step, queued.lr, loss_value, norm_value)
        self.tokens += self.tokens_per_step
        if queued.source_tokens is not None:
            for name, n in queued.source_tokens.items():
                self.source_tokens[name] += n
        return StepMetrics(queued.step, loss_value, queued.lr, norm_value, dt * 1000, self.tokens_per_step / dt,
                           self.tokens, dict(self.source_tokens) if self.mixed else None)

    def _skip(self, step: int, lr: float, loss: float, norm: float) -> Skipped:
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the grad norm is {norm}"
        reason = f"{what} at step {step} (lr {lr:.3g}, loss {loss:.4g}, grad norm {norm:.3g}); the step was not applied"
        if self.skipped == self.cfg.train.skip_nonfinite:
            raise Diverged(f"{reason}; lower optim.lr or raise optim.warmup_steps, and resume from the last "
                           f"checkpoint (or allow skipped steps with train.skip_nonfinite=N)")
        self.skipped += 1
        return Skipped(step, f"{reason} (skipped {self.skipped} of at most {self.cfg.train.skip_nonfinite})")

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(val loss, val bits per byte) over the first train.eval_batches batches of the val split (the same batches
        every time; each rank reads its own stride). Both are exact for those batches: the summed token losses over
        the summed tokens, and over ln 2 times the summed UTF-8 bytes of the target tokens, summed over the ranks."""
        val_loss, val_bpb, _ = self.evaluate_sources()
        return val_loss, val_bpb

    @torch.no_grad()
    def evaluate_sources(self) -> tuple[float, float, dict[str, float]]:
        """evaluate()'s two numbers and, under data=mix, each source's (val_loss/NAME, val_bpb/NAME) over the first
        train.eval_batches batches of its own val split. A mixture's overall two are over every source's evaluated
        tokens together (the summed token losses over the summed tokens, and bytes): each source evaluates as many
        tokens, so its val_loss is the plain mean of the sources' (weight 0 included), not weighted by the mixture."""
        loaders = self.val_sources or {None: self.val_loader}
        self.model.eval()
        totals = torch.stack([self._val_totals(loader) for loader in loaders.values()])
        self.model.train()
        totals = all_reduce_mean(totals, self.d)  # means over the ranks: their ratios are exact
        by_source = {}
        for name, row in zip(loaders, totals):
            if name is not None:
                by_source[f"val_loss/{name}"], by_source[f"val_bpb/{name}"] = _val_ratios(row)
        return (*_val_ratios(totals.sum(0)), by_source)

    def _val_totals(self, loader: BatchLoader) -> torch.Tensor:
        """This rank's summed token losses (nats), tokens and target bytes over the loader's first batches."""
        batches, device = self.cfg.train.eval_batches, self.runtime.device
        loader.reset()
        # float64 keeps the byte and token counts exact (MPS has no float64)
        totals = torch.zeros(3, device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
        for _ in range(batches):
            x, y = loader.next_batch()
            x, y = x.to(device), y.to(device)
            with self.runtime.autocast():  # the per-token losses the model's own loss averages (fp32 under autocast)
                logits, _ = self.model(x)
                losses = F.cross_entropy(logits.flatten(0, 1), y.view(-1), reduction="none")
            totals[0] += losses.sum()
            totals[1] += y.numel()
            totals[2] += self.byte_lengths[y].sum()
        return totals

    @torch.no_grad()
    def samples(self) -> list[dict]:
        """The `sample` section's texts from the model as it is now, on the eager module (a compiled one would
        recompile for every new length: build-nanogpt #79); the same seed each time."""
        sp = self.cfg.sample
        self.model.eval()
        rows = []
        for prompt in sp.prompts:
            args = SampleArgs(prompt=prompt, max_new_tokens=sp.max_new_tokens, num_samples=sp.num_samples,
                              top_k=sp.top_k, temperature=sp.temperature, seed=sp.seed)
            rows += [{"prompt": prompt, "text": text} for text in sample_texts(self.model, args, self.runtime.device)]
        self.model.train()
        return rows

    @torch.no_grad()
    def hellaswag_scores(self) -> dict:
        """HellaSwag acc and acc_norm on eval.hellaswag_path, the examples split over the ranks and counted on all."""
        mine = self.hellaswag[self.d.rank :: self.d.world_size]
        counts = torch.zeros(3, device=self.runtime.device)  # examples, correct (sum of loss), correct (per token)
        self.model.eval()
        if mine:
            scores = hellaswag_scores(self.model, mine, self.runtime.device)
            counts += torch.tensor([len(mine), round(scores["acc"] * len(mine)), round(scores["acc_norm"] * len(mine))],
                                   device=self.runtime.device)
        self.model.train()
        n, correct, correct_norm = (all_reduce_mean(counts, self.d) * self.d.world_size).tolist()
        return {"hellaswag_examples": int(n), "hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n}

    @torch.no_grad()
    def core_scores(self) -> dict:
        """CORE on eval.core_bundle's tasks, each task's items split over the ranks and the counts summed on all."""
        self.model.eval()
        correct = score_tasks(self.model, self.core_tasks, self.runtime.device, self.d.rank, self.d.world_size)
        self.model.train()
        counts = torch.tensor(correct, dtype=torch.float32, device=self.runtime.device)
        correct = [round(c) for c in (all_reduce_mean(counts, self.d) * self.d.world_size).tolist()]
        return metrics_row(core_results(self.core_tasks, correct))

    def save_weights(self, name: str) -> None:
        """The model as a Hugging Face GPT-2 dir RUN_DIR/NAME (weights, config, tokenizer: what sample, eval and
        export read), replacing this run's earlier one whole. Weights that are no longer finite are never written."""
        if self.cfg.model.parametrization != "sp":  # a GPT-2 dir has no muP scales: it would load as another model
            if self.d.is_main:
                log.info("weights: no %s/ under model.parametrization=%s (a Hugging Face GPT-2 dir would drop its "
                         "scales); its checkpoints hold the model", name, self.cfg.model.parametrization)
            return
        if not is_gpt2_arch(self.cfg.model):  # rope, rmsnorm, ...: a GPT-2 dir would load as another model
            if self.d.is_main:
                log.info("weights: no %s/ for a model of another architecture than GPT-2's (a Hugging Face GPT-2 "
                         "dir cannot hold it); its checkpoints hold the model", name)
            return
        self._require_finite_weights()
        state = full_model_state(self.model, self.sharded)  # every rank takes part under FSDP
        if not self.d.is_main:
            return
        model = self.model
        if self.sharded:  # a whole copy on the CPU to write from
            model = GPT(self.model.config)
            model.load_state_dict(state)
        target = self.run_dir / name
        # named as atomic writes' temp dirs are, so that the next start in this dir removes one a kill -9 left
        staging = make_temp_dir(target)
        try:
            save_hf_gpt2(model, staging, step=self.step, elsewhere="train in another dir (hydra.run.dir=DIR), or "
                         "keep no weights (train.save_model=none)")
            replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # made by this call: gone once renamed, else half a model
        self.weights_at[name] = self.step
        log.info("weights: %s (step %d)", target, self.step)

    def _require_finite_weights(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise Diverged(f"the weights are no longer finite after step {self.step}; lower optim.lr or raise "
                           f"optim.warmup_steps, and resume from the last checkpoint")

    def save_checkpoint(self, tracker: Tracking) -> None:
        """Write every stateful piece (rank 0; every rank gathers under FSDP). Weights that are no longer finite are
        never written: the checkpoint on disk is always the last good state."""
        self._require_finite_weights()
        state = self.state_dict()
        if self.d.is_main:
            state.update(config=self.config, wandb_id=tracker.wandb_id, elapsed_s=tracker.elapsed_s)
            log.info("checkpoint: %s", save_checkpoint(self.run_dir, state, self.cfg.train.keep_ckpts))
        self.checkpointed_at = self.step

    def state_dict(self) -> dict:
        """Whole tensors on the CPU (gathered from the shards under FSDP: every rank must call this), so that a
        checkpoint resumes under any world size."""
        model_state, optimizer_state = full_state(self.model, self.optimizer, self.sharded)
        return {"step": self.step, "tokens": self.tokens, "skipped": self.skipped, "B": self.cfg.B, "model": model_state,
                "optimizer": optimizer_state, "sharded": self.sharded, "loader": self.loader.state_dict(),
                "rng": rng_state(), "best_val_loss": self.best_val_loss, "weights_at": dict(self.weights_at),
                **({"source_tokens": dict(self.source_tokens)} if self.mixed else {})}

    def load_weights(self, weights: dict, source: str) -> None:
        """Weights only (init_from): the model's tensors, shape for shape, or one line naming the first that differs."""
        weights = fit_padding(weights, self.model.config)  # weights of another padding (model.pad_vocab) fit
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        for name, shape in expected.items():
            got = tuple(weights[name].shape) if name in weights else None
            if got != shape and not (name == "lm_head.weight" and got is None):  # tied to wte
                raise ConfigError(f"{source} has another shape: {name} is {got}, this model's is {shape}; give the "
                                  f"model settings of those weights (or init_from=hf:DIR, which adopts them)")
        load_full_model_state(self.model, {k: v for k, v in weights.items() if k in expected}, self.sharded)

    def resume(self, resumed: Resume) -> None:
        """Continue from a checkpoint: its state, then one line of what this run changes (and of a schedule that puts
        another lr at its step). A resume with no step left to train has nothing to do; one that ends before is
        refused."""
        self.load_state_dict(resumed.state)
        if self.max_steps < resumed.step:
            t = self.cfg.train
            key, value = ("train.max_steps", t.max_steps) if t.max_steps else ("train.max_tokens", t.max_tokens)
            raise ConfigError(f"{key}={value} ends at step {self.max_steps}, before the checkpoint's step "
                              f"{resumed.step}; give more steps to continue, or branch from an earlier checkpoint "
                              f"(resume=RUN_DIR/checkpoints/step_N.pt)")
        if self.max_steps == resumed.step:
            raise Finished(f"resume: the run has trained its {self.max_steps} steps (checkpoint {resumed.path}); "
                           f"nothing to do")
        log.info("resumed from %s at step %d%s", resumed.path, resumed.step,
                 f"; changed: {', '.join(resumed.changes)}" if resumed.changes else "")
        saved = resumed.settings
        saved_steps = saved.train.steps(self.tokens_per_step)
        before, after = LRSchedule.of(saved.optim, saved_steps)(resumed.step), self.schedule(resumed.step)
        if not math.isclose(before, after, rel_tol=1e-9):  # a longer or shorter cosine moves the lr at once
            log.info("resume: the lr at step %d is %.3g (it was %.3g under the checkpoint's schedule, train.max_steps "
                     "%d -> %d); optim.schedule=wsd extends a run without a jump", resumed.step, after, before,
                     saved_steps, self.max_steps)

    def load_state_dict(self, state: dict) -> None:
        if state.get("sharded", False) != self.sharded:
            saved = "fsdp" if state.get("sharded") else "ddp or one process"
            fix = "train.strategy=fsdp under torchrun" if state.get("sharded") else "train.strategy=ddp"
            raise ConfigError(f"resume: the checkpoint was written by a {saved} run; resume it with {fix}")
        if ("source_tokens" in state) != self.mixed:  # one loader's state means nothing to the other
            saved = "a data=mix mixture" if "source_tokens" in state else "one corpus"
            raise ConfigError(f"resume: the checkpoint was trained on {saved}; resume with its data settings, or "
                              f"start a new run from its weights with init_from=")
        self.loader.load_state_dict(state["loader"])  # first: a position past this corpus is refused before all else
        if self.sharded:
            load_full_model_state(self.model, state["model"], self.sharded)
        else:  # checked: a damaged checkpoint is one line naming a tensor, not load_state_dict's traceback
            load_checked_weights(self.model, state["model"], "resume: the checkpoint's weights do not fit this model",
                                 "the file is damaged: resume from another checkpoint of the run")
        if self.sharded:
            load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        else:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise ConfigError(f"resume: the checkpoint's optimizer state does not fit this model's ({e}); the file "
                                  f"is damaged: resume from another checkpoint of the run") from None
        set_rng_state(state["rng"])
        self.step = self.start_step = state["step"]
        self.tokens, self.skipped = state["tokens"], state.get("skipped", 0)
        if self.mixed:  # the loader's state has checked that the sources are the checkpoint's
            self.source_tokens = dict(state["source_tokens"])
        # what model/ and model_best/ hold, so that a resumed run replaces them only with better weights
        self.best_val_loss = state.get("best_val_loss", math.inf)
        self.weights_at = dict(state.get("weights_at", {}))


def _val_ratios(totals: torch.Tensor) -> tuple[float, float]:
    """(val loss, val bpb) of summed (nats, tokens, bytes)."""
    nats, tokens, n_bytes = totals.tolist()
    return nats / tokens, nats / (math.log(2) * n_bytes) if n_bytes else math.nan


@dataclass(frozen=True)
class Cadence:
    """When each periodic event (eval, sample, hellaswag, core, ckpt) happens: after step `done` (counted from 1) when
    its every-N divides it, and after the last step. The loop and the deferred read on a GPU both ask here."""

    max_steps: int
    every: dict[str, int]  # event -> N (0: never)

    def due(self, event: str, done: int) -> bool:
        n = self.every.get(event, 0)
        return bool(n) and (done % n == 0 or done == self.max_steps)

    def any_due(self, done: int) -> bool:
        """Whether anything happens after step `done`: where a step's numbers must be read before the next is queued."""
        return done == self.max_steps or any(self.due(event, done) for event in self.every)


def build_model(cfg: RunConfig, runtime: Runtime, d: Dist, saved_vocab_rows: int | None = None) -> tuple[GPT, list]:
    """The run's GPT on its device, with the CPU's fast paths applied (and which ones)."""
    model = GPT(GPTConfig.from_model_config(cfg.model, runtime.device_type, saved_rows=saved_vocab_rows))
    model = model.to(runtime.device)
    fast_paths = []
    if runtime.device_type == "cpu":
        fast_paths = apply_cpu_fast_paths(model, onednn=cfg.device.cpu_matmul == CpuMatmul.onednn,
                                          sparse_embedding=not d.enabled)
    return model, fast_paths


def probe_B(cfg: RunConfig, runtime: Runtime, d: Dist) -> AutoBatch:
    """B=auto: probe real steps of a throwaway copy of this model and optimizer, choose B, and keep
    train.total_batch_size by gradient accumulation; every rank takes the smallest choice of all ranks."""
    if d.enabled and cfg.train.strategy == Strategy.fsdp:
        raise ConfigError("B=auto probes one rank's whole model: not with train.strategy=fsdp; give B=N")
    device = runtime.device
    model, _ = build_model(cfg, runtime, d)
    optimizer = build_optimizer(model, cfg.optim, runtime.device_type, sharded=False)
    Bs = candidates(cfg.train.total_batch_size, cfg.T, d.world_size, max_B=CPU_MAX_B if device.type == "cpu" else 1024)
    step = training_step_fn(model, optimizer, cfg.T, cfg.model.vocab_size, device, runtime.autocast,
                            clip=lambda: clip_gradients(model, cfg.train.grad_clip, device.type == "cpu"))
    devices = cuda_devices(model)
    try:  # nothing to put back: the copy goes, and the Trainer seeds its own model after
        choice = choose_micro_batch(step, Bs, device, total_batch_size=cfg.train.total_batch_size, T=cfg.T,
                                    world_size=d.world_size, max_probe_s=cfg.train.autobatch_probe_s)
    finally:
        del step, optimizer, model
        release_probe_memory(devices)
    agreed = int(all_reduce_min(torch.tensor(choice.B, device=device), d).item())
    if agreed != choice.B:
        choice = AutoBatch(agreed, cfg.train.total_batch_size // (agreed * cfg.T * d.world_size),
                           f"the smallest choice of the ranks (this one: B={choice.B})", choice.measured)
    log.info("%s", choice.line())
    return choice


def build_loaders(cfg: RunConfig, d: Dist) -> tuple[BatchLoader | MixtureLoader, BatchLoader | None,
                                                   dict[str, BatchLoader]]:
    """The training stream (this rank's stride) and, with train.eval_every, the val split's; under data=mix the
    mixture's rows, and each source's val split by name instead."""
    if cfg.data.source == DataSource.mix:
        mixture = build_mixture(cfg.data, cfg.B, cfg.T, d.rank, d.world_size, cfg.train.seed,
                                evaluate=bool(cfg.train.eval_every))
        return mixture.loader, None, mixture.val
    tokens = prepare_tokens(cfg.data).load()
    train_tokens, val_tokens = split_tokens(tokens, cfg.data.val_fraction)
    log.info("loaded %s tokens (train %s, val %s)", f"{len(tokens):,}", f"{len(train_tokens):,}", f"{len(val_tokens):,}")
    loader = BatchLoader(train_tokens, cfg.B, cfg.T, d.rank, d.world_size, cfg.train.overfit_batches,
                         shuffle_seed=cfg.data.shuffle_seed, order=cfg.data.order, order_seed=cfg.train.seed)
    log.info("1 epoch = %s batches", f"{loader.batches_per_epoch:,}")
    if not cfg.train.eval_every:
        return loader, None, {}
    needed = cfg.B * cfg.T * d.world_size + 1
    if len(val_tokens) < needed:
        raise DataError(f"the val split has {len(val_tokens):,} tokens but one batch needs B*T*world_size+1 = "
                        f"{needed:,}; raise data.val_fraction or lower B or T")
    return loader, BatchLoader(val_tokens, cfg.B, cfg.T, d.rank, d.world_size), {}


def tokens_per_step(cfg: RunConfig, world_size: int) -> int:
    """Tokens per optimizer step over all ranks: train.total_batch_size, or one micro-batch on each rank."""
    return cfg.train.total_batch_size or cfg.B * cfg.T * world_size


def grad_accum_steps(cfg: RunConfig, d: Dist) -> int:
    """Micro-steps per optimizer step, so that train.total_batch_size tokens are seen over all ranks."""
    micro_batch = cfg.B * cfg.T * d.world_size
    tokens_per_step = cfg.train.total_batch_size or micro_batch
    if tokens_per_step % micro_batch:
        raise ConfigError(f"train.total_batch_size={tokens_per_step} is not a multiple of B*T*world_size = "
                          f"{cfg.B}*{cfg.T}*{d.world_size} = {micro_batch}; change it or B")
    return tokens_per_step // micro_batch


def clip_gradients(model: torch.nn.Module, max_norm: float, on_cpu: bool) -> torch.Tensor:
    """Scale the gradients to a total norm of at most `max_norm` as clip_grad_norm_ does (0: no clipping); return
    their norm before, for the log. On a CPU the pass over every gradient is skipped when it would multiply by 1:
    reading the norm costs nothing there (a GPU would wait for it), and late in training most steps are unclipped."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    full_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
    if max_norm > 0 and (not on_cpu or full_norm.item() + 1e-6 > max_norm):  # clip_grad_norm_'s coefficient < 1
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return full_norm


def step_if_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor, norm: torch.Tensor) -> None:
    """optimizer.step() unless the loss or the gradient norm is NaN or inf. A fused optimizer on a GPU is told so on
    the device (its `found_inf`, as GradScaler does), so the check costs no host sync; elsewhere it is read here."""
    bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
    fused = any(group.get("fused") for group in optimizer.param_groups)
    if fused and loss.device.type == "cuda":
        optimizer.found_inf = bad.float()  # read by fused Adam/AdamW: the update and its step count are skipped
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bad.item():
        optimizer.step()


def code_version() -> dict:
    """torch's and gpt_exp's versions, and the project's git commit when it runs from a checkout ("-dirty": with
    uncommitted changes)."""
    try:
        version = importlib.metadata.version("gpt_exp")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "gpt_exp": version, "git_commit": commit}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states as plain lists and tensors (loadable with weights_only)."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
