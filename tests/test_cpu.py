"""The CPU fast paths (gpt_exp/cpu.py): oneDNN matmuls equal torch's, apply_cpu_fast_paths keeps the model, and a
torch without the private oneDNN op falls back to its own path with one warning."""

import logging

import pytest
import torch
from torch.nn import functional as F

from gpt_exp import cpu
from gpt_exp.cpu import CausalSelfAttention, OneDNNLinear, ShortSequenceAttention, apply_cpu_fast_paths, onednn_available
from gpt_exp.model import GPT, GPTConfig

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch has no usable oneDNN linear op")


def _forward_backward(layer: torch.nn.Linear, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = layer(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return out, grads, out.grad_fn.name()


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48)])
def test_onednn_linear_matches_torch_linear_in_fp32(bias, shape):
    torch.manual_seed(0)
    layer = OneDNNLinear(48, 80, bias=bias)
    x = torch.randn(shape)
    out, grads, grad_fn = _forward_backward(layer, x)
    assert grad_fn == "_OneDNNLinearBackward"  # the oneDNN path was taken
    layer.zero_grad(set_to_none=True)
    layer.__class__ = torch.nn.Linear
    ref_out, ref_grads, ref_fn = _forward_backward(layer, x)
    assert ref_fn != grad_fn
    assert out.shape == (*shape[:-1], 80)
    # fp32 both ways: the sums only run in another order (bf16 or TF32 would differ by ~1e-2)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_autocast_and_blas_take_torchs_own_path():
    layer = OneDNNLinear(16, 8)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.grad_fn.name() != "_OneDNNLinearBackward"
    model = GPT(GPTConfig(block_size=32, vocab_size=500, n_layer=1, n_head=2, n_embd=32))
    apply_cpu_fast_paths(model, onednn=False, sparse_embedding=False)
    layer = model.lm_head
    assert type(layer) is torch.nn.Linear  # blas: bit for bit plain PyTorch
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


@needs_onednn
def test_gpt_gradients_match_with_onednn_and_blas():
    config = GPTConfig(block_size=32, vocab_size=500, n_layer=2, n_head=2, n_embd=32)
    idx = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for onednn in (True, False):
        torch.manual_seed(0)
        model = GPT(config)
        assert ("onednn" in apply_cpu_fast_paths(model, onednn=onednn, sparse_embedding=False)) is onednn
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@needs_onednn
def test_fast_paths_keep_the_parameters_and_state_dict():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=500, n_layer=2, n_head=2, n_embd=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_cpu_fast_paths(model) == ["onednn", "sparse embedding gradient"]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(type(m) is OneDNNLinear for m in model.modules()) == 2 * 4 + 1  # 4 per block and lm_head
    assert sum(type(m) is ShortSequenceAttention for m in model.modules()) == 2
    assert not any(type(m) in (torch.nn.Linear, CausalSelfAttention) for m in model.modules())
    assert model.transformer.wte.sparse and model.transformer.wte.weight is model.lm_head.weight


def _tiny_gpt() -> GPT:
    return GPT(GPTConfig(block_size=32, vocab_size=500, n_layer=2, n_head=2, n_embd=32))


@pytest.fixture
def fresh_probe():
    cpu.onednn_linear.cache_clear()  # the op is looked up once per process: look again under this test's torch
    yield
    cpu.onednn_linear.cache_clear()


def _dropped_op(name: str):
    raise AttributeError(f"'_OpNamespace' 'mkldnn' object has no attribute '{name}'")  # what torch.ops raises


def _changed_op(name: str):
    return lambda x, w, b, *rest: torch.zeros(x.size(0), w.size(0))


@pytest.mark.parametrize("broken, why", [(_dropped_op, "has no usable torch.ops.mkldnn._linear_pointwise ('_OpNamespace"),
                                         (_changed_op, "does not compute F.linear")])
def test_a_torch_without_the_onednn_op_falls_back_with_one_warning(monkeypatch, caplog, fresh_probe, broken, why):
    monkeypatch.setattr(cpu, "_lookup_op", broken)
    with caplog.at_level(logging.WARNING, logger="gpt_exp.cpu"):
        first, second = _tiny_gpt(), _tiny_gpt()
        assert apply_cpu_fast_paths(first) == ["sparse embedding gradient"]
        assert apply_cpu_fast_paths(second) == ["sparse embedding gradient"]
    assert not any(type(m) is OneDNNLinear for m in [*first.modules(), *second.modules()])
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]  # one, for two models
    assert warning.startswith("device.cpu_matmul=onednn: ") and why in warning and torch.__version__ in warning
    assert "device.cpu_matmul=blas" in warning
    x = torch.randint(0, 500, (2, 8))
    logits, loss = first(x, x)
    assert logits.shape == (2, 8, 500) and torch.isfinite(loss)  # and the model trains in torch's own path
    loss.backward()


@needs_onednn
def test_the_probe_accepts_this_torchs_op_and_names_what_is_missing():
    op, why = cpu.probe_onednn_linear()
    assert op is not None and why == ""
    op, why = cpu.probe_onednn_linear("_no_such_op")
    assert op is None and f"torch {torch.__version__} has no usable torch.ops.mkldnn._no_such_op" in why
