"""Sampling: the CLI prints num_samples texts that start with the prompt and are exactly what `generate` makes
from the same seed, from a run's checkpoint or its Hugging Face export; bad arguments are one line, exit 2."""

import dataclasses
import re

import pytest
import torch

from gpt_exp.checkpoint import load_model
from gpt_exp.generation import encode_prompt, generate
from gpt_exp.hf import save_hf_gpt2
from gpt_exp.model import GPT, GPTConfig, fit_padding
from gpt_exp import sample
from gpt_exp.sample import main
from gpt_exp.tokenizer import EOT_TOKEN, gpt2_encoding
from tests.helpers import only_run_dir, run_cli
from tests.test_model import force_padded_logits


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    cwd = tmp_path_factory.mktemp("sample_run")
    result = run_cli("run", "model=tiny", "train.max_steps=3", "train.ckpt_every=3", "logger.mode=disabled",
                     f"data.cache_dir={cache_dir}", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return only_run_dir(cwd)


def samples(stdout: str) -> list[str]:
    return [s.removesuffix("\n\n") for s in re.split(r"^--- sample \d+/\d+ ---\n", stdout, flags=re.M)[1:]]


def test_cli_prints_what_generate_makes(run_dir, tmp_path):
    result = run_cli("sample", f"resume={run_dir}", "prompt=ROMEO:", "max_new_tokens=12", "num_samples=2",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model tiny (1.23M params, step 3)" in result.stderr
    printed = samples(result.stdout)
    assert len(printed) == 2 and all(text.startswith("ROMEO:") for text in printed)

    model, _ = load_model(str(run_dir))
    enc = gpt2_encoding()
    prompt = enc.encode("ROMEO:")
    rows = generate(model, torch.tensor([prompt, prompt]), 12, top_k=50, temperature=1.0,
                    generator=torch.Generator().manual_seed(1337))
    assert rows.shape == (2, len(prompt) + 12)
    assert printed == [enc.decode(row) for row in rows.tolist()]
    assert printed[0] != printed[1]


def test_same_seed_same_text_and_hf_export_samples_alike(run_dir, tmp_path, capsys):
    model, _ = load_model(str(run_dir))
    save_hf_gpt2(model, tmp_path / "hf")
    texts = {}
    for source, seed in ((f"resume={run_dir}", 7), (f"resume={run_dir}", 7), (f"resume={run_dir}", 8),
                         (f"hf={tmp_path / 'hf'}", 7)):
        assert main([source, f"seed={seed}", "max_new_tokens=8", "num_samples=3", "prompt=To be"]) == 0
        texts.setdefault((source.split("=")[0], seed), []).append(samples(capsys.readouterr().out))
    assert texts[("resume", 7)][0] == texts[("resume", 7)][1] == texts[("hf", 7)][0]
    assert len(texts[("resume", 7)][0]) == 3 and texts[("resume", 8)][0] != texts[("resume", 7)][0]


def test_empty_prompt_starts_at_a_document_boundary(run_dir, capsys):
    assert main([f"resume={run_dir}", "prompt=", "max_new_tokens=5", "num_samples=1"]) == 0
    [text] = samples(capsys.readouterr().out)
    model, _ = load_model(str(run_dir))
    row = generate(model, torch.tensor([[EOT_TOKEN]]), 5, generator=torch.Generator().manual_seed(1337))[0]
    assert text == gpt2_encoding().decode(row[1:].tolist())  # the 5 new tokens, without <|endoftext|>


def test_endoftext_in_the_prompt_is_the_end_of_text_token(run_dir, capsys):
    # tiktoken's plain encode raises on this text; it means a document boundary, so it becomes token 50256
    enc = gpt2_encoding()
    prompt = "The end.<|endoftext|>A new"
    assert encode_prompt(prompt, 256) == enc.encode_ordinary("The end.") + [EOT_TOKEN] + enc.encode_ordinary("A new")
    assert main([f"resume={run_dir}", f"prompt={prompt}", "max_new_tokens=4", "num_samples=1"]) == 0
    [text] = samples(capsys.readouterr().out)
    model, _ = load_model(str(run_dir))
    row = generate(model, torch.tensor([encode_prompt(prompt, 256)]), 4, generator=torch.Generator().manual_seed(1337))
    assert text.startswith(prompt) and text == enc.decode(row[0].tolist())


def test_prompt_longer_than_the_block_is_refused(run_dir, capsys):
    assert encode_prompt(" ".join(["word"] * 256), 256) == [4775] + [1573] * 255  # exactly a block: accepted
    assert main([f"resume={run_dir}", "prompt=" + " ".join(["word"] * 257)]) == 2
    assert capsys.readouterr().err == ("error: prompt is 257 tokens, more than the model's block_size=256 that it "
                                       "can see; shorten the prompt\n")


def test_generate_crops_to_block_size_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 100, (2, 6))
    out = generate(model, idx, max_new_tokens=10, top_k=1)
    assert out.shape == (2, 16) and torch.equal(out[:, :6], idx)
    greedy = idx
    for _ in range(10):
        logits, _ = model(greedy[:, -8:])
        greedy = torch.cat((greedy, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, greedy)


def test_top_k_limits_the_choice():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.zeros((200, 1), dtype=torch.long)
    with torch.no_grad():
        allowed = set(model(idx[:1])[0][0, -1].topk(3).indices.tolist())
    drawn = generate(model, idx, 1, top_k=3, generator=torch.Generator().manual_seed(0))[:, 1]
    assert set(drawn.tolist()) == allowed  # 200 draws see all three, and nothing else


@pytest.mark.parametrize("args, message", [
    (["resume=no/such/run"], "error: resume=no/such/run does not exist; give a run dir"),
    (["hf=no/such/dir"], "error: no/such/dir does not exist; give a Hugging Face GPT-2 dir"),
    (["resume=x", "tempreature=0.5"], "error: unknown key 'tempreature'; did you mean temperature?"),
    ([], "error: name one model: resume=RUN_DIR"),
    (["resume="], "error: name one model: resume=RUN_DIR"),
    (["resume=x", "hf=y"], "error: name one model: resume=RUN_DIR"),
])
def test_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    result = run_cli("sample", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("arg, message", [
    ("top_k=many", "top_k=many is invalid: it must be an integer"),
    ("temperature=0", "temperature=0.0 is invalid: it must be > 0"),
    ("temperature=inf", "temperature=inf is invalid: it must be > 0 and finite"),
    ("device=tpu", "device=tpu is invalid: it must be one of auto, cpu, cuda, mps"),
    ("prompt", "cannot parse 'prompt'; write key=value"),
    (f"seed={2**64}", f"seed={2**64} is invalid: it must fit in 64 bits, e.g. 0 to {2**64 - 1}"),
    (f"seed={-2**63 - 1}", f"seed={-2**63 - 1} is invalid: it must fit in 64 bits"),
])
def test_bad_values_are_one_line(run_dir, capsys, arg, message):
    assert main([f"resume={run_dir}", arg]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_every_64_bit_seed_samples(run_dir, capsys, seed):
    assert main([f"resume={run_dir}", f"seed={seed}", "max_new_tokens=2", "num_samples=1"]) == 0
    assert len(samples(capsys.readouterr().out)) == 1


def padded_copy(model: GPT) -> GPT:
    """`model` with its vocabulary padded to a multiple of 64 (the same real weights), its padded logits huge."""
    padded = GPT(dataclasses.replace(model.config, padded_vocab_size=50304)).eval()
    padded.load_state_dict(fit_padding(model.state_dict(), padded.config))
    force_padded_logits(padded)
    return padded


@pytest.mark.parametrize("top_k", [1, 50, 50304])
def test_padded_columns_are_never_sampled(top_k):
    """Padded logits forced to 1e4 (all the probability, were they seen): the same draws as the unpadded model's."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()
    padded = padded_copy(plain)
    idx = torch.randint(0, 50257, (64, 2), generator=torch.Generator().manual_seed(1))
    got = generate(padded, idx, 6, top_k=top_k, generator=torch.Generator().manual_seed(2))
    want = generate(plain, idx, 6, top_k=top_k, generator=torch.Generator().manual_seed(2))
    assert got.max().item() < 50257 and torch.equal(got, want)
    assert len(set(got[:, 2:].flatten().tolist())) > (1 if top_k == 1 else 100)  # sampling, not one token


def test_padded_checkpoint_samples_as_the_unpadded_one(run_dir, tmp_path, capsys):
    """A checkpoint of a padded model (model.pad_vocab=true) loads padded, on the CPU too, and samples the same text."""
    ckpt = next((run_dir / "checkpoints").glob("step_*.pt"))
    state = torch.load(ckpt, weights_only=True)
    model, _ = load_model(str(ckpt))
    padded = padded_copy(model)
    state["model"] = padded.state_dict()
    state["config"]["model"]["pad_vocab"] = "true"
    torch.save(state, tmp_path / "padded.pt")
    loaded, info = load_model(str(tmp_path / "padded.pt"))
    assert loaded.config == padded.config and loaded.transformer.wte.weight.shape == (50304, 24)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight and info["params"] == model.num_params()
    texts = []
    for source in (ckpt, tmp_path / "padded.pt"):
        assert main([f"resume={source}", "seed=5", "max_new_tokens=8", "num_samples=3", "prompt=To be"]) == 0
        texts.append(samples(capsys.readouterr().out))
    assert texts[0] == texts[1] and len(texts[0]) == 3


def test_a_hf_dir_padded_to_50304_tokens_samples_only_real_ones(tmp_path, capsys):
    """A GPT-2 dir from elsewhere whose config.json says vocab_size 50304 (nanoGPT's padding): its 47 extra rows,
    made huge here, would win top_k and give ids the tokenizer cannot decode. Only the 50257 real ones are drawn,
    exactly as from the same model without those rows."""
    torch.manual_seed(0)
    padded = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)).eval()
    with torch.no_grad():
        padded.transformer.wte.weight[50257:] = 1000 * torch.randn(47, 8)
    real = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=8)).eval()
    real.load_state_dict({k: v[:50257] if k in ("transformer.wte.weight", "lm_head.weight") else v
                          for k, v in padded.state_dict().items()})
    idx = torch.zeros((16, 1), dtype=torch.long)
    got = generate(padded, idx, 8, top_k=50, generator=torch.Generator().manual_seed(3))
    assert got.max().item() < 50257
    assert torch.equal(got, generate(real, idx, 8, top_k=50, generator=torch.Generator().manual_seed(3)))
    save_hf_gpt2(padded, tmp_path / "hf")
    assert main([f"hf={tmp_path / 'hf'}", "prompt=To be", "max_new_tokens=8", "num_samples=4"]) == 0
    texts = samples(capsys.readouterr().out)
    assert len(texts) == 4 and all(t.startswith("To be") and len(t) > len("To be") for t in texts)


@pytest.mark.parametrize("temperature", ["1e-45", "1e-300", "9e-6"])
def test_a_tiny_temperature_is_greedy(run_dir, capsys, temperature):
    """Below 1e-5 every draw is the most likely token (logits / 1e-45 would overflow to inf and softmax to NaN):
    the text top_k=1 gives, whatever the seed."""
    common = [f"resume={run_dir}", "prompt=To be", "max_new_tokens=6", "num_samples=2"]
    assert main([*common, "top_k=1"]) == 0
    greedy = samples(capsys.readouterr().out)
    assert main([*common, f"temperature={temperature}", "seed=9"]) == 0
    assert samples(capsys.readouterr().out) == greedy and greedy[0] == greedy[1]


@pytest.mark.parametrize("failure", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                     RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                                  "allocate 81604378624 bytes. Error code 12")])
def test_an_allocation_failure_is_one_line_naming_the_knobs(run_dir, capsys, monkeypatch, failure):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(sample, "sample_texts", fail)
    assert main([f"resume={run_dir}", "num_samples=5000", "max_new_tokens=900", "device=cpu"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: out of memory on cpu sampling num_samples=5000 x max_new_tokens=900 (")
    assert err[-1].endswith("); lower num_samples or max_new_tokens")
    assert err[0].startswith("model tiny") and len(err) == 2  # the model's line, then the error


def test_other_runtime_errors_keep_their_traceback(run_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(sample, "sample_texts", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main([f"resume={run_dir}", "device=cpu"])
