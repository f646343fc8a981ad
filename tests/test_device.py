import json
import logging

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
        # exact models, not substrings: an L40 is not an L4, an NVL not the SXM part
        ("NVIDIA L40", DType.bf16, True, 181e12),
        ("NVIDIA L40S", DType.bf16, True, 362e12),
        ("NVIDIA L4", DType.fp32, True, 60e12),
        ("NVIDIA H100 NVL", DType.bf16, True, 835e12),
        ("NVIDIA H200 NVL", DType.fp32, True, 418e12),
        ("NVIDIA H200 141GB HBM3e", DType.bf16, True, 989e12),
        ("NVIDIA A100-PCIE-40GB", DType.bf16, True, 312e12),
        ("NVIDIA A100 80GB PCIe", DType.fp32, True, 156e12),
        ("NVIDIA GH200 480GB", DType.bf16, True, 989e12),
        ("NVIDIA GeForce RTX 4090", DType.bf16, True, 165e12),
        ("NVIDIA A10G", DType.bf16, True, 70e12),
        ("NVIDIA H800", DType.bf16, True, None),  # an H100 by another name and peak: unlisted, not guessed
    ],
)
def test_peak_flops_table(name, dtype, tf32, peak):
    assert peak_flops(name, dtype, tf32) == peak


def test_no_peak_is_one_log_line_that_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="gpt_exp.device"):
        assert peak_flops("NVIDIA RTX PRO 6000", DType.bf16, True) is None
        assert peak_flops("NVIDIA H100 80GB HBM3", DType.fp32, False) is None
    assert caplog.messages == [
        "no MFU: NVIDIA RTX PRO 6000 (RTX PRO 6000) is not in gpt_exp/device.py's PEAK_FLOPS; add its dense bf16 peak "
        "there",
        "no MFU: fp32 without TF32 has no tensor-core peak to measure against (device.tf32=true gives one)"]


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
