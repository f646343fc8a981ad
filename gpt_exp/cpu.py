"""The CPU fast paths, applied to a lecture GPT-2 from this one place: `apply_cpu_fast_paths(model, ...)`.

- fp32 matmuls in oneDNN instead of torch's BLAS. torch runs an fp32 nn.Linear on a CPU through MKL's sgemm, and MKL
  picks its kernels by CPU vendor: on AMD it takes a slower path even where AVX-512 is there (~150 GFLOP/s on 2 Zen
  cores). oneDNN, also inside torch and chosen by instruction set, reaches ~420-480 GFLOP/s on the same shapes
  (bench/matmul.py). It is the same fp32 arithmetic: only the order of the sums differs, as between any two BLAS
  libraries. `device.cpu_matmul=blas` leaves torch's own path, bit for bit plain PyTorch.
- The token embedding's gradient as sparse rows (one process only).
- SDPA's math path for short sequences under CPU bf16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt_exp.model import GPT, CausalSelfAttention


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


class OneDNNLinear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that sends fp32 CPU matmuls to oneDNN; everything else (autocast,
    CUDA, torch.compile, FSDP's DTensors) takes nn.Linear's own path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_onednn(x, self.weight):
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


class ShortSequenceAttention(CausalSelfAttention):
    """On a CPU under bf16 autocast, torch's flash kernel costs 2.4x the plain math path for short sequences (T=32:
    1.34 vs 0.55 ms per layer, forward + backward; ~4% of a 124M step) and wins from a few hundred tokens on
    (T=1024: 128 vs 487 ms), so short sequences take the math path there."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return short_sequence_attention(q, k, v)


def short_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.device.type == "cpu" and q.size(-2) <= 64 and torch.is_autocast_enabled("cpu"):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def apply_cpu_fast_paths(model: GPT, *, onednn: bool = True, sparse_embedding: bool = True) -> list[str]:
    """Turn the CPU fast paths on in `model` (in place, same parameters and state dict); returns what is on.

    sparse_embedding: the token embedding's gradient as the few rows a batch touches, not a dense vocab x n_embd
    tensor zeroed and added to lm_head's gradient every step (~15% of a 124M step at B*T=128). The tied weight's
    .grad stays dense: lm_head's dense gradient arrives first and the rows are added into it. For one process only:
    DDP and FSDP expect dense gradients."""
    enabled = []
    if onednn and onednn_available():
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = OneDNNLinear
        enabled.append("onednn")
    if sparse_embedding:
        model.transformer.wte.sparse = True
        enabled.append("sparse embedding gradient")
    for module in model.modules():
        if type(module) is CausalSelfAttention:
            module.__class__ = ShortSequenceAttention
    return enabled
