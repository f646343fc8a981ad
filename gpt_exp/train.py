"""The training loop: gradient accumulation, clipping, the LR schedule and one optimizer step per iteration."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from typing import Callable

import torch

from gpt_exp.config import Schedule, UserError
from gpt_exp.data import BatchLoader, DeviceBatches
from gpt_exp.device import Runtime
from gpt_exp.distributed import Dist, all_reduce_mean, set_grad_sync


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at `max_steps` (or constant after warmup).

    Stateless: the position in the schedule is the optimizer step, which the checkpoint holds.
    """

    lr: float
    warmup_steps: int
    max_steps: int
    min_lr_ratio: float = 0.1
    kind: Schedule = Schedule.cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == Schedule.constant:
            return self.lr
        min_lr = self.lr * self.min_lr_ratio
        if step >= self.max_steps:
            return min_lr
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - min_lr)


class Diverged(UserError):
    """The loss became NaN or inf: the run stops; its last checkpoint stays as it was."""

    exit_code = 3


class StopOnSignal:
    """Turns SIGINT (Ctrl-C) and SIGTERM (SLURM before preemption) into a request to stop after the current step,
    so the run can write its checkpoint; a second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

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
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: BatchLoader, runtime: Runtime, batches: int, d: Dist = Dist()) -> float:
    """Mean loss over the first `batches` batches of the val split (the same batches every time; each rank
    reads its own stride and the ranks average)."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=runtime.device)
    for _ in range(batches):
        x, y = loader.next_batch()
        with runtime.autocast():
            _, loss = model(x.to(runtime.device), y.to(runtime.device))
        total += loss.detach()
    model.train()
    return all_reduce_mean(total / batches, d).item()


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


@dataclass
class StepMetrics:
    step: int
    loss: float
    lr: float
    grad_norm: float
    dt_ms: float
    tok_per_s: float
    tokens: int  # cumulative tokens trained on


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: BatchLoader,
    schedule: LRSchedule,
    runtime: Runtime,
    *,
    start_step: int,
    max_steps: int,
    grad_accum_steps: int,
    grad_clip: float,
    on_step: Callable[[StepMetrics], None],
    start_tokens: int = 0,
    stop: StopOnSignal | None = None,
    d: Dist = Dist(),
    skip_nonfinite: int = 0,
    on_skip: Callable[[int, str], None] = lambda step, reason: None,
) -> int:
    """Run optimizer steps start_step..max_steps-1, calling `on_step` after each; returns the next step to run
    (max_steps, or earlier when `stop` was requested). Under DDP `model` is the DDP-wrapped model.

    A step whose loss or gradient norm is NaN or inf is never applied: the weights and optimizer state stay the
    last finite ones. Up to `skip_nonfinite` such steps are skipped (reported to `on_skip`); the next one raises
    Diverged."""
    model.train()
    tokens_per_step = loader.B * loader.T * grad_accum_steps * d.world_size
    tokens = start_tokens
    skipped = 0
    batches = DeviceBatches(loader, runtime.device)
    for step in range(start_step, max_steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=runtime.device)
        for micro_step in range(grad_accum_steps):
            x, y = batches.next_batch()
            if d.enabled:  # all-reduce the gradients once, on the last micro-step, not on every one
                set_grad_sync(model, micro_step == grad_accum_steps - 1)
            with runtime.autocast():
                _, loss = model(x, y)
            # the mean over the whole accumulated batch, not a sum of micro-batch means
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            loss.backward()
        all_reduce_mean(loss_accum, d)  # the logged loss is the mean over all ranks
        norm = clip_gradients(model, grad_clip, on_cpu=runtime.device_type == "cpu")
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_if_finite(optimizer, loss_accum, norm)
        loss_value = loss_accum.item()  # waits for the device, so dt below is the real step time
        dt = time.perf_counter() - t0
        norm_value = norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            what = f"the loss is {loss_value}" if not math.isfinite(loss_value) else f"the grad norm is {norm_value}"
            reason = (f"{what} at step {step} (lr {lr:.3g}, loss {loss_value:.4g}, grad norm {norm_value:.3g}); "
                      f"the step was not applied")
            if skipped == skip_nonfinite:
                raise Diverged(f"{reason}; lower optim.lr or raise optim.warmup_steps, and resume from the last "
                               f"checkpoint (or allow skipped steps with train.skip_nonfinite=N)")
            skipped += 1
            on_skip(step, f"{reason} (skipped {skipped} of at most {skip_nonfinite})")
            continue
        tokens += tokens_per_step
        on_step(StepMetrics(step, loss_value, lr, norm_value, dt * 1000, tokens_per_step / dt, tokens))
        if stop is not None and stop.requested:
            return step + 1
    return max_steps


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
