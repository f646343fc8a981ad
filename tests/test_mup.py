"""model.parametrization=sp|mup: sp is GPT-2 unchanged; mup (Tensor Programs V) scales init, lrs, attention and logits
with the width multiplier m = n_embd / mup_base_width, and its coordinate check stays flat with the width."""

from __future__ import annotations

import json

from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from gpt_exp import coord_check
from gpt_exp.config import ConfigError, OptimConfig, RunConfig, schema_keys
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.optim import build_optimizer
from tests.helpers import Collect, compose_config, make_trainer, read_metrics

# the first 3 losses of `model=tiny train.max_steps=3` on tiny shakespeare before muP existed (this file's commit's
# parent): sp must keep giving them
SP_LOSSES = [10.815777778625488, 10.834146499633789, 10.81048583984375]


def _gpt(width: int, parametrization: str, base: int = 64, seed: int = 0, **multipliers: float) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=4, n_embd=width,
                         parametrization=parametrization, mup_base_width=base, **multipliers))


def _random_query(model: GPT) -> GPT:
    """muP's query starts at zero, which makes every attention score 0 whatever its scale: draw one, to see it."""
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[: model.config.n_embd].normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


def test_sp_is_the_default_and_trains_as_before(cache_dir):
    runs = {}
    for name, extra in (("unset", ()), ("sp", ("model.parametrization=sp",))):
        trainer = make_trainer(cache_dir, "train.max_steps=3", "device.compile=false", *extra)
        tracker = Collect()
        assert trainer.fit(tracker) == "completed"
        runs[name] = tracker.losses
    assert runs["unset"] == runs["sp"]  # bit for bit
    assert runs["sp"] == pytest.approx(SP_LOSSES, abs=1e-5)


def test_mup_at_the_base_width_is_sp_but_for_the_zero_query_and_the_attention_scale():
    """At m = 1: the same weights (the same seed) except c_attn's query rows, zero; the same lr in every group; the
    logits unscaled; attention scores by 1/d_head (mup) instead of SDPA's 1/sqrt(d_head) (sp)."""
    sp, mup = _gpt(64, "sp"), _gpt(64, "mup")
    assert mup.config.width_mult == 1.0
    for (name, a), (_, b) in zip(sp.named_parameters(), mup.named_parameters()):
        if name.endswith("attn.c_attn.weight"):
            assert torch.equal(b[:64], torch.zeros(64, 64)) and a[:64].abs().sum() > 0
            assert torch.equal(a[64:], b[64:])  # keys and values
        else:
            assert torch.equal(a, b), name
    assert sp.transformer.h[0].attn.scale is None and mup.transformer.h[0].attn.scale == 1 / 16
    lrs = [[g["lr"] for g in build_optimizer(m, OptimConfig(lr=3e-3), "cpu", False).param_groups] for m in (sp, mup)]
    assert set(lrs[0]) == set(lrs[1]) == {3e-3}
    # with the query zero, every score is 0 whatever its scale: the two models' logits are the same at the init
    x = torch.randint(0, 50257, (2, 16))
    assert torch.allclose(sp.eval()(x)[0], mup.eval()(x)[0]) is False  # sp's query is not zero
    sp.transformer.h[0].attn.c_attn.weight.data[:64] = 0
    sp.transformer.h[1].attn.c_attn.weight.data[:64] = 0
    assert torch.equal(sp(x)[0], mup(x)[0])


ONES = dict(mup_output_mult=1.0, mup_attn_mult=1.0, mup_embed_lr_mult=1.0)
# the loss of _random_query(_gpt(width, "mup")) on one fixed batch before the multipliers were settings (this file's
# commit's parent)
MUP_LOSSES = {64: 10.792641639709473, 128: 10.799433708190918}


