"""HellaSwag: scores match a hand computation (each ending scored alone, unpadded), `limit=` takes the first N,
the CLI prints the one result line, and a missing file or a malformed line is one line with exit code 2."""

import dataclasses
import json
import logging

import pytest
import torch
from torch.nn import functional as F

from gpt_exp import hellaswag
from gpt_exp.eval import main
from gpt_exp.hellaswag import ending_losses, hellaswag_scores, load_hellaswag, render_example
from gpt_exp.hf import save_hf_gpt2
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.tokenizer import EOT_TOKEN, gpt2_encoding
from tests.helpers import run_cli
from tests.test_sample import padded_copy

CONTEXTS = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he",
     ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
      "starts pulling up roofing on a roof."]),
    ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady",
     ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
      "stands and lifts the weight over her head."]),
    ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water,"
     " with other individuals visible in the background.", "the child and a different man",
     ["are then shown paddling down a river in a boat while a woman talks.", "are driving the canoe, they go down"
      " the river flowing side to side.", "sit in a canoe while the man paddles.",
      "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."]),
    ("Baking cookies", "A kitchen is shown with a bowl of dough.", "A woman",
     ["adds chocolate chips and stirs.", "flies out of the window.", "reads a newspaper about taxes.",
      "puts the bowl into a washing machine and closes it."]),
    ("Playing guitar", "A boy sits on a bed holding a guitar.", "He",
     ["tunes the strings and starts to play.", "throws the guitar at a wall.", "eats it.", "sings."]),
    ("Skiing", "People are skiing down a snowy slope.", "One skier",
     ["falls and rolls in the snow.", "jumps over a small ramp and lands.", "takes off the skis and walks up.",
      "stops next to a friend and waves at the camera while laughing loudly."]),
]


def official_line(i: int, label: int) -> str:
    """One line of hellaswag_val.jsonl, with every key the official file has."""
    activity, ctx_a, ctx_b, endings = CONTEXTS[i]
    return json.dumps({"ind": 24 + i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                       "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain", "label": label,
                       "endings": endings, "source_id": f"activitynet~v_{i:011d}"})


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # far from uniform predictions, so the endings' losses are well apart
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@torch.no_grad()
def hand_losses(model: GPT, ctx: str, ending: str) -> tuple[float, float]:
    """(sum, mean) loss of the ending's tokens after the context, the sequence alone and unpadded."""
    enc = gpt2_encoding()
    ctx_tokens, end_tokens = enc.encode(ctx), enc.encode(" " + ending)
    logits, _ = model(torch.tensor([ctx_tokens + end_tokens]))
    predicted = logits[0, len(ctx_tokens) - 1 : -1]  # the logits at t score token t + 1
    losses = F.cross_entropy(predicted, torch.tensor(end_tokens), reduction="none")
    return losses.sum().item(), losses.mean().item()


@pytest.fixture(scope="module")
def dataset(model, tmp_path_factory):
    """The examples' file, labelled so that the model's acc_norm pick is right on the first four, wrong on two."""
    lines, picks_sum = [], []
    for i, (_, ctx_a, ctx_b, endings) in enumerate(CONTEXTS):
        sums, means = zip(*(hand_losses(model, f"{ctx_a} {ctx_b}", e) for e in endings))
        best = min(range(4), key=lambda j: means[j])
        assert sorted(means)[1] - means[best] > 1e-3  # a clear winner, not a rounding tie
        label = best if i < 4 else (best + 1) % 4
        lines.append(official_line(i, label))
        picks_sum.append(min(range(4), key=lambda j: sums[j]) == label)
    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, sum(picks_sum) / len(CONTEXTS)


def test_scores_match_the_hand_computation(model, dataset):
    path, expected_acc = dataset
    scores = hellaswag_scores(model, load_hellaswag(path), "cpu")
    assert scores == {"examples": 6, "acc_norm": pytest.approx(4 / 6), "acc": pytest.approx(expected_acc)}


def test_limit_takes_the_first_examples(model, dataset):
    examples = load_hellaswag(dataset[0], limit=2)
    assert [e["ind"] for e in examples] == [24, 25]
    assert hellaswag_scores(model, examples, "cpu")["acc_norm"] == 1.0  # the first four are the model's picks


def test_progress_line_with_a_rate(model, dataset, monkeypatch, caplog):
    monkeypatch.setattr(hellaswag, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="gpt_exp.hellaswag"):
        hellaswag_scores(model, load_hellaswag(dataset[0]), "cpu")
    assert "hellaswag: 6/6 examples, acc_norm 0.6667" in caplog.text and "examples/s" in caplog.text


