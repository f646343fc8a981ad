import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from gpt_exp.config import DataSource, RunConfig, register_schema, schema_keys, unknown_key, validate
from gpt_exp.errors import ConfigError
from tests.helpers import run_cli

register_schema()


def compose_cfg(*overrides: str) -> RunConfig:
    with initialize_config_module("gpt_exp.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def test_defaults_are_the_lectures():
    cfg = compose_cfg()
    assert (cfg.B, cfg.T) == (4, 32)
    assert cfg.data.source == DataSource.shakespeare and cfg.data.val_fraction == 0.0
    assert (cfg.model.name, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == ("gpt2", 12, 12, 768)
    assert (cfg.train.max_steps, cfg.train.grad_clip, cfg.train.total_batch_size) == (50, 1.0, None)
    o = cfg.optim
    assert (o.lr, o.min_lr_ratio, o.warmup_steps, o.weight_decay, o.betas, o.eps) == (6e-4, 0.1, 10, 0.1, [0.9, 0.95], 1e-8)
    assert cfg.logger.mode.value == "auto"
    validate(cfg)


@pytest.mark.parametrize(
    "name, layers, heads, embd",
    [("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280), ("gpt2-xl", 48, 25, 1600), ("tiny", 2, 2, 24)],
)
def test_model_sizes(name, layers, heads, embd):
    m = compose_cfg(f"model={name}").model
    assert (m.name, m.n_layer, m.n_head, m.n_embd) == (name, layers, heads, embd)


def test_batch_presets_set_top_level_keys():
    cfg = compose_cfg("batch=gpt2")
    assert (cfg.B, cfg.T, cfg.train.total_batch_size) == (64, 1024, 524_288)
    assert cfg.train.total_batch_size // (cfg.B * cfg.T) == 8  # gradient accumulation steps on one GPU
    assert (compose_cfg("batch=gpt2", "B=16").B, compose_cfg("B=8", "T=64").T) == (16, 64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["T=2048"], "T=2048 is invalid: it exceeds model.block_size=1024; use T<=1024"),
        (["B=0"], "B=0 is invalid"),
        (["optim.lr=0"], "optim.lr=0.0 is invalid"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2.0 is invalid"),
        (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5] is invalid"),
        (["train.total_batch_size=1000"], "multiple of B*T=128"),
        (["data=text"], "data=text needs data.path"),
        (["model.n_head=5"], "divisible by model.n_head=5"),
        (["data.val_fraction=1.0"], "data.val_fraction=1.0 is invalid"),
        (["model.vocab_size=50000"], "model.vocab_size=50000 is invalid: the gpt2 tokenizer has 50257 tokens"),
        (["train.seed=-1"], "train.seed=-1 is invalid: it must be in [0, 2**32)"),
        (["data.shuffle_seed=4294967296"], "data.shuffle_seed=4294967296 is invalid"),
        (["optim.eps=inf"], "optim.eps=inf is invalid"),
        (["train.grad_clip=inf"], "train.grad_clip=inf is invalid"),
        (["data.path=corpus.txt"], "data.path=corpus.txt is invalid: data=shakespeare reads no path; add data=text"),
        (["+train.max_step=5"], "unknown config key 'train.max_step'; did you mean train.max_steps?"),
    ],
)
def test_semantic_checks(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*overrides))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.seed=0"], ["train.seed=4294967295"], ["data.shuffle_seed=4294967295"], ["data.shuffle_seed=null"],
        ["model.vocab_size=50257"], ["model.vocab_size=50304"], ["optim.eps=1.2e-38"], ["optim.betas=[0,0.999]"],
        ["train.grad_clip=0"], ["optim.weight_decay=0"], ["data.val_fraction=0.999"],
        ["data=text", "data.path=corpus.txt"], ["data=fineweb_edu", "data.path=/data/fineweb"],
        ["+note=baseline"], ["+experiment=tiny_smoke"],  # a new top-level key is the user's; a group adds none
    ],
)
def test_edges_that_pass(overrides):
    validate(compose_cfg(*overrides))


def test_unknown_key_names_the_key_meant():
    keys = schema_keys()
    assert {"B", "T", "train.seed", "optim.lr", "data.shuffle_seed"} <= set(keys) and "train" not in keys
    assert unknown_key("train.max_step") == "unknown config key 'train.max_step'; did you mean train.max_steps?"
    assert unknown_key("optim.seed") == "unknown config key 'optim.seed'; did you mean train.seed?"  # the same name
    assert unknown_key("qqq") == "unknown config key 'qqq'; check the spelling; `python -m gpt_exp.run --cfg job` lists every key"


def test_help_and_cfg_job(tmp_path):
    helped = run_cli("run", "--help", cwd=tmp_path)
    assert helped.returncode == 0
    assert "model: gpt2, gpt2-large, gpt2-medium, gpt2-xl, modern, modern_tiny, tiny" in helped.stdout
    assert "data: fineweb_edu, mix, shakespeare, text" in helped.stdout and "device: auto, cpu, cuda" in helped.stdout
    shown = run_cli("run", "--cfg", "job", "B=8", "model=tiny", cwd=tmp_path)
    cfg = OmegaConf.create(shown.stdout)
    assert (cfg.B, cfg.T, cfg.model.n_embd, cfg.optim.lr) == (8, 32, 24, 6e-4)
    assert not (tmp_path / "outputs").exists()  # showing the config creates no run dir