@pytest.mark.parametrize("width", [64, 128])
def test_multipliers_of_one_are_mup_as_it_was(width):
    default, ones = _random_query(_gpt(width, "mup")), _random_query(_gpt(width, "mup", **ONES))
    assert default.config == ones.config
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 50257, (2, 16), generator=g), torch.randint(0, 50257, (2, 16), generator=g)
    assert default(x, y)[1].item() == pytest.approx(MUP_LOSSES[width], abs=1e-6)
    assert torch.equal(default(x)[0], ones(x)[0])
    assert ones.transformer.h[0].attn.scale == 1 / (width // 4)  # 1/d_head
    groups = build_optimizer(ones, OptimConfig(lr=1e-3), "cpu", False).param_groups
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3 / (width / 64)), 1e-3, 1e-3]


def test_output_mult_scales_the_logits_and_nothing_else():
    x = torch.randint(0, 50257, (2, 16))
    base = _random_query(_gpt(128, "mup"))
    tuned = _random_query(_gpt(128, "mup", mup_output_mult=3.0))
    (logits, _), (tuned_logits, _) = base(x), tuned(x)
    assert torch.allclose(tuned_logits, 3.0 * logits, rtol=1e-6, atol=1e-6)
    assert logits.abs().mean() > 1e-3  # not a trivial 3 x 0
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters()))


def test_attn_mult_scales_the_attention_scores():
    """scores = attn_mult * q.k / d_head: a model with attn_mult 2 computes what one with attn_mult 1 computes from a
    query twice as large."""
    x = torch.randint(0, 50257, (2, 16))
    doubled_scale = _random_query(_gpt(128, "mup", mup_attn_mult=2.0))
    doubled_query = _random_query(_gpt(128, "mup"))
    with torch.no_grad():
        for block in doubled_query.transformer.h:
            block.attn.c_attn.weight[:128].mul_(2)
            block.attn.c_attn.bias[:128].mul_(2)
    assert doubled_scale.transformer.h[0].attn.scale == 2.0 / 32  # d_head = 128 / 4
    assert torch.allclose(doubled_scale(x)[0], doubled_query(x)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(doubled_scale(x)[0], _random_query(_gpt(128, "mup"))(x)[0], rtol=1e-5, atol=1e-5)


def test_embed_lr_mult_scales_the_embeddings_lr_and_a_resume_keeps_this_runs():
    model = _gpt(128, "mup", mup_embed_lr_mult=4.0)
    hidden, embeddings, gains = build_optimizer(model, OptimConfig(lr=1e-3), "cpu", False).param_groups
    assert (hidden["lr"], hidden["lr_scale"]) == (pytest.approx(1e-3 / 2), 0.5)  # m = 2
    assert (embeddings["lr"], embeddings["lr_scale"]) == (pytest.approx(4e-3), 4.0)
    assert {id(p) for p in embeddings["params"]} == {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    assert gains["lr"] == 1e-3 and "lr_scale" not in gains
    # a checkpoint of a run with another multiplier (load_state_dict restores the saved groups' settings)
    saved = build_optimizer(_gpt(128, "mup"), OptimConfig(lr=1e-3), "cpu", False).state_dict()
    resumed = build_optimizer(model, OptimConfig(lr=1e-3), "cpu", False)
    resumed.load_state_dict(saved)
    assert [g.get("lr_scale") for g in resumed.param_groups] == [0.5, 4.0, None]


@pytest.mark.parametrize("overrides, line", [
    (["model.mup_output_mult=2"], "model.mup_output_mult=2.0 is invalid: it scales muP's model: set "
                                  "model.parametrization=mup (or completep), or leave it at 1.0"),
    (["model.parametrization=mup", "model.mup_attn_mult=0"], "model.mup_attn_mult=0.0 is invalid: it must be a "
                                                             "finite number > 0, e.g. 1.0"),
    (["model.parametrization=mup", "model.mup_embed_lr_mult=nan"], "model.mup_embed_lr_mult=nan is invalid: it must "
                                                                   "be a finite number > 0, e.g. 1.0"),
])
def test_a_bad_multiplier_is_one_error(overrides, line):
    with pytest.raises(ConfigError) as e:
        compose_config(*overrides)
    assert str(e.value) == line


def test_a_config_from_before_the_multipliers_reads_with_multipliers_of_one():
    old = {"model": {"parametrization": "mup", "mup_base_width": 8, "n_embd": 24}}  # no mup_*_mult keys
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), old))
    assert (cfg.model.mup_output_mult, cfg.model.mup_attn_mult, cfg.model.mup_embed_lr_mult) == (1.0, 1.0, 1.0)
    config = GPTConfig.from_model_config(SimpleNamespace(**{k: v for k, v in vars(cfg.model).items()
                                                             if not k.endswith("_mult")}), "cpu")
    assert config == GPTConfig.from_model_config(cfg.model, "cpu") and config.mup_attn_mult == 1.0


