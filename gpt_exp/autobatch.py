"""B=auto: the micro-batch B a run trains with, found by timing or fitting real training steps, and the gradient
accumulation that keeps train.total_batch_size (tokens per optimizer step) what the config says.

CUDA: the largest candidate whose forward, backward and optimizer step fit in memory, with a margin. CPU: the
fastest per token within a memory budget, by a short timed probe. The probe trains real steps of the run's model:
a throwaway copy (the Trainer's `probe_B`), or a live model whose weights, optimizer state and RNG `preserve_state`
puts back afterwards, bitwise.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from gpt_exp.errors import ConfigError

GiB = 2**30
CUDA_MARGIN = 0.9  # a step peaking above this share of the GPU leaves too little for eval, fragmentation, other kernels
CPU_MEMORY_FRACTION = 0.5  # of the memory available when the probe starts: the rest is the OS's and other jobs'
FIRST_WARMUP = 2  # CPU probe: warm-up steps added for the first candidate
CPU_MAX_B = 64  # candidates(max_B=) on a CPU: beyond this a step takes seconds and tok/s no longer improves

StepFn = Callable[[int], None]  # one full training step (forward, backward, optimizer) at micro-batch B


@dataclass(frozen=True)
class AutoBatch:
    """What B=auto chose, why, and what it measured for each candidate (keys are str(B): JSON keys)."""

    B: int
    grad_accum_steps: int
    reason: str
    measured: dict[str, dict]

    def line(self) -> str:
        return f"B=auto: B={self.B} (x{self.grad_accum_steps} micro-steps): {self.reason}"

    def as_dict(self) -> dict:
        """For summary.json, W&B and the checkpoint (a resume takes B from here instead of probing again)."""
        return {"B": self.B, "grad_accum_steps": self.grad_accum_steps, "reason": self.reason,
                "measured": self.measured}


def candidates(total_batch_size: int | None, T: int, world_size: int = 1, max_B: int = 1024) -> list[int]:
    """Micro-batches that divide the step exactly: the powers of two dividing total_batch_size / (T * world_size),
    and its largest divisor, up to max_B (ascending)."""
    if not total_batch_size:
        raise ConfigError("B=auto needs train.total_batch_size (tokens per optimizer step, kept by gradient "
                          f"accumulation whatever B is chosen); set it, e.g. train.total_batch_size={64 * T * world_size}")
    per_rank, rest = divmod(total_batch_size, T * world_size)
    if rest or per_rank < 1:
        raise ConfigError(f"train.total_batch_size={total_batch_size} is invalid: B=auto needs a positive multiple of "
                          f"T*world_size = {T}*{world_size} = {T * world_size}")
    divisors = [b for b in range(1, min(per_rank, max_B) + 1) if per_rank % b == 0]
    return sorted({b for b in divisors if b & (b - 1) == 0} | {divisors[-1]})


def choose_micro_batch(step_fn: StepFn, candidate_Bs: list[int], device: torch.device, *, total_batch_size: int,
                       T: int, world_size: int = 1, memory: Memory | None = None,
                       clock: Callable[[], float] = time.perf_counter, warmup: int = 1, steps: int = 3,
                       max_probe_s: float = 60.0) -> AutoBatch:
    """Probe candidate_Bs with step_fn and choose B: on CUDA the largest that fits, elsewhere the fastest per token.

    step_fn must leave nothing behind that matters: probe a throwaway copy of the model, or wrap the call in
    `preserve_state`. Under DDP every rank probes
    its own GPU with the unwrapped model (no collectives: an OOM on one rank must not hang the others), then the
    ranks agree, e.g. on the smallest choice (all_reduce MIN), which fits everywhere.
    """
    Bs = sorted(candidate_Bs)
    if device.type == "cuda":
        memory = memory or CudaMemory(device)
        B, reason, measured = largest_that_fits(step_fn, Bs, memory, str(device))
        memory.release()
        memory.reset_peak()  # the run's peak memory is training's own, not the probe's
    else:
        memory = memory or HostMemory()
        sync = torch.mps.synchronize if device.type == "mps" else None
        B, reason, measured = fastest_per_token(step_fn, Bs, T, memory, device.type, clock, warmup, steps,
                                                max_probe_s, sync)
        gc.collect()
    return AutoBatch(B, total_batch_size // (B * T * world_size), reason, measured)


class Memory(Protocol):
    """Where the probe reads memory: the GPU's allocator, or this process's resident set (fakes in tests)."""

    def total(self) -> int | None: ...  # CUDA: the device's memory; CPU: the budget for the probe's growth
    peak_resets: bool  # False: peak() may be an earlier, higher peak
    def current(self) -> int: ...  # bytes in use now
    def reset_peak(self) -> None: ...
    def peak(self) -> int: ...  # bytes, since reset_peak (CPU: of the whole process)
    def release(self) -> None: ...


class CudaMemory:
    peak_resets = True

    def __init__(self, device: torch.device):
        self.device = device

    def total(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def current(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)  # reserved, not allocated: fragmentation counts too

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def largest_that_fits(step_fn: StepFn, Bs: list[int], memory: Memory, where: str) -> tuple[int, str, dict]:
    """Try the largest first, down to the first that fits; one size smaller when that one peaks above CUDA_MARGIN."""
    total, measured, oom = memory.total(), {}, []
    for i in reversed(range(len(Bs))):
        B = Bs[i]
        memory.reset_peak()
        try:
            step_fn(B)
            fitted = True
        except torch.OutOfMemoryError:
            fitted = False
        # out of the except block: the exception's traceback, which holds the step's activations, is gone
        memory.release()
        if not fitted:
            oom.append(B)
            measured[str(B)] = {"status": "out of memory"}
            continue
        peak = memory.peak()
        measured[str(B)] = {"status": "fits", "peak_gib": round(peak / GiB, 2), "peak_share": round(peak / total, 3)}
        listed = ", ".join(map(str, Bs))
        why = f"out of memory at B={', '.join(map(str, reversed(oom)))}; " if oom else ""
        if peak > CUDA_MARGIN * total and i > 0:
            return Bs[i - 1], (f"the largest of {listed} that fits {where} ({_size(total)}) with a margin: "
                               f"{why}B={B} fits but peaks at {peak / total:.0%} > {CUDA_MARGIN:.0%}, so one size "
                               f"down"), measured
        return B, (f"the largest of {listed} that fits {where} ({_size(total)}): {why}B={B} peaks at "
                   f"{_size(peak)} ({peak / total:.0%})"), measured
    raise ConfigError(f"B=auto: even B={Bs[0]} runs out of memory on {where} ({_size(total)}); use a smaller "
                      f"model or T, or shard the model over GPUs (train.strategy=fsdp under torchrun)")


class HostMemory:
    """This process's resident memory. The peak is Linux's VmHWM, which writing 5 to /proc/self/clear_refs resets;
    where it cannot be reset (peak_resets False) an earlier peak may hide growth, and the probe predicts from
    proportions alone."""

    peak_resets = True

    def __init__(self, fraction: float = CPU_MEMORY_FRACTION):
        self.fraction = fraction

    def total(self) -> int | None:
        available = available_memory()
        return int(available * self.fraction) if available else None

    def current(self) -> int:
        return _proc_status_kib("VmRSS") * 1024 if sys.platform == "linux" else _max_rss()

    def reset_peak(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not Linux, or not allowed
            self.peak_resets = False

    def peak(self) -> int:
        return _proc_status_kib("VmHWM") * 1024 if sys.platform == "linux" else _max_rss()

    def release(self) -> None:
        gc.collect()


def fastest_per_token(step_fn: StepFn, Bs: list[int], T: int, memory: Memory, where: str,
                      clock: Callable[[], float] = time.perf_counter, warmup: int = 1, steps: int = 3,
                      max_probe_s: float = 60.0, sync: Callable[[], None] | None = None) -> tuple[int, str, dict]:
    """Time `steps` steps of each candidate, smallest first, after `warmup` steps for its new shapes (the first
    candidate gets FIRST_WARMUP more: a fresh process's first steps fault in its heap and build its kernels).

    A candidate is run only if its predicted time keeps the probe within max_probe_s and its predicted memory
    growth over the probe's start stays within memory.total(). Growth is fixed (gradients, optimizer state) + per sample (activations):
    a line through the first and last measured candidates; from one measurement, proportional to B (conservative).
    """
    budget, base, start = memory.total(), memory.current(), clock()
    measured, timed, runs = {}, {}, []  # runs: (B, growth in bytes, seconds per step) of each candidate run
    for B in Bs:
        if runs:  # time first: a growth predicted from one candidate alone is a loose upper bound
            cost = (warmup + steps) * runs[-1][2] * B / runs[-1][0]
            if clock() - start + cost > max_probe_s:
                measured[str(B)] = {"status": "over the probe's time", "predicted_s": round(cost, 1)}
                continue
            growth = predict_growth(runs, B, memory.peak_resets)
            if budget is not None and growth > budget:
                measured[str(B)] = {"status": "over the memory budget", "predicted_gib": round(growth / GiB, 2)}
                continue
        memory.reset_peak()
        for _ in range(warmup + (0 if runs else FIRST_WARMUP)):
            step_fn(B)
        seconds = []
        for _ in range(steps):
            t0 = clock()
            step_fn(B)
            if sync:
                sync()
            seconds.append(clock() - t0)
        dt, growth = statistics.median(seconds), max(0, memory.peak() - base)
        runs.append((B, growth, dt))
        entry = {"tok_per_s": round(B * T / dt, 1), "ms_per_step": round(dt * 1000, 2),
                 "growth_gib": round(growth / GiB, 3)}
        over = budget is not None and growth > budget
        measured[str(B)] = {"status": "over the memory budget" if over else "timed", **entry}
        if not over:
            timed[B] = dt / B
    if not timed:
        raise ConfigError(f"B=auto: even B={Bs[0]} grew this process by more than the probe's memory budget "
                          f"({_size(budget)}, {CPU_MEMORY_FRACTION:.0%} of the available memory); set B")
    best = min(timed, key=timed.get)
    left_out = {}
    for b, m in measured.items():
        if m["status"] != "timed":
            left_out.setdefault(m["status"], []).append(b)
    notes = [f"{_size(budget)} budget" if budget is not None else "memory unknown"]
    notes += [f"{status}: B={', '.join(b)}" for status, b in left_out.items()]
    return best, (f"the fastest per token of {', '.join(map(str, timed))} on {where} "
                  f"({measured[str(best)]['tok_per_s']:,.0f} tok/s; {'; '.join(notes)})"), measured


def predict_growth(runs: list[tuple[int, int, float]], B: int, linear: bool = True) -> float:
    """Memory growth at micro-batch B from the candidates run so far: (B, growth, seconds) each."""
    (b0, g0, _), (b1, g1, _) = runs[0], runs[-1]
    if not linear or b1 == b0:
        return g1 * B / b1
    return g1 + max(0.0, (g1 - g0) / (b1 - b0)) * (B - b1)


@contextlib.contextmanager
def preserve_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around the probe: the weights, the optimizer state (empty before the first step) and the RNG come back
    bitwise, and the gradients are None, as if no step had run. Copies go to host memory so that they do not
    count against the GPU's."""
    weights = _host_copy(model.state_dict())
    optimizer_state = _host_copy(optimizer.state_dict())
    devices = cuda_devices(model)
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            optimizer.zero_grad(set_to_none=True)
            model.load_state_dict(weights)  # copies into the same parameters: the optimizer and wrappers keep them
            optimizer.load_state_dict(optimizer_state)
            release_probe_memory(devices)


def cuda_devices(model: torch.nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def release_probe_memory(devices: list[int]) -> None:
    """The probe's activations and gradients go back to the GPU, not to the cache, and its peak is forgotten: a
    run's peak memory is its training's."""
    gc.collect()
    for index in devices:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(index)


def training_step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, T: int, vocab_size: int,
                     device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     clip: Callable[[], object] | None = None, seed: int = 0) -> StepFn:
    """A step_fn for choose_micro_batch: one optimizer step of `model` (forward returning (logits, loss)) on random
    tokens drawn from a generator of its own (the global RNG stays untouched)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def step(B: int) -> None:
        x, y = (torch.randint(vocab_size, (B, T), generator=generator, device=device) for _ in range(2))
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        if clip:
            clip()
        optimizer.step()

    return step


def oom_hint(B: int, T: int, total_batch_size: int | None, world_size: int = 1) -> str:
    """The one line for an out-of-memory error during training at a fixed B."""
    step = total_batch_size or B * T * world_size
    return (f"out of GPU memory at B={B}, T={T} ({B * T:,} tokens a micro-batch); use B=auto "
            f"train.total_batch_size={step} to train with the largest micro-batch that fits and the same {step:,} "
            f"tokens per step, or a smaller B, e.g. B={max(1, B // 2)} train.total_batch_size={step}")


def available_memory() -> int | None:
    """Bytes this process may still take: MemAvailable, capped by a cgroup's limit (SLURM, containers)."""
    try:
        with open("/proc/meminfo") as f:
            available = int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2, then v1
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(f"/sys/fs/cgroup/{limit}") as f, open(f"/sys/fs/cgroup/{usage}") as g:
                room = int(f.read()) - int(g.read())
        except (OSError, ValueError):  # no such cgroup file, or "max": no limit
            continue
        return min(available, max(0, room))
    return available


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def _host_copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return value


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def _max_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere
