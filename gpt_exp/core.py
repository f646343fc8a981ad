"""CORE (the DCLM paper's in-context tasks) from a local eval bundle, scored as nanochat's core_eval scores them.

The library behind `python -m gpt_exp.eval core` and train.core_every; it never imports the CLI.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.nn import functional as F

from gpt_exp.errors import DataError
from gpt_exp.model import GPT
from gpt_exp.tokenizer import EOT_TOKEN, encode_text, gpt2_encoding

log = logging.getLogger(__name__)

BUNDLE = "give the DCLM eval bundle's dir (core.yaml, eval_meta_data.csv, eval_data/), e.g. nanochat's eval_bundle"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # each task's rows are shuffled once (nanochat's seed), so that a limit takes a spread sample
FEWSHOT_SEED = 1234  # item i's few-shot examples are drawn with Random(FEWSHOT_SEED + i), as nanochat draws them
PROGRESS_EVERY_S = 5.0
# each row type's keys, and what a row must be (the line a malformed row ends with)
ROWS = {"multiple_choice": "a query string, a list of at least 2 choice strings and gold, an index into them",
        "schema": "a list of at least 2 context_options strings, a continuation string and gold, an index into them",
        "language_modeling": "a context string and a non-empty continuation string"}


@dataclass
class CoreTask:
    """One task of the bundle: its rows (shuffled, cut to the limit) and how they are scored."""

    label: str
    kind: str  # one of TASK_TYPES
    num_fewshot: int
    delimiter: str  # between a context and its continuation
    baseline: float  # a random guess's accuracy, in percent (eval_meta_data.csv)
    examples: list[dict]


def load_bundle(bundle: Path, limit: int = 0) -> list[CoreTask]:
    """Every task core.yaml lists, each checked, with its random baseline; `limit` > 0 keeps each task's first N rows
    after the shuffle."""
    if not bundle.is_dir():
        raise DataError(f"bundle={bundle} is not a dir; {BUNDLE}")
    spec_path = bundle / "core.yaml"
    if not spec_path.is_file():
        raise DataError(f"{spec_path} does not exist; {BUNDLE}")
    try:
        spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{spec_path} is not valid YAML ({type(e).__name__}); {BUNDLE}") from None
    tasks = spec.get("icl_tasks") if isinstance(spec, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise DataError(f"{spec_path} lists no icl_tasks (a list of tasks with label, dataset_uri, num_fewshot, "
                        f"icl_task_type); {BUNDLE}")
    baselines = _baselines(bundle / "eval_meta_data.csv")
    loaded = [_task(bundle, f"{spec_path}: icl_tasks[{i}]", task, baselines, limit) for i, task in enumerate(tasks)]
    labels = [task.label for task in loaded]
    if twice := next((label for label in labels if labels.count(label) > 1), None):  # CORE averages one per task
        raise DataError(f"{spec_path} lists the task {twice} twice; give each task once")
    return loaded


def _baselines(path: Path) -> dict[str, tuple[str, str]]:
    """Each task's random baseline in percent as written, and where, from the bundle's eval_meta_data.csv (checked
    when a task uses it: the file describes tasks core.yaml may not list)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist (it holds each task's random baseline); {BUNDLE}")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a CSV file ({type(e).__name__}); {BUNDLE}") from None
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise DataError(f"{path} lacks the columns 'Eval Task' and 'Random baseline'; {BUNDLE}")
    return {row["Eval Task"]: (row["Random baseline"], f"{path}:{lineno}") for lineno, row in enumerate(rows, 2)}


def _baseline(label: str, written: str, where: str) -> float:
    try:
        value = float(written)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 <= value < 100:  # in percent; 100 would leave nothing to center on
        raise DataError(f"{where}: Random baseline={written!r} for {label!r} is not a percentage in [0, 100); repair "
                        f"that row")
    return value


def _task(bundle: Path, where: str, task: object, baselines: dict[str, tuple[str, str]], limit: int) -> CoreTask:
    if not isinstance(task, dict):
        raise DataError(f"{where} is not a task (a mapping with label, dataset_uri, num_fewshot, icl_task_type)")
    label, uri, kind = task.get("label"), task.get("dataset_uri"), task.get("icl_task_type")
    fewshot, delimiter = task.get("num_fewshot", [0]), task.get("continuation_delimiter", " ")
    for key, value in (("label", label), ("dataset_uri", uri), ("continuation_delimiter", delimiter)):
        if not isinstance(value, str) or (key != "continuation_delimiter" and not value):
            raise DataError(f"{where}: {key}={value!r} is not a string; repair core.yaml")
    if kind not in TASK_TYPES:
        raise DataError(f"{where} ({label}): unknown icl_task_type={kind!r}; use one of {', '.join(TASK_TYPES)}")
    shots = fewshot[0] if isinstance(fewshot, list) and fewshot else fewshot  # a list: the first is used
    if type(shots) is not int or shots < 0:
        raise DataError(f"{where} ({label}): num_fewshot={fewshot!r} is not a count >= 0 (or a list of them)")
    if label not in baselines:
        raise DataError(f"{bundle / 'eval_meta_data.csv'} has no Random baseline for task {label}; add its row "
                        f"(Eval Task: {label})")
    baseline = _baseline(label, *baselines[label])
    examples = _rows(bundle / "eval_data" / uri, kind)
    random.Random(SHUFFLE_SEED).shuffle(examples)
    return CoreTask(label, kind, shots, delimiter, baseline, examples[:limit] if limit else examples)


def _rows(path: Path, kind: str) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path} does not exist (a dataset_uri of core.yaml, under eval_data/); {BUNDLE}")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append(_row(line, kind, f"{path}:{lineno}"))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; {BUNDLE}") from None
    if not rows:
        raise DataError(f"{path} holds no rows; {BUNDLE}")
    return rows


