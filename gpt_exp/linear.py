"""nn.Linear whose fp32 CPU matmuls run in oneDNN instead of torch's BLAS.

torch runs an fp32 nn.Linear on a CPU through MKL's sgemm, and MKL picks its kernels by CPU vendor: on AMD it
takes a slower path even where AVX-512 is there (~150 GFLOP/s on 2 Zen cores). oneDNN, also inside torch and
chosen by instruction set, reaches ~420-480 GFLOP/s on the same shapes (bench/matmul.py). It is the same fp32
arithmetic, no bf16/TF32 shortcut: only the order of the sums differs, as between any two BLAS libraries.
Everything else (autocast, CUDA, torch.compile, FSDP's DTensors) takes the plain F.linear path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F


def _find_onednn_linear():
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise  # what inductor calls for CPU linears; takes dense tensors
    except (AttributeError, RuntimeError):
        return None


_onednn_linear = _find_onednn_linear()


def onednn_available() -> bool:
    return _onednn_linear is not None


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T in oneDNN, for a (N, K) and b (M, K); b may be a transposed view (oneDNN reads its strides)."""
    return _onednn_linear(a, b, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.size(-1))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm_t(g, weight.t()).view(x.shape)  # g @ W
        if ctx.needs_input_grad[1]:
            grad_w = _mm_t(g.t(), x.reshape(-1, x.size(-1)).t())  # g.T @ x (the op makes its left operand contiguous)
        if ctx.needs_input_grad[2]:  # False where there is no bias
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that sends fp32 CPU matmuls to oneDNN unless `onednn` is
    turned off (GPT.onednn_matmuls(False), device.cpu_matmul=blas)."""

    onednn: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn and _use_onednn(x, self.weight):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _onednn_linear is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and type(weight) in (torch.Tensor, nn.Parameter)  # not a DTensor, not a tensor subclass
        and not torch.is_autocast_enabled("cpu")  # autocast's bf16 matmuls already run in oneDNN
        and not torch.compiler.is_compiling()
    )