def test_the_cpu_fast_paths_keep_the_mup_attention_scale():
    from gpt_exp.cpu import apply_cpu_fast_paths

    x = torch.randint(0, 50257, (2, 16))
    plain = _random_query(_gpt(128, "mup"))
    fast = _random_query(_gpt(128, "mup"))
    apply_cpu_fast_paths(fast, onednn=False, sparse_embedding=False)
    assert torch.allclose(plain(x)[0], fast(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [64, 128, 256])
def test_mup_hidden_matrices_train_with_lr_over_m_and_start_with_std_over_sqrt_m(width):
    m = width / 64
    model = _gpt(width, "mup")
    groups = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1), "cpu", False).param_groups
    hidden = {id(p) for p in model.hidden_matrices()}
    assert len(hidden) == 8  # c_attn, attn c_proj, c_fc, mlp c_proj in each of 2 blocks
    for group in groups:
        ids = {id(p) for p in group["params"]}
        if ids & hidden:
            assert ids == hidden and group["lr"] == pytest.approx(1e-2 / m) and group["lr_scale"] == 1 / m
            assert group["weight_decay"] == pytest.approx(0.1 * m)  # lr * weight_decay: 1e-3 at every width
        else:  # embeddings (wte tied to lm_head, wpe), gains, biases
            assert group["lr"] == 1e-2 and group.get("lr_scale", 1.0) == 1.0
            assert group["weight_decay"] in (0.1, 0.0)
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert c_fc.std().item() == pytest.approx(0.02 / m ** 0.5, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: only the logits carry the 1/m


def test_mup_hidden_matrices_decay_by_the_same_fraction_at_every_width():
    """AdamW's decoupled decay shrinks a weight by lr * weight_decay per step; muP divides the hidden lr by m, so its
    weight decay is multiplied by m (as microsoft/mup's MuAdamW does). Before, the decay per step fell as 1/m."""
    shrink = {}
    for width in (64, 128, 256):
        model = _gpt(width, "mup")
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1), "cpu", False)
        c_fc = model.transformer.h[0].mlp.c_fc.weight
        before = c_fc.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # no gradient: Adam's update is 0, only the decay moves the weights
        optimizer.step()
        shrink[width] = (c_fc.detach() / before).mean().item()
    assert shrink[64] == pytest.approx(1 - 1e-2 * 0.1, abs=1e-6)
    assert shrink[128] == pytest.approx(shrink[64], abs=1e-6) and shrink[256] == pytest.approx(shrink[64], abs=1e-6)


def test_mup_through_the_trainer_scales_the_hidden_lr(cache_dir):
    trainer = make_trainer(cache_dir, "model.parametrization=mup", "model.n_embd=96", "model.mup_base_width=24",
                           "train.max_steps=2", "device.compile=false", "optim.lr=1e-3", "optim.warmup_steps=0",
                           "model.mup_embed_lr_mult=2", "model.mup_output_mult=0.5")
    assert trainer.model.config.width_mult == 4.0
    assert (trainer.model.config.mup_embed_lr_mult, trainer.model.config.mup_output_mult) == (2.0, 0.5)
    tracker = Collect()
    assert trainer.fit(tracker) == "completed"
    hidden, embeddings, gains = (g["lr"] for g in trainer.optimizer.param_groups)
    assert (hidden, embeddings) == (pytest.approx(gains / 4), pytest.approx(gains * 2))


def test_a_bad_parametrization_is_one_error():
    with pytest.raises(ConfigError, match="model.parametrization=mp is invalid: use sp, mup or completep"):
        compose_config("model.parametrization=mp")


