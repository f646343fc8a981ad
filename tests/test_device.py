import json

import pytest
import torch

from gpt_exp.config import DeviceConfig, DeviceType, DType, LoggerConfig, LoggerMode
from gpt_exp.device import peak_flops, resolve_runtime
from gpt_exp.tracking import Tracker
from gpt_exp.metrics import StepMetrics


@pytest.mark.parametrize(
    "name, dtype, tf32, peak",
    [
        ("NVIDIA H100 80GB HBM3", DType.bf16, True, 989e12),
        ("NVIDIA H100 PCIe", DType.bf16, True, 756e12),
        ("NVIDIA H200", DType.fp32, True, 495e12),
        ("NVIDIA A100-SXM4-40GB", DType.bf16, False, 312e12),
        ("NVIDIA A100-SXM4-40GB", DType.fp32, False, None),  # plain fp32: no tensor-core peak to compare with
        ("Tesla K80", DType.bf16, True, None),  # unlisted: no MFU rather than a wrong one
    ],
)
def test_peak_flops_table(name, dtype, tf32, peak):
    assert peak_flops(name, dtype, tf32) == peak


def test_cpu_runtime_defaults_to_fp32_and_no_peak():
    threads = torch.get_num_threads()
    try:
        runtime = resolve_runtime(DeviceConfig(type=DeviceType.cpu, dtype=DType.auto, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)  # the rest of the suite runs in this process
    assert (runtime.device, runtime.dtype, runtime.compile, runtime.peak_flops) == (torch.device("cpu"), DType.fp32, False, None)


def test_mfu_column_when_the_peak_is_known(tmp_path):
    tracker = Tracker(tmp_path, LoggerConfig(mode=LoggerMode.disabled), "t", None, {}, total_steps=1,
                      flops_per_token=855e6, peak_flops=989e12)
    tracker.log_step(StepMetrics(step=0, loss=5.0, lr=1e-3, grad_norm=1.0, dt_ms=1000.0, tok_per_s=500_000.0, tokens=500_000))
    tracker.close()
    [row] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["mfu"] == pytest.approx(500_000 * 855e6 / 989e12)  # 0.432
