"""Weighted data mixtures (data=mix): the exact-ratio schedule, rows from each source's own split, per-source
evaluation and tokens, each source cached once, bitwise resume, two gloo ranks, sweeps and compare, and bad mixtures
as one error line."""

import gzip
import json
import math
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gpt_exp import compare
from gpt_exp.data.cache import ShardedTokens
from gpt_exp.data.mixture import MixtureLoader, RowSchedule
from gpt_exp.run_reader import find_run_dirs
from gpt_exp.tokenizer import EOT_TOKEN, gpt2_encoding
from tests.helpers import cli_env, make_trainer, only_run_dir, read_metrics, run_cli

TINY = ["model=tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "B=4", "T=16", "logger.mode=disabled",
        "optim.warmup_steps=2"]


def write_corpora(root: Path) -> dict[str, Path]:
    """Three small corpora of three kinds: a .jsonl.gz file (1,139 tokens), a folder of .txt files (734) and one text
    file (1,600)."""
    root.mkdir(exist_ok=True)
    web = root / "web.jsonl.gz"
    with gzip.open(web, "wt") as f:
        for i in range(60):
            text = f"Web page {i}: the weather today is sunny with a chance of rain later."
            f.write(json.dumps({"text": text}) + "\n")
    code = root / "code"
    code.mkdir(exist_ok=True)
    for i in range(40):
        (code / f"f{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n")
    books = root / "books.txt"
    books.write_text("".join(f"Chapter {i}. It was a dark and stormy night; the rain fell in torrents.\n"
                             for i in range(80)))
    return {"web": web, "code": code, "books": books}


def sources_arg(paths: dict, weights: dict) -> str:
    return "data.sources={" + ", ".join(f"{n}: {{path: '{paths[n]}', weight: {w}}}" for n, w in weights.items()) + "}"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    return write_corpora(tmp_path_factory.mktemp("corpora"))


# ---- the schedule -------------------------------------------------------------------------------------------------


def test_the_schedule_keeps_every_source_within_one_row_of_its_share():
    # 3:1 over steps of 4 rows: every step exactly 3 and 1
    schedule = RowSchedule([3, 1])
    assert [i for i, _ in schedule.deal(8)] == [0, 0, 0, 1, 0, 0, 0, 1]
    # any weights: after every row each source is less than one row from its share, so any window of whole steps
    # is less than two rows (within one (B, T) block for B >= 2) from the window's share
    rng = np.random.default_rng(0)
    for trial in range(40):
        weights = [float(w) for w in rng.choice([0, 0.1, 0.5, 1, 2, 3, 7, 100], size=rng.integers(1, 6))]
        if not sum(weights):
            continue
        shares = [Fraction(w) / sum(Fraction(x) for x in weights) for w in weights]
        schedule, counts, history = RowSchedule(weights), [0] * len(weights), [[0] * len(weights)]
        rows_per_step = int(rng.integers(1, 9))
        for step in range(60):
            for i, j in schedule.deal(rows_per_step):
                assert j == counts[i]  # each source's rows are its next ones, in order
                counts[i] += 1
            history.append(list(counts))
            n = (step + 1) * rows_per_step
            assert all(abs(c - n * p) < 1 for c, p in zip(counts, shares)), (weights, counts, n)
        for a in range(0, 60, 7):
            for b in range(a + 1, 61, 5):
                window = (b - a) * rows_per_step
                assert all(abs(history[b][i] - history[a][i] - window * p) < 2 for i, p in enumerate(shares))
        assert all(c == 0 for c, w in zip(counts, weights) if w == 0)  # weight 0: never dealt a row


def _stream(first: int, n: int) -> ShardedTokens:
    return ShardedTokens([np.arange(first, first + n, dtype=np.uint16)])


