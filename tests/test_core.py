"""CORE from a tiny eval bundle: prompts rendered as nanochat renders them, each choice's mean loss and each
continuation's argmax against a hand computation (every sequence alone, unpadded), centered accuracy and CORE from
the random baselines, limit=, prompts cropped from the left, ranks' shares, the command and training's rows."""

import json
import random

import pytest
import torch
from torch.nn import functional as F

from gpt_exp import eval as evals
from gpt_exp.checkpoint import save_checkpoint
from gpt_exp.core import CoreTask, core_results, evaluate_core, load_bundle, render_prompts, score_tasks, scored_rows
from gpt_exp.errors import DataError
from gpt_exp.hf import save_hf_gpt2
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.tokenizer import EOT_TOKEN, gpt2_encoding
from tests.helpers import only_run_dir, read_metrics, run_cli, wandb_records

MC = [{"query": "Question: Which is the capital of France?\nAnswer:", "choices": ["Paris", "London", "Rome"],
       "gold": 0},
      {"query": "Question: What do bees make?\nAnswer:", "choices": ["honey", "milk", "steel"], "gold": 0},
      {"query": "Question: How many legs does a spider have?\nAnswer:", "choices": ["six", "eight", "ten"], "gold": 1}]
SCHEMA = [{"context_options": ["The trophy did not fit in the suitcase because the trophy",
                               "The trophy did not fit in the suitcase because the suitcase"],
           "continuation": "was too big.", "gold": 0},
          {"context_options": ["Anna thanked Mary because Anna", "Anna thanked Mary because Mary"],
           "continuation": "had helped her.", "gold": 1},
          {"context_options": ["The man could not lift his son because the man",
                               "The man could not lift his son because the son"],
           "continuation": "was so weak.", "gold": 0}]
LM_CONTEXTS = ["The cat sat on the", "Once upon a time there was a", "She opened the door and saw", "I like to eat",
               "The weather today is", "He walked into the", "My favourite colour is", "They went to the",
               "It was a dark and stormy", "We live in a small", "The dog ran after the", "Please pass the"]
BASELINES = {"mc_demo": 25.0, "schema_demo": 50.0, "lm_demo": 0.0}


def write_bundle(root, tasks: dict, baselines: dict | None = None):
    """A DCLM-style bundle: core.yaml, eval_meta_data.csv and eval_data/<label>.jsonl for each task (type, rows, shots,
    delimiter or None)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "eval_data" / "demo").mkdir(parents=True, exist_ok=True)
    icl_tasks = []
    for label, (kind, rows, shots, delimiter) in tasks.items():
        (root / "eval_data" / "demo" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        task = {"label": label, "dataset_uri": f"demo/{label}.jsonl", "num_fewshot": [shots], "icl_task_type": kind}
        if delimiter is not None:
            task["continuation_delimiter"] = delimiter
        icl_tasks.append(task)
    (root / "core.yaml").write_text(json.dumps({"icl_tasks": icl_tasks}))  # JSON is YAML
    baselines = BASELINES if baselines is None else baselines
    (root / "eval_meta_data.csv").write_text("Eval Task,Task Category,Random baseline\n" + "".join(
        f"{label},demo,{b}\n" for label, b in baselines.items()))
    return root


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # far from uniform predictions, so the choices' losses are well apart
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@torch.no_grad()
def token_losses(model: GPT, text: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(tokens of <|endoftext|> + text, the loss of each token after the first, the argmax before each), alone."""
    tokens = [EOT_TOKEN] + gpt2_encoding().encode_ordinary(text)
    logits, _ = model(torch.tensor([tokens]))
    losses = F.cross_entropy(logits[0, :-1], torch.tensor(tokens[1:]), reduction="none")
    return tokens, losses, logits[0, :-1].argmax(-1)