def _row(line: str, kind: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise DataError(f"{where}: not JSON; repair or delete that line") from None
    ok = isinstance(row, dict)
    if ok and kind == "language_modeling":
        ok = isinstance(row.get("context"), str) and isinstance(row.get("continuation"), str) and row["continuation"]
    elif ok:
        options = row.get("choices" if kind == "multiple_choice" else "context_options")
        text = row.get("query" if kind == "multiple_choice" else "continuation")
        ok = (isinstance(text, str) and isinstance(options, list) and len(options) >= 2
              and all(isinstance(o, str) for o in options) and type(row.get("gold")) is int
              and 0 <= row["gold"] < len(options))
    if not ok:
        raise DataError(f"{where}: not a {kind} row ({ROWS[kind]}); repair or delete that line")
    return row


# --- prompts, as nanochat's core_eval renders them ---------------------------------------------------------------

def fewshot_examples(task: CoreTask, idx: int) -> list[dict]:
    """Item idx's few-shot examples: drawn from the task's other rows, the same ones every time."""
    others = [i for i in range(len(task.examples)) if i != idx]
    picked = random.Random(FEWSHOT_SEED + idx).sample(others, min(task.num_fewshot, len(others)))
    return [task.examples[i] for i in picked]


def render_prompts(task: CoreTask, idx: int) -> list[str]:
    """The texts the model reads for item idx: one per choice (multiple choice) or context option (schema), or the
    context without and with its continuation (language modeling). Few-shot examples come first, each answered
    and followed by a blank line."""
    item, d = task.examples[idx], task.delimiter
    shots = fewshot_examples(task, idx)
    if task.kind == "multiple_choice":
        prefix = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{prefix}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.kind == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in shots)
        return [f"{prefix}{option}{d}{item['continuation']}" for option in item["context_options"]]
    prefix = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in shots)
    # stripped: a trailing space would merge into the continuation's first token and blur where it starts
    context = f"{prefix}{item['context'].strip()}{d}"
    return [context.strip(), context + item["continuation"]]


def _common_length(rows: list[list[int]], from_end: bool = False) -> int:
    n = 0
    while n < min(map(len, rows)) and len({row[-1 - n] if from_end else row[n] for row in rows}) == 1:
        n += 1
    return n


