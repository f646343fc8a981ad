"""HellaSwag, scored the lecture's way: the ending the model finds least surprising wins.

The library behind `python -m gpt_exp.eval hellaswag` and train.hellaswag_every; it never imports the CLI.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from gpt_exp.errors import DataError
from gpt_exp.model import GPT
from gpt_exp.tokenizer import encode_text, gpt2_encoding

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0
OFFICIAL = "use the official hellaswag_val.jsonl (github.com/rowanz/hellaswag, data/)"


def _example(line: str, where: str) -> dict:
    try:
        example = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg}); {OFFICIAL}") from None
    except RecursionError:  # '[[[[...' nested deeper than Python's JSON parser goes
        raise DataError(f"{where}: JSON nested too deeply to read; {OFFICIAL}") from None
    ok = (isinstance(example, dict) and isinstance(example.get("ctx"), str)
          and isinstance(example.get("endings"), list) and len(example["endings"]) == 4
          and all(isinstance(e, str) for e in example["endings"])
          and type(example.get("label")) is int and 0 <= example["label"] < 4)
    if not ok:
        raise DataError(f"{where}: not a HellaSwag example (a ctx string, 4 endings and a label 0-3); {OFFICIAL}")
    return example


def load_hellaswag(path: Path, limit: int = 0) -> list[dict]:
    """The examples of a HellaSwag .jsonl file (the first `limit` of them, if > 0), each checked."""
    if not path.is_file():
        raise DataError(f"path={path} does not exist; {OFFICIAL}")
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    examples.append(_example(line, f"{path}:{lineno}"))
                if limit and len(examples) == limit:
                    break
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; {OFFICIAL}") from None
    if not examples:
        raise DataError(f"{path} holds no examples; {OFFICIAL}")
    return examples


def render_example(example: dict, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask), each (4, L): the context followed by " " + each ending, right-padded; the mask is 1 on
    the ending's tokens, the only ones scored. `<|endoftext|>` in the text is the end-of-text token."""
    ctx = encode_text(example["ctx"])
    rows = [ctx + encode_text(" " + ending) for ending in example["endings"]]
    # a row too long for the model loses its start, as generation crops it (endings are a sentence long)
    cut = [max(len(row) - block_size, 0) for row in rows]
    length = max(len(row) - c for row, c in zip(rows, cut))
    tokens = torch.zeros((4, length), dtype=torch.long)
    mask = torch.zeros((4, length), dtype=torch.long)
    for i, (row, c) in enumerate(zip(rows, cut)):
        tokens[i, : len(row) - c] = torch.tensor(row[c:])
        mask[i, max(len(ctx) - c, 0) : len(row) - c] = 1
    return tokens, mask


def ending_losses(model: GPT, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed and the mean cross-entropy of the tokens where `mask` is 1."""
    logits, _ = model(tokens)
    logits = logits[..., : gpt2_encoding().n_vocab]  # a HF dir padded to 50304 rows: its extra ids are no tokens
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    scored = mask[:, 1:].float()  # logits at position t predict token t + 1
    sum_loss = (losses.view_as(scored) * scored).sum(dim=1)
    return sum_loss, sum_loss / scored.sum(dim=1)


@torch.no_grad()
def hellaswag_scores(model: GPT, examples: list[dict], device: torch.device | str) -> dict:
    """{examples, acc, acc_norm} of `model` (already on `device`): acc picks the ending with the lowest summed
    loss, acc_norm the lowest loss per token (the number the lecture reports)."""
    block_size = model.config.block_size
    correct = correct_norm = 0
    started = last_report = time.perf_counter()
    for done, example in enumerate(examples, 1):
        tokens, mask = render_example(example, block_size)
        sum_loss, avg_loss = ending_losses(model, tokens.to(device), mask.to(device))
        correct += int(sum_loss.argmin()) == example["label"]
        correct_norm += int(avg_loss.argmin()) == example["label"]
        if time.perf_counter() - last_report > PROGRESS_EVERY_S:
            last_report = time.perf_counter()
            log.info("hellaswag: %d/%d examples, acc_norm %.4f, %.1f examples/s", done, len(examples),
                     correct_norm / done, done / (last_report - started))
    return {"examples": len(examples), "acc": correct / len(examples), "acc_norm": correct_norm / len(examples)}
