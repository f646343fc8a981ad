"""model.parametrization=completep (Dey et al. 2025, as EleutherAI's nanoGPT-mup completep branch does it): muP's width
rules plus a residual multiplier (depth_base / n_layer)^alpha, depth-scaled lrs and Adam eps; sp and mup unchanged."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from gpt_exp import coord_check
from gpt_exp.checkpoint import load_model
from gpt_exp.config import ConfigError
from gpt_exp.model import GPT, GPTConfig
from tests.helpers import Collect, cli_env, compose_config, make_trainer, read_metrics, run_cli

# the first 3 losses of `model=tiny model.parametrization=mup model.mup_base_width=8 train.max_steps=3` (and of
# model=modern_tiny) before completep existed (this file's first commit's parent): mup must keep giving them
MUP_LOSSES = {"tiny": [10.821496963500977, 10.8273286819458, 10.819765090942383],
              "modern_tiny": [10.827472686767578, 10.827666282653809, 10.829221725463867]}
ARCHS = [dict(), dict(pos="rope", norm="rmsnorm", norm_gain=False, qk_norm=True, mlp="relu2", bias=False,
                      tie_embeddings=False, logit_softcap=15.0, value_embeddings=True, zero_init_proj=True),
         dict(mlp="swiglu", n_kv_head=1, qk_norm=True, value_embeddings=True)]


def _gpt(n_layer: int, parametrization: str = "completep", seed: int = 0, width: int = 32, **settings) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=96, n_layer=n_layer, n_head=2, n_embd=width,
                         parametrization=parametrization, mup_base_width=16, **settings))


def _groups(model: GPT, lr: float = 1e-2, wd: float = 0.1, eps: float = 1e-8) -> list[tuple]:
    opt = model.configure_optimizer(lr, wd, (0.9, 0.95), eps, "cpu")
    return [(g["lr"], g["weight_decay"], g["eps"]) for g in opt.param_groups]


@pytest.mark.parametrize("name", ["tiny", "modern_tiny"])
def test_mup_trains_as_before_completep(cache_dir, name):
    trainer = make_trainer(cache_dir, f"model={name}", "model.parametrization=mup", "model.mup_base_width=8",
                           "train.max_steps=3", "device.compile=false")
    tracker = Collect()
    assert trainer.fit(tracker) == "completed"
    # bit for bit on the machine that recorded them; on another CPU (oneDNN picks other kernels on AMD and Intel) a
    # loss may move by a float32 ulp (9.5e-7 at 10.8), so two ulps are allowed (an output multiplier of 1.05 moves
    # them by 1.6e-4, an embedding lr x 1.1 by 4.8e-5)
    assert tracker.losses == pytest.approx(MUP_LOSSES[name], rel=0, abs=2e-6)


@pytest.mark.parametrize("alpha, mult", [(1.0, 0.25), (0.5, 0.5)])
def test_each_residual_branch_is_multiplied_by_base_over_depth_to_the_alpha(alpha, mult):
    model = _gpt(8, depth_base=2, depth_alpha=alpha)
    assert model.config.depth_mult == 4.0 and model.config.residual_mult == pytest.approx(mult)
    block, x = model.transformer.h[3], torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    h = x + mult * block.attn(block.ln_1(x))
    torch.testing.assert_close(block(x), h + mult * block.mlp(block.ln_2(h)), rtol=0, atol=1e-6)
    for parametrization in ("sp", "mup"):  # no multiplier at any depth
        assert _gpt(8, parametrization).config.residual_mult == 1.0


def test_the_lrs_eps_and_weight_decay_of_depth_8_against_depth_2():
    """Width m = 32/16 = 2, L_m = 8/2 = 4. Groups: hidden matrices, embeddings, in-block gates, in-block vectors,
    final norm. alpha = 1: the hidden lr is mup's lr/m at every depth, eps is eps/m/L_m. alpha = 0.5: the blocks' lrs
    times L_m^-0.5 = 1/2 at depth 8, eps/m/L_m^0.5."""
    lr, wd, eps = 1e-2, 0.1, 1e-8
    for alpha, depth_scale, eps_8 in ((1.0, 1.0, eps / 2 / 4), (0.5, 0.5, eps / 2 / 2)):
        want_8 = [(lr / 2 * depth_scale, wd * 2), (lr, wd), (lr * depth_scale, wd), (lr * depth_scale, 0.0),
                  (lr, 0.0)]
        got_8 = _groups(_gpt(8, depth_alpha=alpha, value_embeddings=True), lr, wd, eps)
        assert [g[:2] for g in got_8] == [pytest.approx(w) for w in want_8]
        assert [g[2] for g in got_8] == [pytest.approx(eps_8)] * 5
        got_2 = _groups(_gpt(2, depth_alpha=alpha, value_embeddings=True), lr, wd, eps)  # L_m = 1: no depth scale
        assert [g[:2] for g in got_2] == [pytest.approx(w) for w in [(lr / 2, wd * 2), (lr, wd), (lr, wd),
                                                                      (lr, 0.0), (lr, 0.0)]]
        assert [g[2] for g in got_2] == [pytest.approx(eps / 2)] * 5


@pytest.mark.parametrize("arch", ARCHS, ids=["gpt2", "modern", "swiglu-gqa"])
def test_every_tensor_is_in_one_group_and_the_right_one(arch):
    model = _gpt(4, depth_alpha=0.5, **arch)
    opt = model.configure_optimizer(1e-2, 0.1, (0.9, 0.95), 1e-8, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    assert sorted(n for g in grouped for n in g) == sorted(names.values())  # each once
    hidden, embeddings, gates, block_vectors, final = grouped
    assert len(hidden) == 4 * 4 and {n.split(".")[-2] for n in hidden} == {"c_attn", "c_proj", "c_fc"}
    assert {n.split(".")[1] for n in embeddings} <= {"wte", "wpe", "ve", "weight"}  # lm_head.weight when untied
    assert all(".ve_gate." in n for n in gates) and len(gates) == (2 if arch.get("value_embeddings") else 0)
    assert all(n.startswith("transformer.h.") and model.get_parameter(n).dim() == 1 for n in block_vectors)
    assert all(n.startswith("transformer.ln_f.") for n in final)


def test_the_residual_projections_start_without_gpt2s_depth_factor():
    """completep draws c_proj with the hidden std 0.02/sqrt(m) at every depth (nanoGPT-mup's completep init): at the
    base depth it is mup's model but for c_proj, which mup draws with GPT-2's extra 1/sqrt(2 n_layer)."""
    completep, mup = _gpt(2), _gpt(2, "mup")
    for (name, a), (_, b) in zip(completep.named_parameters(), mup.named_parameters()):
        if name.endswith("c_proj.weight"):
            torch.testing.assert_close(a, b * math.sqrt(2 * 2))  # the same draws, scaled
        else:
            assert torch.equal(a, b), name
    deep = _gpt(16, width=256)
    stds = [block.mlp.c_proj.weight.std().item() for block in deep.transformer.h]
    assert 0.9 * 0.02 / 4 < min(stds) and max(stds) < 1.1 * 0.02 / 4  # m = 16: 0.02/sqrt(16), no depth factor


@pytest.mark.parametrize("overrides, line", [
    (["model.parametrization=completep", "model.depth_base=0"],
     "model.depth_base=0 is invalid: it must be >= 1, e.g. 2"),
    (["model.parametrization=completep", "model.depth_alpha=0.25"], "model.depth_alpha=0.25 is invalid: it must be in "
                                                                    "[0.5, 1]: 1 for CompleteP, 0.5 for depth-muP"),
    (["model.parametrization=mup", "model.depth_base=4"], "model.depth_base=4 is invalid: it scales CompleteP's model: "
                                                          "set model.parametrization=completep, or leave it at 2"),
])
def test_a_bad_depth_setting_is_one_error(overrides, line):
    with pytest.raises(ConfigError) as e:
        compose_config(*overrides)
    assert str(e.value) == line


def test_completep_with_muon_is_one_line_from_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt_exp.run", "model=tiny", "optim=muon",
                             "model.parametrization=completep", "logger.mode=disabled"], cwd=tmp_path,
                            env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: model.parametrization=completep is invalid: muP's per-width AdamW lrs are not defined for optim=muon "
        "(Muon scales its updates by shape itself): use optim=adamw with completep, or sp with muon")


def test_a_completep_run_resumes_bitwise_keeps_its_depth_settings_and_samples(tmp_path, cache_dir):
    common = ["model=tiny", "model.n_layer=4", "model.parametrization=completep", "model.mup_base_width=8",
              "model.depth_base=1", "model.depth_alpha=0.5", "logger.mode=disabled", f"data.cache_dir={cache_dir}",
              "optim.warmup_steps=1"]
    straight = run_cli("run", *common, "train.max_steps=4", f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    first = run_cli("run", *common, "train.max_steps=4", "train.ckpt_every=2", f"hydra.run.dir={tmp_path / 'r'}",
                    cwd=tmp_path)
    assert straight.returncode == 0 and first.returncode == 0, straight.stderr + first.stderr
    ckpt = tmp_path / "r" / "checkpoints" / "step_0000002.pt"
    resumed = run_cli("run", f"resume={ckpt}", *common, "train.max_steps=4", f"hydra.run.dir={tmp_path / 'r2'}",
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    straight_rows, resumed_rows = read_metrics(tmp_path / "s"), read_metrics(tmp_path / "r2")  # r2: r's rows, then its
    assert [(r["loss"], r["grad_norm"]) for r in resumed_rows] == [(r["loss"], r["grad_norm"]) for r in straight_rows]
    assert len(straight_rows) == 4  # steps 2 and 3 trained after the resume, bit for bit
    assert "depth_base: 1" in (tmp_path / "r" / ".hydra" / "config.yaml").read_text()
    other = run_cli("run", f"resume={ckpt}", *common, "model.depth_alpha=1.0", "train.max_steps=4", cwd=tmp_path)
    assert other.returncode == 2 and "model.depth_alpha: 0.5 -> 1.0" in other.stderr
    # sample and eval read the checkpoint as trained: its residual multiplier (4^-0.5) comes from its config
    model, _ = load_model(str(tmp_path / "r"))
    assert model.config.residual_mult == 0.5 and model.config.width_mult == 3.0
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_0000004.pt", weights_only=True)
    trained = GPT(GPTConfig.from_model_config(compose_config(*common[:-3]).model, "cpu"))
    trained.load_state_dict(state["model"])
    idx = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(idx)[0], trained.eval()(idx)[0])
    sample = run_cli("sample", f"resume={tmp_path / 'r'}", "max_new_tokens=2", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    export = run_cli("export", str(tmp_path / "r"), str(tmp_path / "hf"), cwd=tmp_path)
    assert export.returncode == 2 and "model.parametrization=completep model: export reads GPT-2" in export.stderr


@pytest.mark.parametrize("arch", ["model=tiny", "model=modern_tiny"])
def test_completep_trains_every_architecture(cache_dir, arch):
    trainer = make_trainer(cache_dir, arch, "model.n_layer=4", "model.parametrization=completep",
                           "model.mup_base_width=8", "train.max_steps=8", "optim.lr=1e-2", "optim.warmup_steps=2",
                           "device.compile=false")
    tracker = Collect()
    assert trainer.fit(tracker) == "completed"
    assert tracker.losses[-1] < tracker.losses[0] - 0.05  # it learns


def test_the_depth_coord_check_is_flat_under_completep_and_grows_under_mup(tmp_path, cache_dir):
    tokens, setup = coord_check.load_tokens(str(cache_dir)), coord_check.Setup(B=4, T=32)
    rows = [r for par in ("mup", "completep") for r in coord_check.depth_rows([2, 16], 32, 4, par, tokens, setup)]
    assert len(rows) == 2 * 4 * (2 + 16)  # parametrizations x steps x blocks of each depth
    update = {par: coord_check.last_block(rows, "update_rms", par, 4) for par in ("mup", "completep")}
    # the last block's change since the init, depth 16 against depth 2 (8x the blocks, each adding its update)
    assert 0.5 < update["completep"][16] / update["completep"][2] < 2  # measured: 0.78
    assert update["mup"][16] / update["mup"][2] > 3  # measured: 5.7
    coord_check.write(rows, tmp_path, "coord_check_depth")
    assert {p.name for p in tmp_path.iterdir()} == {f"coord_check_depth.{ext}" for ext in ("csv", "json", "png")}


def test_the_depth_coord_check_refuses_bad_depths_in_one_line(tmp_path, capsys):
    assert coord_check.main(["--depths", "2,0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --depths=2,0 is invalid: give comma-separated depths >= 1, e.g. 2,4,8,16"]