def scored_rows(task: CoreTask, idx: int, block_size: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """(token rows, the [start, end) span of each row's scored tokens), every row starting with <|endoftext|>:
    multiple choice scores the tokens after the choices' common prefix, schema the common suffix (the continuation,
    after each context option), language modeling the continuation. A row longer than block_size loses its start,
    as generation crops it."""
    prompts = render_prompts(task, idx)
    rows = [[EOT_TOKEN] + encode_text(p) for p in prompts]
    if task.kind == "multiple_choice":
        start = _common_length(rows)
        spans = [(start, len(row)) for row in rows]
    elif task.kind == "schema":
        suffix = _common_length(rows, from_end=True)
        spans = [(len(row) - suffix, len(row)) for row in rows]
    else:
        spans = [(_common_length(rows), len(rows[1]))]  # the prompt without its continuation says where it starts
        rows = rows[1:]
    cropped = []
    for i, row in enumerate(rows):
        cut = max(len(row) - block_size, 0)
        start, end = spans[i]
        cropped.append(row[cut:])
        spans[i] = (max(start - cut, 1), end - cut)  # a continuation longer than the block keeps what fits
    return cropped, spans


@torch.no_grad()
def is_correct(model: GPT, task: CoreTask, idx: int, device: torch.device | str) -> bool:
    """Whether the model gets item idx right: the lowest mean loss over the scored tokens is the gold choice
    (multiple choice, schema), or every continuation token is the model's most likely one (language modeling)."""
    rows, spans = scored_rows(task, idx, model.config.block_size)
    tokens = torch.full((len(rows), max(map(len, rows))), EOT_TOKEN, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)  # right-padded: causal attention never sees the padding
    tokens = tokens.to(device)
    logits, _ = model(tokens)
    logits = logits[:, :-1, : gpt2_encoding().n_vocab]  # position t predicts token t + 1; padded rows are no tokens
    if task.kind == "language_modeling":
        (start, end), = spans
        return bool((logits[0, start - 1 : end - 1].argmax(-1) == tokens[0, start:end]).all())
    losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(len(rows), -1)
    means = [losses[i, s - 1 : e - 1].mean().item() if e > s else float("inf") for i, (s, e) in enumerate(spans)]
    return means.index(min(means)) == task.examples[idx]["gold"]


def score_tasks(model: GPT, tasks: list[CoreTask], device: torch.device | str, rank: int = 0,
                world_size: int = 1) -> list[int]:
    """How many of its share of each task's items (items rank, rank + world_size, ...) the model gets right."""
    correct = []
    started = last_report = time.perf_counter()
    for task in tasks:
        mine = range(rank, len(task.examples), world_size)
        correct.append(sum(is_correct(model, task, idx, device) for idx in mine))
        if time.perf_counter() - last_report > PROGRESS_EVERY_S:
            last_report = time.perf_counter()
            log.info("core: %d/%d tasks scored (%s: %d/%d right), %.0f s", len(correct), len(tasks), task.label,
                     correct[-1], len(mine), last_report - started)
    return correct


def core_results(tasks: list[CoreTask], correct: list[int]) -> dict:
    """Each task's accuracy and centered accuracy (acc - b) / (1 - b) for its random baseline b (0 at chance, 1 at
    perfect), and CORE, the mean centered accuracy over the tasks."""
    results = {}
    for task, right in zip(tasks, correct):
        acc, b = right / len(task.examples), task.baseline / 100
        results[task.label] = {"type": task.kind, "examples": len(task.examples), "acc": acc,
                               "centered": (acc - b) / (1 - b)}
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"core": core, "examples": sum(len(t.examples) for t in tasks), "tasks": results}


def evaluate_core(model: GPT, tasks: list[CoreTask], device: torch.device | str) -> dict:
    """core_results of `model` (already on `device`, in eval mode) in this one process."""
    return core_results(tasks, score_tasks(model, tasks, device))


def metrics_row(results: dict) -> dict:
    """core_results as flat numbers, for metrics.jsonl, W&B and the summary."""
    row = {"core": results["core"], "core_examples": results["examples"]}
    for label, r in results["tasks"].items():
        row[f"core_acc/{label}"], row[f"core_centered/{label}"] = r["acc"], r["centered"]
    return row