@pytest.fixture(scope="module")
def lm_rows(model):
    """Language modeling rows: the model's own next token (right), that token and one more (right only if the model
    also predicts the second), and a fixed word; the contexts whose next token is a word after a space."""
    enc, words = gpt2_encoding(), []
    for context in LM_CONTEXTS:
        with torch.no_grad():
            logits, _ = model(torch.tensor([[EOT_TOKEN] + enc.encode_ordinary(context)]))
        token = int(logits[0, -1].argmax())  # what the model predicts after the whole context
        word = enc.decode([token])
        if word.startswith(" ") and word[1:].isalpha() and enc.encode_ordinary(word) == [token]:
            words.append((context, word[1:]))
    assert len(words) >= 3, words
    (a, word_a), (b, word_b), (c, _) = words[:3]
    return [{"context": a + "  ", "continuation": word_a},  # a trailing space: trimmed
            {"context": b, "continuation": word_b + " zebra"}, {"context": c, "continuation": "elephant"}]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, lm_rows):
    return write_bundle(tmp_path_factory.mktemp("core") / "eval_bundle", {
        "mc_demo": ("multiple_choice", MC, 1, None), "schema_demo": ("schema", SCHEMA, 1, None),
        "lm_demo": ("language_modeling", lm_rows, 0, " ")})


def test_prompts_are_rendered_as_nanochat_renders_them():
    mc = CoreTask("mc", "multiple_choice", 1, " ", 25.0, [{"query": "Q0?", "choices": ["a", "b"], "gold": 1},
                                                          {"query": "Q1?", "choices": ["c", "d"], "gold": 0}])
    assert render_prompts(mc, 0) == ["Q1? c\n\nQ0? a", "Q1? c\n\nQ0? b"]  # the other item, answered, a blank line
    schema = CoreTask("s", "schema", 1, " ", 50.0, [{"context_options": ["A", "B"], "continuation": "x.", "gold": 1},
                                                    {"context_options": ["C", "D"], "continuation": "y.", "gold": 0}])
    assert render_prompts(schema, 1) == ["B x.\n\nC y.", "B x.\n\nD y."]
    lm = CoreTask("l", "language_modeling", 1, ": ", 0.0, [{"context": " The end ", "continuation": "now"},
                                                          {"context": "Go ", "continuation": "home"}])
    # contexts trimmed; the prompt without its continuation is stripped (its trailing delimiter space too)
    assert render_prompts(lm, 0) == ["Go: home\n\nThe end:", "Go: home\n\nThe end: now"]
    no_shots = CoreTask("mc", "multiple_choice", 0, " ", 25.0, mc.examples)
    assert render_prompts(no_shots, 1) == ["Q1? c", "Q1? d"]


def test_fewshot_examples_are_other_items_the_same_every_time():
    rows = [{"query": f"Q{i}?", "choices": ["a", "b"], "gold": 0} for i in range(6)]
    task = CoreTask("mc", "multiple_choice", 3, " ", 25.0, rows)
    for idx in range(6):
        shots = render_prompts(task, idx)[0].split("\n\n")[:-1]
        assert len(shots) == 3 and f"Q{idx}? a" not in shots and len(set(shots)) == 3
        assert render_prompts(task, idx) == render_prompts(task, idx)
    # Random(1234 + idx).sample over the other indices, as nanochat draws them
    expected = [f"Q{i}? a" for i in random.Random(1234 + 2).sample([0, 1, 3, 4, 5], 3)]
    assert render_prompts(task, 2)[0].split("\n\n")[:-1] == expected
    two = CoreTask("mc", "multiple_choice", 5, " ", 25.0, rows[:2])  # more shots than other items: all of them
    assert render_prompts(two, 0)[0] == "Q1? a\n\nQ0? a"


