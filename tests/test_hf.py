"""Hugging Face GPT-2 dirs: ours loads theirs with their logits (safetensors and the original .bin layout),
transformers loads our export (model, tokenizer, text-generation pipeline) with our logits, tokens and greedy
text, a round trip keeps every tensor, and bad dirs are one line."""

import dataclasses
import json
import shutil
from importlib import resources

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

from gpt_exp.checkpoint import load_model
from gpt_exp.errors import ConfigError
from gpt_exp.export import export
from gpt_exp.generation import generate
from gpt_exp.hf import load_hf_gpt2, read_safetensors, save_hf_gpt2, write_safetensors
from gpt_exp.model import GPT, GPTConfig, fit_padding
from gpt_exp.tokenizer import encode_text, gpt2_encoding
from tests.helpers import only_run_dir, run_cli

SHAPE = dict(n_layer=2, n_head=2, n_embd=24, n_positions=64, vocab_size=50257)
EXPORT_FILES = ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
                "tokenizer_config.json", "vocab.json"]
IDX = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh models have zero biases and unit layernorms; noise on every weight lets no wrong mapping hide."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    return perturb_(GPT2LMHeadModel(GPT2Config(**SHAPE)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_model):
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf_model.save_pretrained(path)
    return path


def max_diff(ours: GPT, theirs: GPT2LMHeadModel) -> float:
    with torch.no_grad():
        return (ours(IDX)[0] - theirs(IDX).logits).abs().max().item()


