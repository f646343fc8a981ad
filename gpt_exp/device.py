"""Resolve device.type/dtype/compile into a Runtime: where tensors live and how the forward pass runs."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
import re
import sys
from dataclasses import dataclass

import torch

from gpt_exp.config import DeviceConfig, DeviceType, DType
from gpt_exp.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: DType  # fp32 or bf16, never auto
    compile: bool
    peak_flops: float | None = None  # this device's dense peak for dtype; None: unknown, no MFU

    @property
    def device_type(self) -> str:
        return self.device.type

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == DType.bf16:
            return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        elif self.device_type == "mps":
            torch.mps.synchronize()


# Dense (not sparse) tensor-core peaks in FLOP/s from NVIDIA's datasheets, by the GPU's model (gpu_model: a name as
# CUDA reports it, without vendor, memory size or SXM form factor): an exact key, since a substring gives an L40 the
# L4's peak and an H100 NVL the SXM's. bf16 for autocast, tf32 for fp32 matmuls with TF32 on.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "tf32": 495e12},  # SXM5
    "H100 PCIE": {"bf16": 756e12, "tf32": 378e12},
    "H100 NVL": {"bf16": 835e12, "tf32": 418e12},
    "H200": {"bf16": 989e12, "tf32": 495e12},  # SXM
    "H200 NVL": {"bf16": 835e12, "tf32": 418e12},
    "GH200": {"bf16": 989e12, "tf32": 495e12},
    "B200": {"bf16": 2250e12, "tf32": 1100e12},
    "A100": {"bf16": 312e12, "tf32": 156e12},  # SXM4
    "A100 PCIE": {"bf16": 312e12, "tf32": 156e12},
    "A10G": {"bf16": 70e12, "tf32": 35e12},
    "A10": {"bf16": 125e12, "tf32": 62.5e12},
    "L40S": {"bf16": 362e12, "tf32": 183e12},
    "L40": {"bf16": 181e12, "tf32": 90.5e12},
    "L4": {"bf16": 121e12, "tf32": 60e12},
    "RTX 4090": {"bf16": 165e12, "tf32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "tf32": 35.6e12},
}
_NOT_THE_MODEL = {"NVIDIA", "GEFORCE", "TESLA", "SXM", "SXM4", "SXM5", "HBM2", "HBM2E", "HBM3", "HBM3E"}


def gpu_model(device_name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA A100-PCIE-40GB" -> "A100 PCIE": the key of PEAK_FLOPS."""
    words = re.split(r"[\s\-_]+", device_name.upper())
    return " ".join(w for w in words if w and w not in _NOT_THE_MODEL and not re.fullmatch(r"\d+GB", w))


def peak_flops(device_name: str, dtype: DType, tf32: bool) -> float | None:
    """The device's dense peak for this dtype, or None where unknown (CPUs, unlisted GPUs, plain fp32): no MFU then,
    and one log line that says why."""
    kind = "bf16" if dtype == DType.bf16 else "tf32" if tf32 else None
    peaks = PEAK_FLOPS.get(gpu_model(device_name))
    if kind is None:
        log.info("no MFU: fp32 without TF32 has no tensor-core peak to measure against (device.tf32=true gives one)")
    elif peaks is None:
        log.info("no MFU: %s (%s) is not in gpt_exp/device.py's PEAK_FLOPS; add its dense %s peak there",
                 device_name, gpu_model(device_name), kind)
    return peaks[kind] if kind and peaks else None


def device_name(device: torch.device) -> str:
    """What the hardware is called: the GPU's name, or the CPU's model (for summaries that say what ran)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu" and sys.platform == "linux":
        try:
            with open("/proc/cpuinfo") as f:
                return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return platform.processor() or device.type


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def _pick_device(requested: DeviceType) -> torch.device:
    if requested == DeviceType.auto:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if requested == DeviceType.cuda and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise ConfigError(f"device=cuda but CUDA is not available (torch {torch.__version__} is {build}); use device=cpu")
    if requested == DeviceType.mps and not _mps_available():
        raise ConfigError("device=mps but Apple MPS is not available on this machine; use device=cpu")
    return torch.device(requested.value)


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of returning it to the OS. Without this, every buffer over
    32 MB (the 154 MB embedding gradient, autocast's bf16 weight copies) is mmap'ed and page-faulted in anew each
    step: ~10% of an fp32 and ~30% of a bf16 124M step on a CPU. The price: the process keeps its peak RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)  # no mmap'ed chunks: large buffers come from the heap, and return to it
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap


def resolve_runtime(cfg: DeviceConfig, launcher_threads: int | None = None, local_rank: int = 0) -> Runtime:
    # Jobs running side by side must share the cores, not oversubscribe them: the launcher says how many are ours.
    threads = cfg.threads or launcher_threads
    if threads:
        torch.set_num_threads(threads)
    device = _pick_device(cfg.type)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    elif device.type == "cpu" and sys.platform == "linux":
        keep_freed_memory()
    dtype = cfg.dtype
    if dtype == DType.auto:
        dtype = DType.bf16 if device.type == "cuda" else DType.fp32
    if dtype == DType.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("device.dtype=bf16 but this GPU has no bf16 support; use device.dtype=fp32")
    if device.type == "cuda" and cfg.tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~8x the fp32 rate on Ampere and newer
    compile_model = cfg.compile if cfg.compile is not None else device.type == "cuda"
    peak = peak_flops(torch.cuda.get_device_name(device), dtype, cfg.tf32) if device.type == "cuda" else None
    return Runtime(device=device, dtype=dtype, compile=compile_model, peak_flops=peak)