def test_coord_check_is_flat_under_mup_and_grows_under_sp(tmp_path, cache_dir, capsys):
    out = tmp_path / "cc"
    assert coord_check.main(["--widths", "32,64,128", "--steps", "3", "--cache-dir", str(cache_dir),
                             "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"coord_check.csv", "coord_check.json", "coord_check.png"}
    rows = json.loads((out / "coord_check.json").read_text())
    assert len(rows) == 2 * 3 * 3 * 4  # parametrizations x widths x steps x layers
    logits = {(r["parametrization"], r["width"]): r["mean_abs"] for r in rows
              if r["layer"] == "logits" and r["step"] == 3}
    mup = [logits["mup", w] for w in (32, 64, 128)]
    sp = [logits["sp", w] for w in (32, 64, 128)]
    assert max(mup) / min(mup) < 1.5  # measured: ~1.2
    assert sp[2] / sp[0] > 2.5  # measured: ~3.6 (4x the width)
    assert "mup: logits mean |a| at step 3" in capsys.readouterr().out


def test_coord_check_bad_widths_is_one_line(tmp_path, capsys):
    assert coord_check.main(["--widths", "64,abc", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --widths=64,abc is invalid: give comma-separated multiples of 4, e.g. 64,128,256"]


def test_the_mup_transfer_experiment_sweeps_existing_keys_and_validates():
    with initialize_config_module("gpt_exp.conf", version_base="1.3"):
        params = compose("config", overrides=["+experiment=mup_transfer"], return_hydra_config=True).hydra.sweeper.params
    assert set(params) == {"model.parametrization", "model.n_embd", "optim.lr", "train.seed"}
    assert set(params) <= set(schema_keys())
    assert params["model.parametrization"] == "sp,mup" and params["model.n_embd"] == "64,128,256"
    cfg = compose_config("+experiment=mup_transfer", "model.parametrization=mup", "model.n_embd=256")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.mup_base_width, cfg.T, cfg.train.max_steps) == (2, 4, 64, 64,
                                                                                                           300)


def test_a_mup_run_leaves_no_gpt2_dir_sample_reads_its_checkpoint_and_export_refuses_it(tmp_path, cache_dir):
    from tests.helpers import run_cli

    result = run_cli("run", "model=tiny", "model.parametrization=mup", "model.mup_base_width=8", "train.max_steps=2",
                     "train.ckpt_every=2", "logger.mode=disabled", f"data.cache_dir={cache_dir}",
                     f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "r" / "model").exists()  # a GPT-2 dir would silently drop muP's scales
    sample = run_cli("sample", f"resume={tmp_path / 'r'}", "max_new_tokens=2", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr  # the checkpoint's config carries muP's scales
    export = run_cli("export", str(tmp_path / "r"), str(tmp_path / "hf"), cwd=tmp_path)
    assert export.returncode == 2 and "model.parametrization=mup model: export reads GPT-2 (sp)" in export.stderr


def test_a_mup_checkpoint_from_before_the_multipliers_resumes(tmp_path, cache_dir):
    """A checkpoint whose config has no mup_*_mult keys (and no recorded overrides: its config is read as saved)."""
    from tests.helpers import run_cli

    common = ["model=tiny", "model.parametrization=mup", "model.mup_base_width=8", "logger.mode=disabled",
              f"data.cache_dir={cache_dir}", "train.save_model=none"]
    first = run_cli("run", *common, "train.max_steps=2", "train.ckpt_every=2", f"hydra.run.dir={tmp_path / 'r'}",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (ckpt,) = (tmp_path / "r" / "checkpoints").glob("*.pt")
    state = torch.load(ckpt, weights_only=True)
    for key in ("mup_output_mult", "mup_attn_mult", "mup_embed_lr_mult"):
        del state["config"]["model"][key]
    state.pop("overrides", None)
    torch.save(state, tmp_path / "old.pt")  # outside its run dir: no .hydra/overrides.yaml to read either
    resumed = run_cli("run", f"resume={tmp_path / 'old.pt'}", "train.max_steps=3", "logger.mode=disabled",
                      f"data.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'r2'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [row["step"] for row in read_metrics(tmp_path / "r2")] == [2]  # the third step (from 0), after the two
