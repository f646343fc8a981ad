import dataclasses
import math

import numpy as np
import pytest
import torch

from gpt_exp.config import DataConfig, DataSource, DType, ModelConfig, Schedule
from gpt_exp.data.cache import prepare_tokens
from gpt_exp.data.loader import BatchLoader
from gpt_exp.cpu import apply_cpu_fast_paths, short_sequence_attention
from gpt_exp.device import Runtime
from gpt_exp.model import GPT, GPTConfig, fit_padding, pad_vocab_on, padded_vocab
from gpt_exp.trainer import LRSchedule, clip_gradients
from gpt_exp.errors import ConfigError, Diverged
from tests.helpers import Collect, compose_config, make_trainer

TINY = GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=2, n_embd=24)
PADDED = dataclasses.replace(TINY, padded_vocab_size=50304)
CPU_FP32 = Runtime(device=torch.device("cpu"), dtype=DType.fp32, compile=False)


@pytest.fixture(scope="module")
def shakespeare(cache_dir):
    return prepare_tokens(DataConfig(source=DataSource.shakespeare, cache_dir=str(cache_dir))).load()


def test_gpt2_124m_shapes_and_initial_loss(shakespeare):
    torch.manual_seed(1337)
    model = GPT(GPTConfig())
    assert model.num_params() == 124_439_808
    assert model.transformer.wte.weight is model.lm_head.weight  # weight tying
    x, y = BatchLoader(shakespeare, B=4, T=32).next_batch()
    with torch.no_grad():
        logits, loss = model(x, y)
    assert logits.shape == (4, 32, 50257)
    assert abs(loss.item() - math.log(50257)) < 0.3  # ~10.82: a uniform guess over the vocabulary
    assert model(x)[1] is None


@pytest.mark.parametrize("T", [32, 96])  # the math path (short sequences under CPU autocast) and flash
def test_short_sequence_attention_under_bf16_autocast_matches_fp32(T):
    q, k, v = torch.randn(3, 2, 4, T, 16, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = short_sequence_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    assert torch.equal(short_sequence_attention(q, k, v), want)  # fp32: SDPA as it is


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64))
    block = model.transformer.h[0]
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0005  # 0.02 / sqrt(2 * 8)
    assert abs(block.attn.c_proj.weight.std().item() - 0.02 / 4) < 0.0005


def test_optimizer_decays_only_2d_weights():
    model = GPT(TINY)
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # 2 blocks x (attn, proj, fc, proj) + wte + wpe; 2 x (2 layernorms x 2 + 4 biases) + ln_f x 2
    assert (len(decay["params"]), len(no_decay["params"])) == (10, 18)