def test_rows_come_from_each_sources_own_tokens_in_order_and_wrap_alone():
    # a: 10 rows of T=4 (41 tokens), b: 2 rows (9 tokens): b wraps every 2 of its rows, a goes on
    loader = MixtureLoader({"a": (1.0, _stream(1000, 41)), "b": (1.0, _stream(2000, 9))}, B=2, T=4)
    firsts = [row[0] for _ in range(4) for row in loader.next_tokens()]
    assert firsts == [1000, 2000, 1004, 2004, 1008, 2000, 1012, 2004]
    x, y = loader.next_batch()
    assert x.tolist() == [[1016, 1017, 1018, 1019], [2000, 2001, 2002, 2003]]
    assert y.tolist() == [[1017, 1018, 1019, 1020], [2001, 2002, 2003, 2004]]
    assert loader.tokens_drawn == {"a": 5 * 4, "b": 5 * 4}
    # two ranks deal the same rows and read their own halves: together, the one-process batch
    one = MixtureLoader({"a": (2.0, _stream(1000, 41)), "b": (1.0, _stream(2000, 9))}, B=4, T=4)
    ranks = [MixtureLoader({"a": (2.0, _stream(1000, 41)), "b": (1.0, _stream(2000, 9))}, B=2, T=4, rank=r,
                           world_size=2) for r in range(2)]
    for _ in range(5):
        assert np.array_equal(one.next_tokens(), np.concatenate([r.next_tokens() for r in ranks]))
    assert one.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_shuffled_rows_depend_on_the_seed_and_the_source():
    def firsts(seed, names=("a", "b")):
        loader = MixtureLoader({n: (1.0, _stream(1000, 401)) for n in names}, B=2, T=4, order="shuffled",
                               order_seed=seed)
        return [[int(row[0]) for row in loader.next_tokens()] for _ in range(100)]

    a = firsts(1)
    assert a == firsts(1) and a != firsts(2)
    assert sorted(r[0] for r in a) == list(range(1000, 1400, 4))  # one epoch: each of the 100 rows once
    assert [r[0] for r in a] != [r[1] for r in a]  # two sources of one length: two orders


# ---- a run: per-source tokens and evaluation --------------------------------------------------------------------


@torch.no_grad()
def test_per_source_and_overall_val_loss_and_bpb_match_a_hand_computation(tmp_path, corpora):
    trainer = make_trainer(tmp_path / "cache", *TINY, "data=mix", sources_arg(corpora, {"web": 3, "code": 1,
                           "books": 0}), "train.eval_every=1", "train.eval_batches=2", "B=2")
    val_loss, val_bpb, by_source = trainer.evaluate_sources()
    assert sorted(by_source) == [f"{m}/{n}" for m in ("val_bpb", "val_loss") for n in ("books", "code", "web")]
    model, enc = trainer.model.eval(), gpt2_encoding()
    totals = {}
    for name, loader in trainer.val_sources.items():
        tokens = np.asarray(loader.source[: 2 * 2 * 16 + 1], dtype=np.int64)  # its first 2 batches of B=2, T=16
        nats, n_bytes = 0.0, 0
        for b in range(2):
            buf = torch.from_numpy(tokens[b * 32 : b * 32 + 33])
            x, y = buf[:-1].view(2, 16), buf[1:].view(2, 16)
            logits, _ = model(x)
            nats += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").sum().item()
            n_bytes += len(enc.decode_bytes([t for t in y.flatten().tolist() if t != EOT_TOKEN]))
        totals[name] = (nats, 64, n_bytes)
        assert by_source[f"val_loss/{name}"] == pytest.approx(nats / 64, rel=1e-6)
        assert by_source[f"val_bpb/{name}"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-6)
    # overall: every source's evaluated tokens together (each evaluates 64), so val_loss is the sources' mean
    nats, n_bytes = sum(t[0] for t in totals.values()), sum(t[2] for t in totals.values())
    assert val_loss == pytest.approx(nats / 192, rel=1e-6)
    assert val_loss == pytest.approx(sum(by_source[f"val_loss/{n}"] for n in totals) / 3, rel=1e-6)
    assert val_bpb == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-6)
    assert trainer.evaluate() == (val_loss, val_bpb)


def test_a_run_logs_tokens_per_source_exactly_and_evaluates_weight_0(tmp_path, corpora):
    result = run_cli("run", *TINY, "data=mix", sources_arg(corpora, {"web": 3, "code": 1, "books": 0}),
                     "train.max_steps=4", "train.eval_every=2", "train.eval_batches=1",
                     f"data.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    # 4 rows a step, 3 of web and 1 of code in every step; books (weight 0) never
    assert [(r["tokens/web"], r["tokens/code"], r["tokens/books"]) for r in train] == [
        (48 * k, 16 * k, 0) for k in range(1, 5)]
    assert all(r["tokens"] == r["tokens/web"] + r["tokens/code"] + r["tokens/books"] for r in train)
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 3] and all(
        {"val_loss/books", "val_bpb/books", "val_loss/web", "val_loss/code"} <= r.keys() for r in val)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["tokens/web"], summary["tokens/code"], summary["tokens/books"]) == (192, 64, 0)
    assert summary["final_val_bpb/books"] == val[-1]["val_bpb/books"]
    assert summary["best_val_loss/web"] == min(r["val_loss/web"] for r in val)
    log = (run_dir / "run.log").read_text()
    splits = dict(re.findall(r"source (\w+) \(weight \S+\): [\d,]+ tokens \(train ([\d,]+)", log))
    assert sorted(splits) == ["books", "code", "web"]
    # web's and code's train splits (books is not trained on)
    assert summary["train_split_tokens"] == sum(int(splits[n].replace(",", "")) for n in ("web", "code"))