def test_endoftext_in_an_example_is_the_end_of_text_token():
    # tiktoken's plain encode raises on this text; it means a document boundary, so it becomes token 50256
    enc = gpt2_encoding()
    example = {"ctx": "Done.<|endoftext|>A man", "endings": ["sits.", "<|endoftext|>", "runs.", "is."], "label": 0}
    tokens, mask = render_example(example, block_size=128)
    ctx = enc.encode_ordinary("Done.") + [EOT_TOKEN] + enc.encode_ordinary("A man")
    assert tokens[1, : len(ctx) + 2].tolist() == ctx + enc.encode_ordinary(" ") + [EOT_TOKEN]
    assert mask[1].tolist() == [0] * len(ctx) + [1, 1] + [0] * (tokens.shape[1] - len(ctx) - 2)


def test_a_row_longer_than_the_block_loses_its_start_and_keeps_its_ending():
    enc = gpt2_encoding()
    long_ending = " ".join(["word"] * 20)
    example = {"ctx": "one two three four five six", "endings": ["seven", long_ending, "eight", "nine"], "label": 0}
    tokens, mask = render_example(example, block_size=16)
    ctx = enc.encode_ordinary(example["ctx"])
    assert tokens.shape == (4, 16)
    assert tokens[0, : len(ctx) + 1].tolist() == ctx + enc.encode_ordinary(" seven")  # short rows stay whole
    assert mask[0].sum() == 1 and mask[2].sum() == 1 and mask[3].sum() == 1
    assert tokens[1].tolist() == enc.encode_ordinary(" " + long_ending)[-16:] and mask[1].sum() == 16


def test_cli_prints_the_result_line(model, dataset, tmp_path):
    save_hf_gpt2(model, tmp_path / "hf")
    result = run_cli("eval", "hellaswag", f"path={dataset[0]}", f"hf={tmp_path / 'hf'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hellaswag: 6 examples, acc_norm 0.6667, acc {dataset[1]:.4f}\n"


def test_cli_limit(model, dataset, tmp_path, capsys):
    save_hf_gpt2(model, tmp_path / "hf")
    assert main(["hellaswag", f"path={dataset[0]}", f"hf={tmp_path / 'hf'}", "limit=5"]) == 0
    assert capsys.readouterr().out == "hellaswag: 5 examples, acc_norm 0.8000, acc " + \
        f"{hellaswag_scores(model, load_hellaswag(dataset[0], 5), 'cpu')['acc']:.4f}\n"


@pytest.mark.parametrize("lines, message", [
    (None, "path={path} does not exist; use the official hellaswag_val.jsonl"),
    ([official_line(0, 1), official_line(1, 2), '{"ctx": "A man", "endings": ["a", "b"]'],
     "{path}:3: not JSON (Expecting ',' delimiter)"),
    ([official_line(0, 1), '{"ctx": "A man", "endings": ["a", "b"], "label": 0}'],
     "{path}:2: not a HellaSwag example (a ctx string, 4 endings and a label 0-3)"),
    ([], "{path} holds no examples"),
    ([official_line(0, 1), "[" * 100_000], "{path}:2: JSON nested too deeply to read; use the official"),
    ([official_line(0, 1), '{"ctx": ' * 50_000], "{path}:2: JSON nested too deeply to read"),
])
def test_file_mistakes_are_one_line_and_exit_2(tmp_path, lines, message):
    path = tmp_path / "hellaswag_val.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    result = run_cli("eval", "hellaswag", f"path={path}", "resume=unused", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: " + message.format(path=path)), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["hellaswg"], "error: unknown eval 'hellaswg'; choose one of: hellaswag"),
    (["hellaswag", "pth=x"], "error: unknown key 'pth'; did you mean path?"),
    (["hellaswag", "path=x", "limit=-1"], "error: limit=-1 is invalid: it must be >= 0"),
])
def test_argument_mistakes_are_one_line(capsys, args, message):
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(message)


def test_a_padded_model_scores_as_the_unpadded_one(model, dataset):
    """Padded logits forced to 1e4 take no probability: every ending's loss and both scores are the same."""
    padded = padded_copy(model)
    tokens, mask = render_example(load_hellaswag(dataset[0])[0], block_size=128)
    with torch.no_grad():
        got, want = ending_losses(padded, tokens, mask), ending_losses(model, tokens, mask)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    examples = load_hellaswag(dataset[0])
    assert hellaswag_scores(padded, examples, "cpu") == hellaswag_scores(model, examples, "cpu")


