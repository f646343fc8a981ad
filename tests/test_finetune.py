"""Fine-tuning: init_from= loads weights only (a fresh optimizer, step 0) from a Hugging Face GPT-2 dir of any size
(its shape adopted), a run dir or a checkpoint."""

import json

import pytest
import torch
from torch.nn import functional as F

from gpt_exp.config import DataConfig, DataSource
from gpt_exp.data.cache import prepare_tokens
from gpt_exp.data.loader import BatchLoader
from gpt_exp.hf import load_hf_gpt2
from tests.helpers import only_run_dir, read_metrics, run_cli

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random small GPT-2 saved by transformers itself (not by our exporter)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=50257)
    out = tmp_path_factory.mktemp("hf") / "small-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    return out


def first_batch(cache_dir, B=4, T=32):
    tokens = prepare_tokens(DataConfig(source=DataSource.shakespeare, cache_dir=str(cache_dir))).load()
    return BatchLoader(tokens, B, T).next_batch()


def test_init_from_hf_adopts_its_shape_and_starts_at_its_loss(hf_dir, tmp_path, cache_dir):
    x, y = first_batch(cache_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        expected = F.cross_entropy(hf(x).logits.reshape(-1, 50257), y.reshape(-1)).item()
    result = run_cli("run", f"init_from=hf:{hf_dir}", "train.max_steps=3", "optim.warmup_steps=1",
                     "logger.mode=disabled", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    rows = read_metrics(run_dir)
    assert rows[0]["loss"] == pytest.approx(expected, abs=1e-4)  # the HF model's loss on the same batch, at step 0
    assert [r["step"] for r in rows] == [0, 1, 2]
    log = (run_dir / "run.log").read_text()
    assert f"initialized from hf:{hf_dir}" in log and "model small-gpt2: " in log  # its shape, not gpt2 124M's
    exported = json.loads((run_dir / "model" / "config.json").read_text())
    assert (exported["n_embd"], exported["n_layer"], exported["n_positions"]) == (32, 2, 64)


def test_init_from_hf_refuses_a_contradicting_model_setting(hf_dir, tmp_path, cache_dir):
    result = run_cli("run", f"init_from=hf:{hf_dir}", "model.n_embd=48", "train.max_steps=1", "logger.mode=disabled",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: model.n_embd=48 contradicts init_from=hf:{hf_dir} (n_embd=32); "
                                     f"drop the model override to take the shape of the weights")


def test_init_from_a_run_dir_takes_its_weights_not_its_optimizer_or_step(hf_dir, tmp_path, cache_dir):
    common = ["model=tiny", "logger.mode=disabled", f"data.cache_dir={cache_dir}", "optim.warmup_steps=1"]
    assert run_cli("run", *common, "train.max_steps=4", f"hydra.run.dir={tmp_path / 'src'}", cwd=tmp_path).returncode == 0
    x, y = first_batch(cache_dir)
    source = load_hf_gpt2(tmp_path / "src" / "model")
    with torch.no_grad():
        expected = source(x, y)[1].item()
    result = run_cli("run", *common, "train.max_steps=2", f"init_from={tmp_path / 'src'}",
                     f"hydra.run.dir={tmp_path / 'ft'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_metrics(tmp_path / "ft")
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["lr"] == pytest.approx(6e-4)  # step 0, warmup anew
    assert rows[0]["loss"] == pytest.approx(expected, abs=1e-5)
    bad = run_cli("run", "model=tiny", "model.n_layer=3", "logger.mode=disabled", f"data.cache_dir={cache_dir}",
                  "train.max_steps=1", f"init_from={tmp_path / 'src'}", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith(f"error: init_from={tmp_path / 'src'} has another shape")