def test_scores_match_the_hand_computation(model, bundle, lm_rows):
    tasks = load_bundle(bundle)
    assert [(t.label, t.kind, t.num_fewshot, t.delimiter, t.baseline, len(t.examples)) for t in tasks] == [
        ("mc_demo", "multiple_choice", 1, " ", 25.0, 3), ("schema_demo", "schema", 1, " ", 50.0, 3),
        ("lm_demo", "language_modeling", 0, " ", 0.0, 3)]
    enc = gpt2_encoding()
    right = []
    for task in tasks:
        count = 0
        for idx, item in enumerate(task.examples):
            prompts = render_prompts(task, idx)
            if task.kind == "language_modeling":  # right iff the argmax before each continuation token is that token
                n = len(enc.encode_ordinary(" " + item["continuation"]))
                tokens, _, argmax = token_losses(model, prompts[1])
                count += argmax[-n:].tolist() == tokens[-n:]
                continue
            # the scored tokens: the choice after the common prefix, the continuation after each context option
            ends = item["choices"] if task.kind == "multiple_choice" else [item["continuation"]] * 2
            means = []
            for prompt, end in zip(prompts, ends):
                n = len(enc.encode_ordinary(" " + end))
                means.append(token_losses(model, prompt)[1][-n:].mean().item())
            best = min(range(len(means)), key=means.__getitem__)
            assert sorted(means)[1] - means[best] > 1e-3  # a clear winner, not a rounding tie
            count += best == item["gold"]
        right.append(count)
    assert right[2] >= 1  # the model's own next token is right: the argmax rule is tested both ways
    results = evaluate_core(model, tasks, "cpu")
    acc = [r / 3 for r in right]
    centered = [(acc[0] - 0.25) / 0.75, (acc[1] - 0.5) / 0.5, acc[2]]  # baselines 25%, 50%, 0%
    assert results["examples"] == 9
    assert [r["acc"] for r in results["tasks"].values()] == pytest.approx(acc)
    assert [r["centered"] for r in results["tasks"].values()] == pytest.approx(centered)
    assert results["core"] == pytest.approx(sum(centered) / 3)
    # this model: 2 of 3 choices, 0 of 3 schemas, 1 of 3 continuations; (5/9 - 1 + 1/3) / 3 = -1/27
    assert right == [2, 0, 1] and results["core"] == pytest.approx(-1 / 27)
    assert score_tasks(model, tasks, "cpu") == right


def test_spans_are_the_choice_the_continuation_and_the_context_less_its_options(model, bundle):
    mc, schema, lm = load_bundle(bundle)
    enc = gpt2_encoding()
    for task, ends in ((mc, lambda item: item["choices"]), (schema, lambda item: [item["continuation"]] * 2),
                       (lm, lambda item: [item["continuation"]])):
        for idx, item in enumerate(task.examples):
            rows, spans = scored_rows(task, idx, block_size=128)
            assert all(row[0] == EOT_TOKEN for row in rows)
            for row, (start, end), text in zip(rows, spans, ends(item)):
                assert end == len(row) and row[start:] == enc.encode_ordinary(" " + text)


def test_a_prompt_longer_than_the_block_loses_its_start_and_keeps_its_choice():
    enc = gpt2_encoding()
    long_query = " ".join(["word"] * 40) + "?"
    task = CoreTask("mc", "multiple_choice", 0, " ", 25.0,
                    [{"query": long_query, "choices": ["yes", "no way at all"], "gold": 0}])
    rows, spans = scored_rows(task, 0, block_size=16)
    full = [[EOT_TOKEN] + enc.encode_ordinary(f"{long_query} {c}") for c in ("yes", "no way at all")]
    assert rows == [full[0][-16:], full[1][-16:]]  # the last block_size tokens: the choice stays whole
    assert [row[s:e] for row, (s, e) in zip(rows, spans)] == [enc.encode_ordinary(" yes"),
                                                               enc.encode_ordinary(" no way at all")]
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=8)).eval()
    assert evaluate_core(model, [task], "cpu")["tasks"]["mc"]["examples"] == 1  # it runs within the block


def test_limit_keeps_each_tasks_first_rows_after_a_fixed_shuffle(bundle):
    order = list(range(3))
    random.Random(1337).shuffle(order)  # nanochat's shuffle, so that a limit takes a spread sample
    mc = load_bundle(bundle, limit=2)[0]
    assert mc.examples == [MC[i] for i in order[:2]]
    assert [len(t.examples) for t in load_bundle(bundle, limit=2)] == [2, 2, 2]
    assert load_bundle(bundle, limit=2)[1].examples == load_bundle(bundle, limit=2)[1].examples


