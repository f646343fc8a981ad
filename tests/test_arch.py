"""The architecture settings (model.pos, norm, qk_norm, mlp, bias, tie_embeddings, logit_softcap, n_kv_head,
value_embeddings, zero_init_proj): what each changes, counted (shapes.py) and measured, and the presets."""

import dataclasses
import json
import signal
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gpt_exp.checkpoint import list_checkpoints
from gpt_exp.config import ModelConfig
from gpt_exp.errors import ConfigError
from gpt_exp.model import GPT, GPTConfig, apply_rope, rope_cos_sin
from gpt_exp.optim import BlockwiseMuon, muon_parameters, orthogonalize, row_blocks
from gpt_exp.shapes import GPT2_ARCH, flops_per_token, param_counts
from tests.helpers import compose_config, read_metrics, run_cli, run_cli_async

BASE = dict(block_size=64, n_layer=3, n_head=4, n_embd=32)
MODERN = dict(pos="rope", norm="rmsnorm", norm_gain=False, qk_norm=True, mlp="relu2", bias=False,
              tie_embeddings=False, logit_softcap=15.0, value_embeddings=True, zero_init_proj=True)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)
SETTINGS = {  # one change from GPT-2 at a time, then the presets' combinations
    "gpt2": {}, "rope": dict(pos="rope"), "rmsnorm": dict(norm="rmsnorm"), "no_gain": dict(norm_gain=False),
    "qk_norm": dict(qk_norm=True), "relu2": dict(mlp="relu2"), "swiglu": dict(mlp="swiglu"),
    "no_bias": dict(bias=False),
    "untied": dict(tie_embeddings=False), "softcap": dict(logit_softcap=15.0), "gqa": dict(n_kv_head=1),
    "value_embeddings": dict(value_embeddings=True), "value_embeddings_gqa": dict(value_embeddings=True, n_kv_head=2),
    "zero_init_proj": dict(zero_init_proj=True), "modern": MODERN, "llama": LLAMA,
}
EMBEDDINGS = ("transformer.wte.", "transformer.wpe.", "transformer.ve.", "lm_head.")


def model_of(settings: dict, seed: int = 0, **shape) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**BASE, **shape}, **settings))


def counts(settings: dict) -> tuple[int, int]:
    c = BASE
    return param_counts(c["n_layer"], c["n_embd"], 50257, c["block_size"], c["n_head"], **settings)


@pytest.mark.parametrize("name", SETTINGS)
def test_parameter_counts_are_the_models(name):
    model = model_of(SETTINGS[name])
    named = dict(model.named_parameters())  # a tied weight once
    embedding = sum(p.numel() for n, p in named.items() if n.startswith(EMBEDDINGS))
    total = sum(p.numel() for p in named.values())
    assert counts(SETTINGS[name]) == (total - embedding, total)
    assert model.num_params() == total


