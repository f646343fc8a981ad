"""The CPU fast paths, applied to a lecture GPT-2 from this one place: `apply_cpu_fast_paths(model, ...)`.

- fp32 matmuls in oneDNN instead of torch's BLAS. torch runs an fp32 nn.Linear on a CPU through MKL's sgemm, and MKL
  picks its kernels by CPU vendor: on AMD it takes a slower path even where AVX-512 is there (~150 GFLOP/s on 2 Zen
  cores). oneDNN, also inside torch and chosen by instruction set, reaches ~420-480 GFLOP/s on the same shapes
  (bench/matmul.py). It is the same fp32 arithmetic: only the order of the sums differs, as between any two BLAS
  libraries. `device.cpu_matmul=blas` leaves torch's own path, bit for bit plain PyTorch. The op is private to
  torch: a torch without it (or where it computes something else) falls back to torch's path with one warning.
- The token embedding's gradient as sparse rows (one process only).
- SDPA's math path for short sequences under CPU bf16 autocast.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt_exp.errors import first_line
from gpt_exp.model import GPT, CausalSelfAttention

log = logging.getLogger(__name__)


ONEDNN_OP = "_linear_pointwise"  # torch.ops.mkldnn._linear_pointwise: what inductor calls for CPU linears


def _lookup_op(name: str):
    return getattr(torch.ops.mkldnn, name)


def probe_onednn_linear(name: str = ONEDNN_OP) -> tuple[Callable | None, str]:
    """(the op, "") where it works, else (None, why). The op is private: any torch release may drop it or change its
    signature, so it is called once on a small product and checked against F.linear before any model uses it."""
    if not torch.backends.mkldnn.is_available():
        return None, f"torch {torch.__version__} was built without oneDNN"
    x, w, b = torch.linspace(-1, 1, 24).view(3, 8), torch.linspace(1, -1, 40).view(5, 8), torch.linspace(0, 1, 5)
    try:
        op = _lookup_op(name)
        out = op(x, w, b, "none", [], "")
    except (AttributeError, RuntimeError, TypeError) as e:
        return None, f"torch {torch.__version__} has no usable torch.ops.mkldnn.{name} ({first_line(e)})"
    if out.shape != (3, 5) or not torch.allclose(out, F.linear(x, w, b), rtol=1e-4, atol=1e-5):
        return None, f"torch.ops.mkldnn.{name} of torch {torch.__version__} does not compute F.linear"
    return op, ""


@functools.cache
def onednn_linear() -> Callable | None:
    """The oneDNN linear op of this torch, or None with one warning per process: fp32 matmuls then stay in torch's
    own path, correct, only slower on CPUs where its BLAS is slow."""
    op, why = probe_onednn_linear()
    if op is None:
        log.warning(f"device.cpu_matmul=onednn: {why}; fp32 matmuls run in torch's BLAS instead (same numbers, slower "
                    f"on some CPUs); device.cpu_matmul=blas says so and silences this")
    return op


def onednn_available() -> bool:
    return onednn_linear() is not None


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T in oneDNN, for a (N, K) and b (M, K); b may be a transposed view (oneDNN reads its strides)."""
    return onednn_linear()(a, b, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_linear()(x, weight, bias, "none", [], "")

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
        x.device.type == "cpu"
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
        return short_sequence_attention(q, k, v, self.scale, causal)  # muP's attention scale, as the model's own path


def short_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                             causal: bool = True) -> torch.Tensor:
    gqa = k.size(1) != q.size(1)  # fewer key/value heads (model.n_kv_head): SDPA shares them among the queries
    if q.device.type == "cpu" and q.size(-2) <= 64 and torch.is_autocast_enabled("cpu"):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


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
    # only a tied embedding: lm_head's dense gradient is what the rows add into; an untied wte's would stay sparse,
    # which the gradient's clipping and AdamW's fused step do not take
    if sparse_embedding and model.config.tie_embeddings:
        model.transformer.wte.sparse = True
        enabled.append("sparse embedding gradient")
    for module in model.modules():
        if type(module) is CausalSelfAttention:
            module.__class__ = ShortSequenceAttention
    return enabled