def test_ranks_share_the_items_and_their_counts_add_up(model, bundle):
    tasks = load_bundle(bundle)
    whole = score_tasks(model, tasks, "cpu")
    shares = [score_tasks(model, tasks, "cpu", rank, 2) for rank in (0, 1)]
    assert [a + b for a, b in zip(*shares)] == whole  # each rank renders its items with the whole task's few-shots
    assert core_results(tasks, whole)["core"] == evaluate_core(model, tasks, "cpu")["core"]


def test_cli_prints_each_task_and_core(model, bundle, tmp_path, capsys):
    save_hf_gpt2(model, tmp_path / "hf")
    results = evaluate_core(model, load_bundle(bundle), "cpu")
    assert evals.main(["core", f"bundle={bundle}", f"hf={tmp_path / 'hf'}", "device=cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    r = results["tasks"]
    assert lines == [
        f"core mc_demo (multiple_choice, 3 examples): acc {r['mc_demo']['acc']:.4f}, centered "
        f"{r['mc_demo']['centered']:.4f}",
        f"core schema_demo (schema, 3 examples): acc {r['schema_demo']['acc']:.4f}, centered "
        f"{r['schema_demo']['centered']:.4f}",
        f"core lm_demo (language_modeling, 3 examples): acc {r['lm_demo']['acc']:.4f}, centered "
        f"{r['lm_demo']['centered']:.4f}",
        f"core: CORE {results['core']:.4f} over 3 tasks, 9 examples"]


def test_cli_saves_the_scores_beside_hellaswags_in_the_run_dir(model, bundle, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("model: {name: test}\n")
    (run_dir / "eval.json").write_text(json.dumps({"gpt_exp_eval": 1, "hellaswag": {"acc_norm": 0.5}}))
    config = {"name": "test", "block_size": 128, "vocab_size": 50257, "n_layer": 2, "n_head": 2, "n_embd": 32}
    save_checkpoint(run_dir, {"step": 7, "tokens": 0, "model": model.state_dict(), "config": {"model": config}}, 2)
    assert evals.main(["core", f"bundle={bundle}", f"resume={run_dir}", "limit=2", "device=cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"saved in {run_dir / 'eval.json'}"
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["hellaswag"] == {"acc_norm": 0.5}  # the other eval's scores stay
    expected = evaluate_core(model, load_bundle(bundle, limit=2), "cpu")
    assert saved["core"]["core"] == pytest.approx(expected["core"]) and saved["core"]["examples"] == 6
    assert (saved["core"]["bundle"], saved["core"]["limit"], saved["core"]["step"]) == (str(bundle), 2, 7)


def test_core_during_training(tmp_path, cache_dir, bundle):
    result = run_cli("run", "model=tiny", "train.max_steps=3", "train.core_every=2", f"eval.core_bundle={bundle}",
                     "eval.core_limit=2", "logger.mode=offline", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    rows = [r for r in read_metrics(run_dir) if "core" in r]
    assert [(r["step"], r["core_examples"]) for r in rows] == [(1, 6), (2, 6)]  # every 2 steps and at the end
    for r in rows:  # counts of 2 per task, centered on each baseline, CORE their mean
        accs = [r[f"core_acc/{label}"] for label in BASELINES]
        assert all(a * 2 == round(a * 2) for a in accs)
        centered = [(a - b / 100) / (1 - b / 100) for a, b in zip(accs, BASELINES.values())]
        assert [r[f"core_centered/{label}"] for label in BASELINES] == pytest.approx(centered)
        assert r["core"] == pytest.approx(sum(centered) / 3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["core"] == rows[-1]["core"] and summary["core_acc/mc_demo"] == rows[-1]["core_acc/mc_demo"]
    assert "step 3 | CORE" in (run_dir / "run.log").read_text()
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    history = [r["history"]["item"] for r in wandb_records(offline) if r["type"] == "history"]
    assert [h["core"] for h in history if "core" in h] == pytest.approx([r["core"] for r in rows])


def test_core_during_training_without_its_bundle_is_one_line_before_step_0(tmp_path, cache_dir):
    result = run_cli("run", "model=tiny", "train.core_every=2", "logger.mode=disabled", f"data.cache_dir={cache_dir}",
                     cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: train.core_every=2 is invalid: it needs")
    missing = run_cli("run", "model=tiny", "train.core_every=2", f"eval.core_bundle={tmp_path / 'nope'}",
                      "logger.mode=disabled", f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr == f"error: bundle={tmp_path / 'nope'} is not a dir; " \
        "give the DCLM eval bundle's dir (core.yaml, eval_meta_data.csv, eval_data/), e.g. nanochat's eval_bundle\n"
    negative = run_cli("run", "model=tiny", "eval.core_limit=-1", "logger.mode=disabled", cwd=tmp_path)
    assert negative.returncode == 2 and negative.stderr.startswith("error: eval.core_limit=-1 is invalid")
    assert not list(tmp_path.glob("outputs/*/*"))


def test_two_ranks_score_as_one_process(tmp_path, cache_dir, bundle):
    """Under DDP each rank scores its share of every task and evaluates its stride of the val split: the counts and
    the val loss's nats, tokens and bytes are summed over the ranks, so the numbers are one process's."""
    from tests.test_distributed import torchrun

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog, café.\n" for i in range(400)))
    # a tiny lr: both runs evaluate nearly the init's weights, so no pick flips on float rounding
    common = ["data=text", f"data.path={corpus}", "model=tiny", "T=32", "train.max_steps=1", "optim.lr=1e-9",
              "train.eval_every=1", "train.eval_batches=2", "data.val_fraction=0.2", "train.core_every=1",
              f"eval.core_bundle={bundle}", "logger.mode=disabled", f"data.cache_dir={cache_dir}"]
    (tmp_path / "single").mkdir(), (tmp_path / "ddp").mkdir()
    single = run_cli("run", *common, "B=4", cwd=tmp_path / "single")
    assert single.returncode == 0, single.stderr
    ddp = torchrun(tmp_path / "ddp", *common, "B=2")
    assert ddp.returncode == 0, ddp.stderr
    [one_val], [one_core] = ([r for r in read_metrics(only_run_dir(tmp_path / "single")) if key in r]
                             for key in ("val_bpb", "core"))
    [two_val], [two_core] = ([r for r in read_metrics(only_run_dir(tmp_path / "ddp")) if key in r]
                             for key in ("val_bpb", "core"))
    assert two_val["val_bpb"] == pytest.approx(one_val["val_bpb"], rel=1e-5)  # the same 2 x 4 x 32 tokens
    assert two_val["val_loss"] == pytest.approx(one_val["val_loss"], rel=1e-5)
    assert two_core == pytest.approx(one_core)  # every task's 3 items counted once, over the two ranks


def test_meta_data_rows_of_tasks_core_yaml_does_not_list_are_not_read(tmp_path):
    bundle = write_bundle(tmp_path / "b", {"mc_demo": ("multiple_choice", MC, 0, None)},
                          {"mc_demo": 25.0, "squad_other": "n/a"})  # the real file describes more tasks than CORE's
    [task] = load_bundle(bundle)
    assert (task.label, task.baseline, len(task.examples)) == ("mc_demo", 25.0, 3)


def test_a_task_listed_twice_is_one_line(tmp_path):
    bundle = write_bundle(tmp_path / "b", {"mc_demo": ("multiple_choice", MC, 0, None)}, {"mc_demo": 25.0})
    spec = json.loads((bundle / "core.yaml").read_text())
    (bundle / "core.yaml").write_text(json.dumps({"icl_tasks": spec["icl_tasks"] * 2}))
    with pytest.raises(DataError, match=r"core.yaml lists the task mc_demo twice; give each task once$"):
        load_bundle(bundle)