def test_each_setting_changes_the_count_as_stated():
    gpt2_non_embedding, gpt2_total = counts({})
    C, L, V, H = 32, 3, 50257, 4
    assert gpt2_non_embedding == L * (12 * C * C + 13 * C) + 2 * C
    assert counts(dict(pos="rope"))[1] == gpt2_total - 64 * C  # no wpe
    assert counts(dict(norm="rmsnorm"))[0] == gpt2_non_embedding - (2 * L + 1) * C  # no LayerNorm bias
    assert counts(dict(norm_gain=False))[0] == gpt2_non_embedding - (2 * L + 1) * 2 * C
    assert counts(dict(qk_norm=True))[0] == gpt2_non_embedding + L * 2 * 2 * (C // H)
    # hidden round(8 * 32 / 3) = 85: weights 3 * 32 * 85 = 8160 ~ 8 C^2 = 8192; c_fc's biases 2 * 85, not 4 C
    assert counts(dict(mlp="swiglu"))[0] == gpt2_non_embedding + L * (3 * C * 85 - 8 * C * C + 2 * 85 - 4 * C)
    assert counts(dict(bias=False))[0] == gpt2_non_embedding - L * (3 * C + C + 4 * C + C) - (2 * L + 1) * C
    assert counts(dict(tie_embeddings=False))[1] == gpt2_total + V * C
    assert counts(dict(n_kv_head=1))[0] == gpt2_non_embedding - L * 2 * (C - C // H) * (C + 1)
    assert counts(dict(value_embeddings=True))[1] == gpt2_total + 2 * V * C + 2 * 32 * H  # layers 0 and 2
    assert counts(dict(logit_softcap=15.0)) == counts(dict(zero_init_proj=True)) == counts({})
    # at 124M SwiGLU's hidden is 2048: its weights are the 4C MLP's exactly (its biases, 2 x 2048, are not)
    assert param_counts(12, 768, 50257, 1024, 12, mlp="swiglu", bias=False) == param_counts(12, 768, 50257, 1024, 12,
                                                                                           bias=False)


def forward_flops(model: GPT, T: int) -> int:
    # SDPA's math path: its two matmuls are what the counter sees (it has no formula for the CPU's flash kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, T, dtype=torch.long))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", SETTINGS)
def test_flops_per_token_are_three_times_the_forward_matmuls(name):
    """The convention (shapes.flops_per_token): 6 per weight a token multiplies through = the forward matmuls'
    FLOPs x 3, plus the attention scores; the gains and biases are counted at 6 each too (PaLM's count of every
    parameter), which torch's counter, counting matmuls only, does not see."""
    model, T = model_of(SETTINGS[name]), 48
    vectors = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    c = BASE
    counted = flops_per_token(c["n_layer"], c["n_embd"], 50257, c["block_size"], T, c["n_head"], **SETTINGS[name])
    assert counted == 3 * forward_flops(model, T) // T + 6 * vectors
    assert model.flops_per_token(T) == counted


def test_gpt2_counts_and_state_dict_keys_are_unchanged():
    assert param_counts(12, 768, 50257, 1024) == (85_056_000, 124_439_808)
    assert flops_per_token(12, 768, 50257, 1024, 1024) == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in GPT2_ARCH} == GPT2_ARCH
    keys = list(model_of({}, n_layer=1).state_dict())
    assert keys == ["transformer.wte.weight", "transformer.wpe.weight", *(f"transformer.h.0.{k}" for k in (
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
        "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")),
        "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]
    assert GPTConfig().is_gpt2 and not GPTConfig(pos="rope").is_gpt2 and GPTConfig(n_kv_head=12).is_gpt2


def test_rope_scores_depend_on_the_offset_only():
    q, k = torch.randn(2, 1, 1, 1, 16, generator=torch.Generator().manual_seed(0))
    scores = []
    for shift in (0, 5, 37):
        positions = torch.tensor([3 + shift, 10 + shift])  # q at 10 + shift, k at 3 + shift: offset 7
        cos, sin = rope_cos_sin(16, 10000.0, positions)
        scores.append((apply_rope(q, cos[1:], sin[1:]) * apply_rope(k, cos[:1], sin[:1])).sum().item())
    assert scores[1] == pytest.approx(scores[0], abs=1e-5) and scores[2] == pytest.approx(scores[0], abs=1e-5)
    cos, sin = rope_cos_sin(16, 10000.0, torch.tensor([3, 11]))  # offset 8: another score
    assert abs((apply_rope(q, cos[1:], sin[1:]) * apply_rope(k, cos[:1], sin[:1])).sum().item() - scores[0]) > 1e-3
    assert torch.equal(apply_rope(q, *rope_cos_sin(16, 10000.0, torch.tensor([0]))), q)  # position 0: no turn


def test_softcap_bounds_the_logits():
    model = model_of(dict(logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # logits in the hundreds without the cap
        logits, _ = model(torch.randint(0, 50257, (2, 16)))
    assert logits.abs().max().item() <= 2.0
    assert logits.abs().max().item() > 1.99  # the cap is reached, not a smaller scale


def test_gqa_shapes_and_the_same_model_as_repeated_kv_heads():
    model = model_of(dict(n_kv_head=2))
    attn = model.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (32 + 2 * 2 * 8, 32)  # q: 4 heads of 8; k and v: 2 heads of 8 each
    assert row_blocks(model)[attn.c_attn.weight] == (32, 16, 16)
    x = torch.randn(2, 10, 32)
    q, k, v = attn.c_attn(x).split((32, 16, 16), dim=2)
    q = q.view(2, 10, 4, 8).transpose(1, 2)
    k, v = (t.view(2, 10, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1) for t in (k, v))  # query h: kv h // 2
    want = attn.c_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                       .transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attn(x), want)


def test_muon_and_mup_split_the_tensors_under_every_setting():
    for settings in (MODERN, LLAMA, dict(mlp="swiglu")):
        model = model_of(settings)
        muon, adamw = muon_parameters(model)
        names = {id(p): n for n, p in model.named_parameters()}
        assert all(p.dim() == 2 for p in muon) and all(names[id(p)].startswith("transformer.h.") for p in muon)
        assert {names[id(p)].split(".")[-2] for p in muon} <= {"c_attn", "c_proj", "c_fc", "ve_gate"}
        assert id(model.lm_head.weight) in {id(p) for p in adamw}  # the readout, tied or not
        hidden = {names[id(p)].split(".")[-2] for p in model.hidden_matrices()}
        assert len(model.hidden_matrices()) == 4 * 3 and hidden == {"c_attn", "c_proj", "c_fc"}
    blocks = row_blocks(model_of(dict(mlp="swiglu")))
    assert sorted(blocks.values()) == [2, 2, 2, 3, 3, 3]  # c_fc: gate and up; c_attn: q, k, v


def test_blockwise_muon_orthogonalizes_unequal_blocks_each_on_its_own():
    w = torch.nn.Parameter(torch.zeros(12, 6))
    w.grad = torch.randn(12, 6, generator=torch.Generator().manual_seed(0))
    opt = BlockwiseMuon([w], {w: (6, 3, 3)}, lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False)
    opt.step()
    for rows, block in zip(w.grad.split((6, 3, 3)), w.detach().split((6, 3, 3))):
        orthogonal = orthogonalize(rows, opt.defaults["ns_coefficients"], 5, opt.defaults["eps"])
        want = torch.zeros_like(block).add_(orthogonal, alpha=-0.1 * max(1, rows.size(0) / 6) ** 0.5)  # rows/cols
        assert torch.equal(block, want)


def test_mup_zeroes_the_queries_under_gqa():
    model = model_of(dict(n_kv_head=1), parametrization="mup", mup_base_width=16)
    w = model.transformer.h[0].attn.c_attn.weight
    assert w[:32].abs().sum() == 0 and w[32:].abs().sum() > 0


def test_zero_init_proj_zeroes_the_residual_projections_and_keeps_the_rest():
    plain, zero = model_of({}), model_of(dict(zero_init_proj=True))
    for a, b in zip(plain.transformer.h, zero.transformer.h):
        assert b.attn.c_proj.weight.abs().sum() == 0 and b.mlp.c_proj.weight.abs().sum() == 0
        assert torch.equal(a.attn.c_attn.weight, b.attn.c_attn.weight)  # the same random stream otherwise


@pytest.mark.parametrize("override, message", [
    ("model.n_kv_head=3", "error: model.n_kv_head=3 is invalid: it must divide model.n_head=2"),
    ("model.n_kv_head=0", "error: model.n_kv_head=0 is invalid: it must divide model.n_head=2"),
    ("model.n_embd=26", "error: model.pos=rope is invalid: rope rotates pairs of a head's features, and "
                        "model.n_embd/model.n_head=13 is odd"),
    ("model.logit_softcap=0", "error: model.logit_softcap=0.0 is invalid: it must be a finite number > 0"),
    ("model.mlp=swish", "error: model.mlp=swish is invalid: use gelu or relu2 or swiglu"),
])
def test_impossible_models_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        compose_config("model=modern_tiny", override)
    assert f"error: {e.value}".startswith(message)


def test_an_impossible_model_exits_2_from_the_cli(tmp_path):
    result = run_cli("run", "model=tiny", "model.n_kv_head=3", "logger.mode=disabled", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: model.n_kv_head=3 is invalid")
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").glob("*/*/metrics.jsonl"))


def test_the_presets_are_nanochats_choices():
    modern, tiny = compose_config("model=modern").model, compose_config("model=modern_tiny").model
    for m in (modern, tiny):
        assert {k: getattr(m, k) for k in MODERN} == MODERN
    assert (modern.n_layer, modern.n_head, modern.n_embd) == (12, 12, 768)
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd) == (2, 2, 24)
    # 124M's blocks without biases or gains, 6 gates of 32 x 12 (layers 1, 3, ..., 11), an untied lm_head and 6
    # value embeddings of 50257 x 768
    non_embedding, total = param_counts(12, 768, 50257, 1024, 12, **MODERN)
    assert non_embedding == 12 * 12 * 768**2 + 6 * 32 * 12 == 84_936_960
    assert total == non_embedding + 2 * 50257 * 768 + 6 * 50257 * 768


MODERN_RUN = ["model=modern_tiny", "train.max_steps=20", "optim.warmup_steps=5", "optim.schedule=constant"]


def test_modern_tiny_trains_resumes_bitwise_and_samples(tmp_path, cache_dir):
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    result = run_cli("run", *MODERN_RUN, "logger.mode=disabled", f"data.cache_dir={cache_dir}", cwd=straight_dir)
    assert result.returncode == 0, result.stderr
    [run_dir] = [p.parent for p in (straight_dir / "outputs").glob("*/*/.hydra")]
    straight = [row["loss"] for row in read_metrics(run_dir)]
    assert straight[0] == pytest.approx(10.82, abs=0.05) and straight[-1] < straight[0] - 0.1  # it learns
    assert not (run_dir / "model").exists() and list_checkpoints(run_dir)  # no GPT-2 dir: its checkpoint holds it

    proc = run_cli_async("run", *MODERN_RUN, "logger.mode=offline", "train.ckpt_every=5", f"data.cache_dir={cache_dir}",
                         cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = list((tmp_path / "outputs").glob("*/*/metrics.jsonl"))
        if metrics and metrics[0].read_text().count("\n") >= 12:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=300) == -signal.SIGKILL  # killed, not finished
    killed_dir = metrics[0].parent
    result = run_cli("run", *MODERN_RUN, "logger.mode=disabled", "model.logit_softcap=30", f"resume={killed_dir}",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)  # MODEL_FIXED: another model, refused
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: resume: the checkpoint's model has another shape or parametrization (model.logit_softcap")
    result = run_cli("run", *MODERN_RUN, "logger.mode=offline", f"resume={killed_dir}",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [resumed_dir] = [d for d in (tmp_path / "outputs").glob("*/*") if d != killed_dir]
    assert [row["loss"] for row in read_metrics(resumed_dir)] == straight  # bitwise
    assert json.loads((resumed_dir / "summary.json").read_text())["status"] == "completed"

    result = run_cli("sample", f"resume={run_dir}", "prompt=ROMEO:", "max_new_tokens=8", "num_samples=2",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ROMEO:") == 2
    result = run_cli("export", str(run_dir), str(tmp_path / "hf"), cwd=tmp_path)
    assert result.returncode == 2
    assert ("error: export writes GPT-2's or Llama's architecture, and no transformers class represents model.mlp="
            "relu2, model.qk_norm=true, model.logit_softcap=15.0, model.value_embeddings=true;") in result.stderr


@pytest.mark.parametrize("settings", [dict(LLAMA, n_kv_head=2), dict(LLAMA, n_kv_head=4, tie_embeddings=False,
                                                                     norm_gain=False, bias=True)])
def test_a_llama_shaped_model_exports_as_llama_and_generates_alike(tmp_path, settings):
    transformers = pytest.importorskip("transformers")
    from gpt_exp.generation import generate
    from gpt_exp.hf import save_hf

    ours = model_of(settings).eval()
    with torch.no_grad():  # larger weights than the init's: greedy choices far from ties
        for p in ours.parameters():
            p.mul_(4)
    out = save_hf(ours, tmp_path / "llama", step=3)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == settings["n_kv_head"]
    assert config["intermediate_size"] == 85 and config["gpt_exp_step"] == 3
    theirs = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-4, rtol=1e-4)
        want = generate(ours, idx, 20, top_k=1)
        got = theirs.generate(idx, max_new_tokens=20, do_sample=False, eos_token_id=None,
                              attention_mask=torch.ones_like(idx))
    assert torch.equal(got, want)


def test_a_model_no_transformers_class_holds_is_refused_in_one_line(tmp_path):
    from gpt_exp.hf import save_hf

    with pytest.raises(ConfigError, match=r"^export writes GPT-2's or Llama's architecture, and no transformers class "
                                          r"represents model.mlp=relu2; sample and eval"):
        save_hf(model_of(dict(LLAMA, mlp="relu2")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, drop", [
    (["model=modern_tiny", "optim=muon"], 0.05),
    (["model=modern_tiny", "optim=muon", "model.mlp=swiglu", "model.n_kv_head=1"], 0.05),
    # muP at m = 3: the hidden matrices' lr and the logits / 3, so 12 steps move the loss less
    (["model=modern_tiny", "model.parametrization=mup", "model.mup_base_width=8"], 0.005),
])
def test_muon_and_mup_train_the_other_architectures(tmp_path, cache_dir, args, drop):
    result = run_cli("run", *args, "train.max_steps=12", "optim.warmup_steps=2", "logger.mode=disabled",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [run_dir] = [p.parent for p in (tmp_path / "outputs").glob("*/*/.hydra")]
    losses = [row["loss"] for row in read_metrics(run_dir)]
    assert len(losses) == 12 and losses[-1] < losses[0] - drop  # it learns with every block's tensors split