def test_lr_schedule_warmup_cosine_and_constant():
    s = LRSchedule(lr=6e-4, warmup_steps=10, max_steps=50, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(6e-5) and s(9) == pytest.approx(6e-4)
    assert s(30) == pytest.approx(6e-5 + 0.5 * (5.4e-4))  # halfway through the decay
    assert s(50) == pytest.approx(6e-5) and s(1000) == pytest.approx(6e-5)
    assert all(s(i) >= s(i + 1) for i in range(9, 60))
    c = LRSchedule(lr=1e-3, warmup_steps=2, max_steps=50, kind=Schedule.constant)
    assert [c(0), c(1), c(2), c(49)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


def _train_losses(cache_dir, steps, lr, grad_accum=1, B=4):
    trainer = make_trainer(cache_dir, f"B={B}", f"train.max_steps={steps}", f"optim.lr={lr}", "optim.warmup_steps=0",
                           "optim.schedule=constant", f"train.overfit_batches={grad_accum}",
                           f"train.total_batch_size={B * 32 * grad_accum}")
    tracker = Collect()
    assert trainer.fit(tracker) == "completed"
    return tracker.losses


@pytest.mark.parametrize("on_cpu", [True, False])
@pytest.mark.parametrize("max_norm", [0.5, 1e9, 0.0])
def test_clip_gradients_is_clip_grad_norm(on_cpu, max_norm):
    """Bit for bit what clip_grad_norm_ (or, with clipping off, get_total_norm) gives, skipped pass or not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    (model(torch.randn(5, 8)) * 3).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = clip_gradients(model, max_norm, on_cpu)
    ours = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    if max_norm > 0:
        want_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        want_norm = torch.nn.utils.get_total_norm(grads)
    assert norm.item() > 0.5  # the small max_norm does clip
    assert torch.equal(norm, want_norm)
    assert all(torch.equal(a, p.grad) for a, p in zip(ours, model.parameters()))
    assert any(not torch.equal(a, g) for a, g in zip(ours, grads)) == (max_norm == 0.5)


def test_tiny_model_overfits_one_batch(cache_dir):
    losses = _train_losses(cache_dir, steps=100, lr=1e-2)
    assert abs(losses[0] - math.log(50257)) < 0.1
    assert losses[-1] < 0.1


def test_grad_accumulation_matches_the_big_batch(cache_dir):
    """Two micro-batches of B=2 accumulate to the same step as one batch of B=4 (the same 4 sequences)."""
    big = _train_losses(cache_dir, steps=3, lr=1e-3, B=4)
    accum = _train_losses(cache_dir, steps=3, lr=1e-3, B=2, grad_accum=2)
    np.testing.assert_allclose(accum, big, atol=1e-5)


@pytest.mark.slow
def test_gpt2_124m_overfits_one_batch_with_default_optimizer(cache_dir):
    """The lecture's check: 124M, B=4, T=32, lr 6e-4 warmup+cosine: from ~10.8 to below 1.5 within 50 steps."""
    tracker = Collect()
    make_trainer(cache_dir, "model=gpt2", "train.overfit_batches=1").fit(tracker)
    assert abs(tracker.losses[0] - math.log(50257)) < 0.3
    assert min(tracker.losses) < 1.5


def test_flops_per_token_is_palms_formula():
    model = GPT(GPTConfig())
    matmul_weights = 124_439_808 - 1024 * 768  # everything but the position embedding
    assert model.flops_per_token(1024) == 6 * matmul_weights + 12 * 12 * 768 * 1024  # ~855 MFLOP per token


@pytest.mark.parametrize("skip_nonfinite", [0, 2])
def test_nonfinite_step_is_never_applied(cache_dir, skip_nonfinite):
    """A step whose loss turns NaN leaves weights and optimizer state as they were; skipped steps do not count."""
    trainer = make_trainer(cache_dir, "B=2", "T=16", "train.max_steps=6", "optim.warmup_steps=0",
                           f"train.skip_nonfinite={skip_nonfinite}")
    model, opt = trainer.model, trainer.optimizer
    poisoned = {2, 3}
    step_of_call = iter(range(100))

    def poison(module, inputs, output):  # the token embedding's output is inf at the poisoned steps
        return output * float("inf") if next(step_of_call) in poisoned else output

    model.transformer.wte.register_forward_hook(poison)
    weights = {}

    class Tracker(Collect):
        def log_step(self, m):
            super().log_step(m)
            weights[m.step] = [p.detach().clone() for p in model.parameters()]

    tracker = Tracker()
    if skip_nonfinite == 0:
        with pytest.raises(Diverged, match="the loss is nan at step 2 .*the step was not applied"):
            trainer.fit(tracker)
        assert [m.step for m in tracker.steps] == [0, 1]
        # the weights are those after step 1: the poisoned step 2 changed nothing, and all are finite
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights[1]))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert opt.state[next(model.parameters())]["step"].item() == 2
    else:
        assert trainer.fit(tracker) == "completed"
        assert [m.step for m in tracker.steps] == [0, 1, 4, 5] and [s for s, _ in tracker.skips] == [2, 3]
        assert "skipped 2 of at most 2" in tracker.skips[-1][1]
        assert opt.state[next(model.parameters())]["step"].item() == 4  # only the applied steps count
        assert tracker.steps[-1].tokens == 4 * 2 * 16  # skipped steps trained on nothing


def test_padded_vocab_is_the_next_multiple_of_64():
    assert [padded_vocab(v, True) for v in (50257, 50304, 50305, 1)] == [50304, 50304, 50368, 64]
    assert padded_vocab(50257, False) == 50257


@pytest.mark.parametrize("pad_vocab, device_type, rows", [
    ("auto", "cuda", 50304), ("auto", "cpu", 50257), ("auto", "mps", 50257), ("AUTO", "cuda", 50304),
    ("true", "cpu", 50304), ("True", "cpu", 50304), (True, "cpu", 50304), ("false", "cuda", 50257),
    (False, "cuda", 50257),
])
def test_pad_vocab_auto_pads_on_cuda_only(pad_vocab, device_type, rows):
    m = ModelConfig(name="tiny", block_size=256, n_layer=2, n_head=2, n_embd=24, pad_vocab=pad_vocab)
    assert GPTConfig.from_model_config(m, device_type) == GPTConfig(256, 50257, 2, 2, 24, rows)
    for saved in (50257, 50304):  # a checkpoint's weights decide, whatever the device
        assert GPTConfig.from_model_config(m, device_type, saved_rows=saved).padded_vocab_size == saved


