import pytest
import torch
from torch.nn import functional as F

"""The CPU fast paths (gpt_exp/cpu.py): oneDNN matmuls equal torch's, and apply_cpu_fast_paths keeps the model."""

from gpt_exp.cpu import CausalSelfAttention, OneDNNLinear, ShortSequenceAttention, apply_cpu_fast_paths, onednn_available
from gpt_exp.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN")


def _forward_backward(layer: torch.nn.Linear, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = layer(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return out, grads, out.grad_fn.name()


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