def test_safetensors_dir_gives_the_transformers_logits(hf_dir, hf_model):
    ours = load_hf_gpt2(hf_dir).eval()
    assert ours.config == GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=24)
    assert max_diff(ours, hf_model) < 1e-4
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_pytorch_bin_in_the_original_openai_layout(tmp_path, hf_dir, hf_model):
    # the gpt2 files on the Hub: no `transformer.` prefix, causal-mask buffers, no lm_head, pytorch_model.bin
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(SHAPE["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(hf_dir / "config.json", tmp_path)
    assert max_diff(load_hf_gpt2(tmp_path).eval(), hf_model) < 1e-4


def test_half_precision_weights_load_as_fp32(tmp_path, hf_dir, hf_model):
    save_file({k: v.half() for k, v in load_file(hf_dir / "model.safetensors").items()}, tmp_path / "model.safetensors")
    shutil.copy(hf_dir / "config.json", tmp_path)
    ours = load_hf_gpt2(tmp_path)
    assert ours.transformer.wte.weight.dtype == torch.float32
    assert 0 < max_diff(ours.eval(), hf_model) < 5e-2  # fp16 rounding, nothing worse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_safetensors_reader_and_writer_agree_with_the_reference(tmp_path, dtype):
    tensors = {"a": (torch.randn(3, 5) * 10).to(dtype), "b.c": torch.arange(7).to(dtype),
               "scalar": torch.tensor(2).to(dtype)}
    write_safetensors(tensors, tmp_path / "ours.safetensors")
    theirs = load_file(tmp_path / "ours.safetensors")
    save_file(tensors, tmp_path / "ref.safetensors")
    ours = read_safetensors(tmp_path / "ref.safetensors")
    for got in (theirs, ours):
        assert got.keys() == tensors.keys()
        assert all(got[k].dtype == dtype and torch.equal(got[k], tensors[k]) for k in tensors)
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses a file without it


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[GPT, object]:
    """A perturbed GPT of our own (block_size 48) and the dir save_hf_gpt2 wrote for it."""
    torch.manual_seed(0)
    ours = perturb_(GPT(GPTConfig(block_size=48, vocab_size=50257, n_layer=3, n_head=4, n_embd=32)))
    return ours, save_hf_gpt2(ours, tmp_path_factory.mktemp("export") / "out")


def test_export_loads_in_transformers_with_our_logits(exported):
    ours, out = exported
    theirs = GPT2LMHeadModel.from_pretrained(out).eval()
    c = theirs.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions) == (3, 4, 32, 48)
    assert c.activation_function == "gelu_new" and c.eos_token_id == 50256
    assert max_diff(ours, theirs) < 1e-4


def test_export_carries_the_gpt2_tokenizer_files(exported):
    ours, out = exported
    assert sorted(p.name for p in out.iterdir()) == EXPORT_FILES
    assets = resources.files("gpt_exp") / "assets"
    assert (out / "vocab.json").read_bytes() == (assets / "encoder.json").read_bytes()
    assert (out / "merges.txt").read_bytes() == (assets / "vocab.bpe").read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 48, "bos_token": "<|endoftext|>",
                      "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 50256, "eos_token_id": 50256}


def test_autotokenizer_of_an_export_encodes_as_ours(exported):
    tokenizer = AutoTokenizer.from_pretrained(exported[1])
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    text = "ROMEO:\n  Is it   'tis? 1,234.5 café<|endoftext|>Next"
    assert tokenizer(text)["input_ids"] == encode_text(text)
    assert (len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id) == (50257, 50256, 50256)
    assert tokenizer.model_max_length == 48
    assert tokenizer.decode(encode_text(text)) == text


def test_text_generation_pipeline_of_an_export_writes_our_greedy_text(exported):
    ours, out = exported
    generated = pipeline("text-generation", model=str(out))("ROMEO:", max_new_tokens=5, do_sample=False)
    prompt = encode_text("ROMEO:")
    greedy = generate(ours, torch.tensor([prompt]), 5, top_k=1)[0].tolist()
    assert len(greedy) == len(prompt) + 5 and 50256 not in greedy  # HF would stop at the end-of-text token
    assert generated == [{"generated_text": gpt2_encoding().decode(greedy)}]
    assert len(generated[0]["generated_text"]) > len("ROMEO:")


def test_round_trip_keeps_every_tensor(tmp_path, hf_dir):
    save_hf_gpt2(load_hf_gpt2(hf_dir), tmp_path)
    before, after = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys() and len(after) == 4 + 12 * SHAPE["n_layer"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_export_cli_of_a_run(tmp_path, cache_dir):
    result = run_cli("run", "model=tiny", "train.max_steps=3", "train.ckpt_every=3", "logger.mode=disabled",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    result = run_cli("export", str(run_dir), "hf_out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"exported model tiny (1.23M params, step 3) from {run_dir / 'model'}" in result.stdout  # its weights
    ours, info = load_model(str(run_dir))
    assert info["step"] == 3 and info["name"] == "tiny"
    assert max_diff(ours, GPT2LMHeadModel.from_pretrained(tmp_path / "hf_out").eval()) < 1e-4
    assert sorted(p.name for p in (tmp_path / "hf_out").iterdir()) == EXPORT_FILES
    assert "(model.safetensors, config.json, the GPT-2 tokenizer)" in result.stdout
    assert AutoTokenizer.from_pretrained(tmp_path / "hf_out").model_max_length == ours.config.block_size


def write_config(path, **changes):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", **SHAPE, **changes}))
    return path


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p.mkdir() or p, "has no config.json"),
    (lambda p: write_config(p), "has config.json but no weights"),
    (lambda p: write_config(p, model_type="llama"), "model_type=llama model, not GPT-2"),
    (lambda p: write_config(p, activation_function="relu"), "sets activation_function=relu"),
    (lambda p: (write_config(p) / "model.safetensors").write_bytes(b"\xff" * 20) and p, "not a readable safetensors"),
])
def test_bad_dirs_are_one_line(tmp_path, setup, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_hf_gpt2(setup(tmp_path / "d"))
    assert "\n" not in str(e.value)


def test_weights_of_another_shape_are_one_line(tmp_path, hf_dir):
    shutil.copy(hf_dir / "model.safetensors", write_config(tmp_path, n_embd=32))
    with pytest.raises(ConfigError, match="do not match its config.json .*of another shape"):
        load_hf_gpt2(tmp_path)


def test_export_cli_errors_are_one_line(tmp_path):
    result = run_cli("export", "no/such/run", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: no/such/run does not exist; give a run dir (outputs/<date>/<time>) "
                                     "or a checkpoint file")


def test_hf_import_into_a_padded_model_gives_the_same_logits(hf_dir, hf_model):
    plain, padded = load_hf_gpt2(hf_dir).eval(), load_hf_gpt2(hf_dir, pad_vocab=True).eval()
    assert padded.config == GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=24,
                                      padded_vocab_size=50304)
    wte = padded.transformer.wte.weight
    assert wte is padded.lm_head.weight and wte.shape == (50304, 24)
    assert torch.equal(wte[:50257], plain.transformer.wte.weight) and not wte[50257:].any()
    with torch.no_grad():
        assert torch.equal(padded(IDX)[0], plain(IDX)[0])
    assert max_diff(padded, hf_model) < 1e-4


def test_export_of_a_padded_model_is_the_unpadded_export(exported, tmp_path):
    """The padding is stripped: the same files byte for byte, GPT-2's vocab_size, and transformers' logits."""
    ours, out = exported
    padded = GPT(dataclasses.replace(ours.config, padded_vocab_size=50304)).eval()
    padded.load_state_dict(fit_padding(ours.state_dict(), padded.config))
    assert padded.transformer.wte.weight.shape == (50304, 32)
    padded_out = save_hf_gpt2(padded, tmp_path / "padded")
    assert sorted(p.name for p in padded_out.iterdir()) == EXPORT_FILES
    assert all((padded_out / name).read_bytes() == (out / name).read_bytes() for name in EXPORT_FILES)
    assert json.loads((padded_out / "config.json").read_text())["vocab_size"] == 50257
    assert load_file(padded_out / "model.safetensors")["transformer.wte.weight"].shape == (50257, 32)
    assert max_diff(padded, GPT2LMHeadModel.from_pretrained(padded_out).eval()) < 1e-4


def test_export_of_a_padded_checkpoint(tmp_path, exported):
    """python -m gpt_exp.export of a padded model's checkpoint writes what the unpadded model's export holds."""
    ours, out = exported
    c = ours.config
    padded = GPT(dataclasses.replace(c, padded_vocab_size=50304))
    padded.load_state_dict(fit_padding(ours.state_dict(), padded.config))
    model_config = {"name": "small", "block_size": c.block_size, "vocab_size": 50257, "n_layer": c.n_layer,
                    "n_head": c.n_head, "n_embd": c.n_embd, "pad_vocab": "true"}
    torch.save({"step": 7, "model": padded.state_dict(), "config": {"model": model_config}}, tmp_path / "step.pt")
    written, info = export(str(tmp_path / "step.pt"), str(tmp_path / "hf"))
    assert info["step"] == 7 and info["params"] == ours.num_params()
    assert all((written / name).read_bytes() == (out / name).read_bytes() for name in EXPORT_FILES
               if name != "config.json")
    config = json.loads((written / "config.json").read_text())
    assert config.pop("gpt_exp_step") == 7 and config == json.loads((out / "config.json").read_text())