# ---- resume ---------------------------------------------------------------------------------------------------------


def test_a_stopped_and_resumed_mixture_gives_the_straight_losses_bitwise(tmp_path, corpora, cache_dir):
    common = [*TINY, "data=mix", sources_arg(corpora, {"web": 2, "code": 1, "books": 0}), "data.order=shuffled",
              "optim.schedule=constant", f"data.cache_dir={tmp_path / 'cache'}"]
    for name in ("straight", "stopped", "resumed"):
        (tmp_path / name).mkdir()
    assert run_cli("run", *common, "train.max_steps=6", cwd=tmp_path / "straight").returncode == 0
    straight = [r for r in read_metrics(only_run_dir(tmp_path / "straight")) if "loss" in r]
    stopped = run_cli("run", *common, "train.max_steps=3", "train.ckpt_every=3", cwd=tmp_path / "stopped")
    assert stopped.returncode == 0, stopped.stderr
    checkpointed = only_run_dir(tmp_path / "stopped")
    resumed = run_cli("run", f"resume={checkpointed}", "train.max_steps=6", "logger.mode=disabled",
                      cwd=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    rows = [r for r in read_metrics(only_run_dir(tmp_path / "resumed")) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(6))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]  # bitwise
    # 4 rows a step at 2:1: web has 8/3 rows a step, within one row at every step, and the same after the resume
    assert [r["tokens/web"] // 16 for r in rows] == [3, 5, 8, 11, 13, 16]
    assert [r["tokens/web"] for r in rows] == [r["tokens/web"] for r in straight]
    assert all(abs(r["tokens/web"] // 16 - (r["step"] + 1) * 8 / 3) < 1 for r in rows)

    # a resume that changes a weight is refused in one line, and leaves no run behind
    (tmp_path / "changed").mkdir()
    changed = run_cli("run", f"resume={checkpointed}", "train.max_steps=6", "logger.mode=disabled",
                      sources_arg(corpora, {"web": 5, "code": 1, "books": 0}), cwd=tmp_path / "changed")
    assert changed.returncode == 2
    assert changed.stderr.startswith("error: resume: data.sources={books: {weight: 0}, code: {weight: 1}, web: "
                                     "{weight: 2}} is how the checkpoint mixed its data, not {books: {weight: 0}, "
                                     "code: {weight: 1}, web: {weight: 5}}") and changed.stderr.count("\n") == 1
    assert not (tmp_path / "changed" / "outputs").exists() or not find_run_dirs(tmp_path / "changed" / "outputs")
    # the command's mapping replaces the checkpoint's: one source fewer is a change, refused too
    (tmp_path / "fewer").mkdir()
    fewer = run_cli("run", f"resume={checkpointed}", "train.max_steps=6", "logger.mode=disabled",
                    sources_arg(corpora, {"web": 2, "code": 1}), cwd=tmp_path / "fewer")
    assert fewer.returncode == 2 and "mixed its data, not {code: {weight: 1}, web: {weight: 2}};" in fewer.stderr
    # and so is another kind of data
    (tmp_path / "other").mkdir()
    other = run_cli("run", f"resume={checkpointed}", "train.max_steps=6", "logger.mode=disabled", "data=shakespeare",
                    f"data.cache_dir={cache_dir}", cwd=tmp_path / "other")
    assert other.returncode == 2 and other.stderr.startswith(
        "error: resume: the checkpoint was trained on a data=mix mixture; resume with its data settings")


# ---- caches, sweeps, compare ---------------------------------------------------------------------------------------


def cache_entries(cache: Path) -> dict[str, int]:
    """The cache's shards and manifests (not its memo of file hashes), each with its modification time."""
    return {p.name: p.stat().st_mtime_ns for p in cache.iterdir()
            if p.suffix == ".bin" or (p.suffix == ".json" and p.name != "file-hashes.json")}


def test_a_weight_sweep_reuses_each_sources_cache_and_compare_ranks_by_a_source(tmp_path, corpora):
    cache = tmp_path / "cache"
    mix = ["data=mix", sources_arg(corpora, {"web": 1, "code": 1}), f"data.cache_dir={cache}"]
    prepared = run_cli("prepare", *mix, cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.count("token cache ready") == 2
    built = cache_entries(cache)
    assert sum(name.endswith(".bin") for name in built) == 2 and len(built) == 4  # one entry per source

    sweep = run_cli("run", "-m", *TINY, *mix, "data.sources.web.weight=1,3", "train.max_steps=2",
                    "train.eval_every=2", "train.eval_batches=1", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    assert cache_entries(cache) == built  # another weight tokenizes nothing
    run_dirs = find_run_dirs(tmp_path / "outputs")
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        log = (run_dir / "run.log").read_text()
        assert "tokenizing" not in log and log.count("token cache hit") == 2
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    assert sorted(s["tokens/web"] for s in summaries) == [64, 96]  # 2 steps of 4 rows: 1:1 and 3:1

    out = tmp_path / "report"
    assert compare.main([str(tmp_path / "outputs"), "--metric", "final_val_bpb/web", "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["final_val_bpb/web"] for r in rows] == sorted(s["final_val_bpb/web"] for s in summaries)
    assert {r["data.sources.web.weight"] for r in rows} == {1.0, 3.0}


# ---- two gloo ranks ----------------------------------------------------------------------------------------------


def test_two_ranks_read_the_one_process_mixture(tmp_path, corpora):
    common = [*TINY, "data=mix", sources_arg(corpora, {"web": 2, "code": 1}), "train.max_steps=3",
              "logger.mode=offline", f"data.cache_dir={tmp_path / 'cache'}"]
    (tmp_path / "one").mkdir(), (tmp_path / "ddp").mkdir(), (tmp_path / "tmp").mkdir()
    one = run_cli("run", *common, "logger.mode=disabled", cwd=tmp_path / "one")
    assert one.returncode == 0, one.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "gpt_exp.run", *common, "B=2"], cwd=tmp_path / "ddp",
                         env=cli_env(tmp_path / "ddp", {"TMPDIR": str(tmp_path / "tmp")}), capture_output=True,
                         text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    expected, rows = read_metrics(only_run_dir(tmp_path / "one")), read_metrics(only_run_dir(tmp_path / "ddp"))
    # the ratio over both ranks together: 2 rows each, 4 a step, web 8/3 of them
    assert [(r["tokens/web"], r["tokens/code"]) for r in rows] == [(48, 16), (80, 48), (128, 64)]
    assert [(r["tokens/web"], r["tokens/code"]) for r in rows] == [(r["tokens/web"], r["tokens/code"])
                                                                   for r in expected]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(rows, expected)) < 1e-4


# ---- bad mixtures: one line each ---------------------------------------------------------------------------------


BAD = [
    ("weights sum to 0", {"web": 0, "code": 0}, [],
     "error: data.sources={web: {weight: 0}, code: {weight: 0}} is invalid: the weights sum to 0"),
    ("negative weight", {"web": -1, "code": 1}, [], "error: data.sources.web.weight=-1.0 is invalid: it must be a "
     "finite number >= 0"),
    ("missing path", {"web": 1, "gone": 1}, [], "error: data.sources.gone.path={tmp}/gone.txt does not exist"),
    ("train split too small", {"web": 1, "tiny": 1}, [], "error: data.sources.tiny.path={tmp}/tiny.txt is too small: "
     "its train split has 5 tokens but one (B, T) block needs B*T+1 = 65"),
    ("val split too small", {"web": 1, "code": 1}, ["data.val_fraction=0.01", "train.eval_every=1"],
     "error: data.sources.code.path={corpora}/code is too small: its val split has"),
    ("no sources", None, [], "error: data.sources={} is invalid: data=mix needs sources with weights"),
    ("sources without data=mix", {"web": 1}, ["data=shakespeare"],
     "error: data.sources={web} is invalid: only data=mix reads data.sources; add data=mix"),
    ("path with data=mix", {"web": 1}, ["data.path={tmp}/tiny.txt"],
     "error: data.path={tmp}/tiny.txt is invalid: data=mix reads each source's own path"),
]


@pytest.mark.parametrize("case, weights, extra, expected", BAD, ids=[c[0] for c in BAD])
def test_a_bad_mixture_is_one_line(tmp_path, corpora, case, weights, extra, expected):
    (tmp_path / "tiny.txt").write_text("Too short here.\n")
    paths = {**corpora, "gone": tmp_path / "gone.txt", "tiny": tmp_path / "tiny.txt"}
    mix = [sources_arg(paths, weights)] if weights else []
    before = set(tmp_path.rglob("*"))
    group = [] if "data=shakespeare" in extra else ["data=mix"]
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    result = run_cli("run", *TINY, *group, *mix, *extra, "train.max_steps=1",
                     f"data.cache_dir={tmp_path.parent / 'bad-cache'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    expected = expected.replace("{tmp}", str(tmp_path)).replace("{corpora}", str(corpora["web"].parent))
    assert result.stderr.startswith(expected), result.stderr
    assert set(tmp_path.rglob("*")) == before  # nothing half-written: no run dir, no outputs/
