"""Bits per byte: each gpt2 token's UTF-8 length (<|endoftext|> 0 bytes), val_bpb of the Trainer's evaluation against
a hand computation on known text, and val_bpb in metrics.jsonl, W&B, summary.json and compare."""

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gpt_exp import compare
from gpt_exp.data.loader import BatchLoader
from gpt_exp.tokenizer import EOT_TOKEN, gpt2_encoding, token_byte_lengths
from tests.helpers import make_trainer, only_run_dir, read_metrics, run_cli, wandb_records

# two documents with 2- and 3-byte characters, some split over tokens
DOC_A = "Naïve café owners in Zürich serve crème brûlée; 東京 has ramen. "
DOC_B = "The quick brown fox jumps over the lazy dog — twice, at 9:30!"


def test_byte_lengths_of_the_gpt2_tokens():
    lengths = token_byte_lengths()
    enc = gpt2_encoding()
    assert len(lengths) == 50257 and lengths[EOT_TOKEN] == 0
    assert (lengths[15496], lengths[995]) == (5, 6)  # "Hello", " world"
    for text in (DOC_A, DOC_B):  # a text's tokens add up to its bytes, characters split over tokens included
        assert sum(lengths[t] for t in enc.encode_ordinary(text)) == len(text.encode("utf-8"))
    # 62 characters, 6 of them 2 bytes and 2 of them 3 bytes; 61 characters, one of them (the dash) 3 bytes
    assert (len(DOC_A.encode()), len(DOC_B.encode())) == (62 + 6 + 2 * 2, 61 + 2) == (72, 63)


@pytest.fixture
def trainer(cache_dir):
    return make_trainer(cache_dir, "train.eval_every=1", "data.val_fraction=0.1", "train.eval_batches=2")


def stream() -> list[int]:
    enc = gpt2_encoding()
    return [EOT_TOKEN] + enc.encode_ordinary(DOC_A) + [EOT_TOKEN] + enc.encode_ordinary(DOC_B)


@torch.no_grad()
def test_val_bpb_matches_a_hand_computation(trainer):
    tokens = stream()
    B, T = 2, (len(tokens) - 1) // 4  # 2 batches of 2 x T: the targets are all but the last few tokens
    trainer.val_loader = BatchLoader(np.array(tokens, dtype=np.uint16), B, T)
    val_loss, val_bpb = trainer.evaluate()

    model, enc = trainer.model.eval(), gpt2_encoding()
    nats, n_tokens, n_bytes, model_losses = 0.0, 0, 0, []
    for b in range(2):
        buf = torch.tensor(tokens[b * B * T : (b + 1) * B * T + 1])
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        logits, loss = model(x, y)
        nats += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").sum().item()
        n_tokens += y.numel()
        model_losses.append(loss.item())
        targets = y.flatten().tolist()  # their text: <|endoftext|> is no text, and counts 0 bytes
        n_bytes += len(enc.decode_bytes([t for t in targets if t != EOT_TOKEN]))
    assert n_tokens == 4 * T
    assert val_loss == pytest.approx(nats / n_tokens, rel=1e-6)
    assert val_loss == pytest.approx(sum(model_losses) / 2, rel=1e-6)  # the model's own loss, as before
    assert val_bpb == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-6)
    # the targets are the whole stream but its first token (<|endoftext|>) and its last ones: their bytes are the
    # two documents' (72 + 63) less the bytes of the tokens left over
    left_over = tokens[4 * T + 1 :]
    assert n_bytes == 72 + 63 - len(enc.decode_bytes(left_over))
    assert val_bpb == pytest.approx(val_loss * n_tokens / (math.log(2) * n_bytes), rel=1e-9)


def test_a_run_records_val_bpb_everywhere(tmp_path, cache_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    result = run_cli("run", "data=text", f"data.path={corpus}", "model=tiny", "B=2", "T=16", "train.max_steps=4",
                     "train.eval_every=2", "train.eval_batches=2", "data.val_fraction=0.2", "logger.mode=offline",
                     f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    val = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 3] and all(set(r) == {"step", "val_loss", "val_bpb", "tokens"} for r in val)
    # one text: this corpus's tokens are ~3.6 bytes each, so bpb is about the loss / (ln 2 x 3.6)
    assert all(0.2 < r["val_bpb"] * math.log(2) / r["val_loss"] < 0.5 for r in val)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_val_bpb"] == val[-1]["val_bpb"] and summary["best_val_bpb"] == min(r["val_bpb"] for r in val)
    assert f"val bpb {val[-1]['val_bpb']:.4f}" in (run_dir / "run.log").read_text()
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    records = wandb_records(offline)
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["val_bpb"] for h in history if "val_bpb" in h] == pytest.approx([r["val_bpb"] for r in val])
    metrics = {r["metric"]["name"]: r["metric"] for r in records if r["type"] == "metric" and "name" in r["metric"]}
    assert metrics["val_bpb"]["summary"] == {"min": True}
    assert compare.main([str(run_dir), "--metric", "final_val_bpb", "--out", str(tmp_path / "report")]) == 0
    [row] = json.loads((tmp_path / "report" / "compare.json").read_text())
    assert row["final_val_bpb"] == summary["final_val_bpb"]


def test_loss_png_reads_val_bpb_on_a_right_axis():
    from gpt_exp.plots import loss_figure

    rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens": 64 * (s + 1)} for s in range(10)]
    rows += [{"step": 4, "val_loss": 4.8, "val_bpb": 4.8 * 0.4, "tokens": 320},
             {"step": 9, "val_loss": 4.2, "val_bpb": 4.2 * 0.4, "tokens": 640}]
    fig = loss_figure(rows, "run")
    [right] = fig.axes[0].child_axes  # matplotlib's secondary axis
    assert right.get_ylabel() == "val bits per byte"
    fig.canvas.draw()  # a secondary axis takes its limits when drawn
    low, high = fig.axes[0].get_ylim()
    assert right.get_ylim() == pytest.approx((low * 0.4, high * 0.4))  # val_bpb / val_loss of these batches
    without = loss_figure([r for r in rows if "val_bpb" not in r] + [{"step": 9, "val_loss": 4.2}], "older run")
    assert without.axes[0].child_axes == []