def run_dir_with_weights(path, model):
    """A run dir as far as eval reads one: .hydra/config.yaml and the model/ weights a run leaves."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text("model:\n  name: tiny\n")
    save_hf_gpt2(model, path / "model")
    return path


def test_scores_are_saved_in_the_run_dirs_eval_json_beside_other_evals(model, dataset, tmp_path, capsys):
    run = run_dir_with_weights(tmp_path / "run", model)
    assert main(["hellaswag", f"path={dataset[0]}", f"resume={run}", "limit=4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"saved in {run / 'eval.json'}"
    saved = json.loads((run / "eval.json").read_text())
    saved["other_eval"] = {"acc": 0.5}  # what another eval of gpt_exp saved
    (run / "eval.json").write_text(json.dumps(saved))
    assert main(["hellaswag", f"path={dataset[0]}", f"resume={run}"]) == 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["gpt_exp_eval"] == 1 and saved["other_eval"] == {"acc": 0.5}
    assert saved["hellaswag"]["examples"] == 6 and saved["hellaswag"]["acc_norm"] == pytest.approx(4 / 6)
    assert saved["hellaswag"]["model"] == str(run / "model") and saved["hellaswag"]["limit"] == 0


@pytest.mark.parametrize("theirs", [b"[1, 2, 3]\n", b"task,acc\nhellaswag,0.29\n", b'{"hellaswag": "mine"}\n',
                                    b"[" * 100_000, b"\xff\xfe"])
def test_a_users_eval_json_is_never_replaced(model, dataset, tmp_path, capsys, theirs):
    """An eval.json gpt_exp did not write (no gpt_exp_eval key) stays byte for byte; the scores go beside it."""
    run = run_dir_with_weights(tmp_path / "run", model)
    (run / "eval.json").write_bytes(theirs)
    assert main(["hellaswag", f"path={dataset[0]}", f"resume={run}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"saved in {run / 'eval.gpt_exp.json'} ({run / 'eval.json'} is not one gpt_exp's eval wrote: left as it is)")
    assert (run / "eval.json").read_bytes() == theirs
    assert json.loads((run / "eval.gpt_exp.json").read_text())["hellaswag"]["acc_norm"] == pytest.approx(4 / 6)
    assert main(["hellaswag", f"path={dataset[0]}", f"resume={run}", "limit=2"]) == 0  # again: into its own file
    assert json.loads((run / "eval.gpt_exp.json").read_text())["hellaswag"]["examples"] == 2
    assert (run / "eval.json").read_bytes() == theirs


def test_when_both_files_are_the_users_nothing_is_written(model, dataset, tmp_path, capsys):
    run = run_dir_with_weights(tmp_path / "run", model)
    (run / "eval.json").write_text("[]")
    (run / "eval.gpt_exp.json").write_text("notes")
    assert main(["hellaswag", f"path={dataset[0]}", f"resume={run}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"not saved: {run / 'eval.json'} and eval.gpt_exp.json are not files gpt_exp's eval wrote")
    assert (run / "eval.json").read_text() == "[]" and (run / "eval.gpt_exp.json").read_text() == "notes"


def test_a_checkpoint_outside_a_run_dir_writes_nothing_above_it(model, dataset, tmp_path, capsys):
    """checkpoints/ in a folder of the user's (no .hydra/config.yaml): eval reads the checkpoint, writes nothing."""
    state = {"step": 7, "model": model.state_dict(),
             "config": {"model": {"name": "tiny", "block_size": 128, "vocab_size": 50257, "n_layer": 2,
                                  "n_head": 2, "n_embd": 32}}}
    (tmp_path / "mine" / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "mine" / "checkpoints" / "step_0000007.pt"
    torch.save(state, ckpt)
    (tmp_path / "mine" / "eval.json").write_text("[1]")
    for target in (ckpt, tmp_path / "mine"):
        assert main(["hellaswag", f"path={dataset[0]}", f"resume={target}"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == (
            f"not saved: {target} is not in a gpt_exp run dir (no .hydra/config.yaml beside its checkpoints/)")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["checkpoints", "eval.json"]
    assert (tmp_path / "mine" / "eval.json").read_text() == "[1]"


def test_a_hf_dir_padded_to_50304_tokens_scores_as_its_real_vocabulary(model, dataset):
    """A GPT-2 dir from elsewhere whose config.json says vocab_size 50304: its 47 extra rows (huge here) are no
    tokens, so they take no probability from the endings: the same losses as the model without them."""
    padded = GPT(dataclasses.replace(model.config, vocab_size=50304, padded_vocab_size=None)).eval()
    state = model.state_dict()
    extra = 1000 * torch.randn(47, model.config.n_embd, generator=torch.Generator().manual_seed(0))
    for key in ("transformer.wte.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], extra])
    padded.load_state_dict(state)
    tokens, mask = render_example(load_hellaswag(dataset[0])[0], block_size=128)
    with torch.no_grad():
        got, want = ending_losses(padded, tokens, mask), ending_losses(model, tokens, mask)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