def test_pad_vocab_from_the_command_line():
    # Hydra hands true/false over as bools, which the str field keeps as "True"/"False"
    assert [pad_vocab_on(compose_config(*o).model.pad_vocab, "cpu") for o in
            ((), ("model.pad_vocab=true",), ("model.pad_vocab=false",), ("model.pad_vocab=auto",))] == \
        [False, True, False, False]
    assert pad_vocab_on(compose_config().model.pad_vocab, "cuda") is True
    with pytest.raises(ConfigError) as e:
        pad_vocab_on(compose_config("model.pad_vocab=maybe").model.pad_vocab, "cuda")
    assert str(e.value) == "model.pad_vocab=maybe is invalid: use auto (pad on CUDA only), true or false"


def test_padded_model_from_the_same_seed_is_the_same_model(shakespeare):
    """Zero rows appended after an init drawn as the unpadded model draws it: same weights, logits, loss, gradients."""
    torch.manual_seed(1337)
    plain = GPT(TINY)
    torch.manual_seed(1337)
    padded = GPT(PADDED)
    wte = padded.transformer.wte.weight
    assert wte.shape == (50304, 24) and wte is padded.lm_head.weight  # tied, at the padded size
    assert torch.equal(wte[:50257], plain.lm_head.weight) and not wte[50257:].any()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(plain.named_parameters(), padded.named_parameters())
               if a.shape == b.shape)
    assert padded.num_params() == plain.num_params() == 1_226_808  # the padding is no weight of the model
    assert padded.flops_per_token(32) == plain.flops_per_token(32)
    x, y = BatchLoader(shakespeare, B=4, T=32).next_batch()
    (logits, loss), (want_logits, want_loss) = padded(x, y), plain(x, y)
    assert logits.shape == (4, 32, 50257) and torch.equal(logits, want_logits)
    assert loss.item() == want_loss.item() and abs(loss.item() - math.log(50257)) < 0.1
    loss.backward()
    want_loss.backward()
    # torch's BLAS (MKL) may block a 50257-row and a 50304-row product differently (it does on Intel Xeons): the
    # gradients agree to float rounding there, bitwise elsewhere; the padded rows get none at all
    assert torch.allclose(wte.grad[:50257], plain.lm_head.weight.grad, rtol=1e-5, atol=1e-9)
    assert not wte.grad[50257:].any()


def test_unpadded_weights_copied_into_a_padded_model_give_the_same_loss(shakespeare):
    torch.manual_seed(0)
    plain = GPT(TINY)
    torch.manual_seed(1)  # other weights, overwritten by the copy
    padded = GPT(PADDED)
    padded.load_state_dict(fit_padding(plain.state_dict(), padded.config))
    assert padded.lm_head.weight is padded.transformer.wte.weight and not padded.lm_head.weight[50257:].any()
    x, y = BatchLoader(shakespeare, B=4, T=32).next_batch()
    assert padded(x, y)[1].item() == plain(x, y)[1].item()
    unpadded = GPT(TINY)  # and back: the padding cut
    unpadded.load_state_dict(fit_padding(padded.state_dict(), TINY))
    assert unpadded(x, y)[1].item() == plain(x, y)[1].item()


def force_padded_logits(model: GPT, value: float = 1e4) -> None:
    """lm_head's padded columns set to `value`: were they not cut, they would take all the probability."""
    real = model.config.vocab_size

    def hook(module, inputs, out):
        return torch.cat([out[..., :real], out.new_full((*out.shape[:-1], out.size(-1) - real), value)], dim=-1)

    model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize("fast_paths", [False, True])
def test_padded_rows_stay_zero_and_training_matches_unpadded(shakespeare, fast_paths):
    """Five AdamW steps (weight decay 0.1) from the same seed: the same losses and weights, bit for bit, and the
    padded rows still zero; with the CPU fast paths too (oneDNN matmuls, the sparse embedding gradient)."""
    runs = {}
    for config in (TINY, PADDED):
        torch.manual_seed(1337)
        model = GPT(config)
        if fast_paths:
            apply_cpu_fast_paths(model)
        if config.padded:
            force_padded_logits(model)
        opt = model.configure_optimizer(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")
        loader, losses = BatchLoader(shakespeare, B=4, T=32), []
        for _ in range(5):
            x, y = loader.next_batch()
            opt.zero_grad(set_to_none=True)
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[config.padded] = losses, model
    (losses, plain), (padded_losses, padded) = runs[False], runs[True]
    # oneDNN (the fast paths) is bitwise; MKL may block the padded product differently (see above): float rounding
    same = torch.equal if fast_paths else (lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-4))  # measured 1.5e-5
    assert (padded_losses == losses if fast_paths else padded_losses == pytest.approx(losses, rel=1e-6))
    assert losses[-1] < losses[0] - 0.5  # it trains
    wte = padded.transformer.wte.weight
    assert same(wte[:50257], plain.transformer.wte.weight) and not wte[50257:].any()
    assert all(same(a, b) for a, b in zip(plain.parameters(), padded.parameters()) if a.shape == b.shape)
