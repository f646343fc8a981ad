"""Pretokenizing big corpora: exact tokens from split documents and every format, shards crossed by the loader,
resume after an interruption, repair of one damaged shard, one-line errors, the val split by document, per-epoch
shard order, the `python -m gpt_exp.prepare` command and a smoke run of its benchmark."""

import errno
import gzip
import json
import logging
import os
import random
import resource
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt_exp.data import corpus as corpus_module
from gpt_exp.data import build
from gpt_exp.config import DataConfig, DataSource
from gpt_exp.errors import DataError
from gpt_exp.data.cache import ShardedTokens, prepare_tokens, split_tokens
from gpt_exp.data.loader import BatchLoader
from gpt_exp.data.corpus import safe_cut
from gpt_exp.tokenizer import EOT_TOKEN, gpt2_encoding
from tests.helpers import run_cli, run_cli_async

ENC = gpt2_encoding()
# Pieces of text where the gpt2 pre-tokenizer is delicate: runs of blank lines and spaces, CRLF, tabs, Unicode
# spaces (NBSP, ideographic, line separator), \x1c (a space to Python, not to the tokenizer), contractions, CJK.
ATOMS = ["the", "The", " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\r\n", "\t", " \n", "\n ", "'s", "'ll", "'", "123",
         ",", ".", "!?", "é", "naïve", "日本語", "。", "\u3000", "\u00a0", "\u2028", "\x1c", "\x0b", "\x85", "😀",
         "<|endoftext|>", "x", "  \n  ", "—", "a1b2", "__init__", "   \n\n   "]


def tricky_text(rng: random.Random, atoms: int) -> str:
    return "".join(rng.choice(ATOMS) for _ in range(atoms))


def expected(docs: list[str]) -> list[int]:
    """The corpus's tokens by definition: each whole document's encode_ordinary, <|endoftext|> between them."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        out += ([EOT_TOKEN] if i else []) + ENC.encode_ordinary(doc)
    return out


def text_cfg(path: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(source=DataSource.text, path=str(path), cache_dir=str(cache), **kw)


@pytest.fixture
def small_chunks(monkeypatch):
    """2 KB chunks: a small corpus is split, spread over threads and cut into shards like a big one."""
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 2048)


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """A folder of every format: a long text of blank lines and long lines (split many times), short and empty
    .txt files, .jsonl (text in "body", with a blank line) and .jsonl.gz; and its documents in order."""
    rng, root = random.Random(0), tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    long_doc = "".join(tricky_text(rng, 40) + rng.choice(["\n\n", "\n", " " * 30, "x" * 3000]) for _ in range(120))
    (root / "a_long.txt").write_text(long_doc)
    (root / "b_empty.txt").write_text("")
    bodies = ["First record.\n", "Second: naïve café\n\nwith a blank line", "third"]
    (root / "c.jsonl").write_text("\n".join(json.dumps({"id": i, "body": b}) for i, b in enumerate(bodies)) + "\n\n")
    gz = ["gz one", "gz two 日本語"]
    with gzip.open(root / "sub" / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": b}) + "\n" for b in gz))
    (root / "sub" / "e.txt").write_text("Short file.\r\nEnd")
    (root / "z_notes.md").write_text("not a corpus file: ignored")
    return root, [long_doc, "", *bodies, *gz, "Short file.\r\nEnd"]


def shard_mtimes(cache) -> list[int]:
    return [p.stat().st_mtime_ns for p in cache.shard_paths]


def test_cuts_never_change_tokens():
    rng = random.Random(1)
    assert safe_cut(",\n\xa0 x".encode()[:3]) == 0  # too short to see the character after the cut
    cuts = 0
    for _ in range(300):
        text = tricky_text(rng, rng.randint(1, 60))
        data, whole = text.encode(), ENC.encode_ordinary(text)
        for end in range(1, len(data)):  # every cut the reader could take, whatever its buffer holds
            if (at := safe_cut(data[:end])) > 0:
                cuts += 1
                assert ENC.encode_ordinary(data[:at].decode()) + ENC.encode_ordinary(data[at:].decode()) == whole
    assert cuts > 1000


def test_every_format_gives_whole_document_tokens_in_shards(corpus, tmp_path, small_chunks):
    root, docs = corpus
    cache = prepare_tokens(text_cfg(root, tmp_path / "c", text_key="body", shard_tokens=3000, threads=2))
    tokens = cache.load()
    assert tokens[:].tolist() == expected(docs)
    assert cache.num_tokens == sum(len(ENC.encode_ordinary(d)) for d in docs) + len(docs) - 1
    assert cache.num_documents == len(docs) == 8
    sizes = [len(s) for s in tokens.shards]
    assert len(sizes) >= 3 and all(n >= 3000 for n in sizes[:-1])  # a shard ends at the first chunk past 3000 tokens


def test_batches_cross_shard_boundaries(corpus, tmp_path, small_chunks):
    root, docs = corpus
    tokens = prepare_tokens(text_cfg(root, tmp_path / "c", text_key="body", shard_tokens=3000)).load()
    stream, bounds = torch.tensor(expected(docs)), np.cumsum([len(s) for s in tokens.shards])
    loader, crossed = BatchLoader(tokens, B=4, T=64), 0
    for _ in range(loader.batches_per_epoch):
        start = loader.position
        x, y = loader.next_batch()
        assert torch.equal(x.flatten(), stream[start : start + 256])
        assert torch.equal(y.flatten(), stream[start + 1 : start + 257])
        crossed += int(any(start < b < start + 257 for b in bounds))
    assert crossed >= 2


def test_interrupted_prepare_resumes_with_the_missing_shards(corpus, tmp_path, small_chunks, monkeypatch, caplog):
    root, docs = corpus
    cfg, real = text_cfg(root, tmp_path / "c", text_key="body", shard_tokens=3000), build._write_shards
    caplog.set_level(logging.INFO, logger="gpt_exp")

    def interrupted_after_two(*args):
        for i, shard in enumerate(real(*args)):
            yield shard
            if i == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(build, "_write_shards", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(cfg)
    cache_dir = tmp_path / "c"
    kept = sorted(cache_dir.glob("*.bin"))
    assert len(kept) == 2 and not list(cache_dir.glob("*.json"))  # no manifest: the entry is not complete
    mtimes = [p.stat().st_mtime_ns for p in kept]
    (cache_dir / f".{kept[0].name[:24]}-00002.bin.x.tmp").write_bytes(b"half a shard from a kill -9")

    monkeypatch.setattr(build, "_write_shards", real)
    cache = prepare_tokens(cfg)
    assert "resuming an interrupted prepare: 2 shard(s) already built" in caplog.text
    assert shard_mtimes(cache)[:2] == mtimes and len(cache.shard_paths) > 2  # only the missing shards were built
    assert cache.load()[:].tolist() == expected(docs)
    assert not list(cache_dir.glob(".*.tmp")) and not list(cache_dir.glob("*.progress"))


def cache_files(cache_dir: Path) -> dict[str, bytes]:
    """The entry's manifest and shards by name (not the lock, nor the memo of file hashes)."""
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir()) if p.suffix in (".json", ".bin")
            and p.name != "file-hashes.json"}


def parquet_corpus(tmp_path: Path, monkeypatch) -> Path:
    """300 rows in row groups of 16, read in pieces of 7 rows: pyarrow's batches run across the row groups."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setattr(corpus_module, "_PARQUET_BATCH_ROWS", 7)
    rng = random.Random(2)
    docs = [tricky_text(rng, rng.randint(0, 80)) for _ in range(300)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "rows.parquet", row_group_size=16)
    return tmp_path / "rows.parquet"


@pytest.mark.parametrize("kind", ["files", "parquet"])
def test_a_build_interrupted_anywhere_equals_a_clean_build(kind, corpus, tmp_path, small_chunks, monkeypatch):
    """Interrupted after a random number of chunks (mid-shard or at a shard's end), again and again, each time
    resumed: the manifest and every shard are the clean build's, byte for byte (so is the data order of every epoch)."""
    if kind == "files":
        path, options = corpus[0], dict(text_key="body", shard_tokens=3000)
    else:
        path, options = parquet_corpus(tmp_path, monkeypatch), dict(shard_tokens=500)
    prepare_tokens(text_cfg(path, tmp_path / "clean", threads=2, **options))
    clean = cache_files(tmp_path / "clean")
    cfg, real = text_cfg(path, tmp_path / "c", threads=3, **options), build._encoded
    rng, interrupted = random.Random(3), 0

    def interrupted_after(n: int):
        def encoded(*args):
            for i, item in enumerate(real(*args)):
                if i == n:
                    raise KeyboardInterrupt
                yield item
        return encoded

    for _ in range(5):
        monkeypatch.setattr(build, "_encoded", interrupted_after(rng.randint(1, 4)))
        try:
            prepare_tokens(cfg)
        except KeyboardInterrupt:
            interrupted += 1
    monkeypatch.setattr(build, "_encoded", real)
    prepare_tokens(cfg)
    resumed = cache_files(tmp_path / "c")
    assert interrupted == 5 and len(clean) >= 5 and list(resumed) == list(clean)
    assert [name for name in clean if resumed[name] != clean[name]] == []  # the files that differ


def shakespeare_corpus(root: Path, copies: int) -> Path:
    """`copies` shuffles of tiny shakespeare's lines (1.1 MB each) as one long .txt, plus .jsonl, .jsonl.gz and small
    .txt files: a long file cut into many pieces and small files grouped into chunks."""
    lines = (resources.files("gpt_exp") / "assets" / "tinyshakespeare.txt").read_text().splitlines(keepends=True)
    rng = random.Random(5)
    root.mkdir()
    with open(root / "a_long.txt", "w") as f:
        for _ in range(copies):
            f.write("".join(rng.sample(lines, len(lines))))
    records = ["".join(rng.sample(lines, 40)) for _ in range(2000)]
    (root / "b.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in records[:1500]))
    write_jsonl_gz(root / "c.jsonl.gz", [json.dumps({"text": r}) for r in records[1500:]])
    for i in range(30):
        (root / f"d{i:02d}.txt").write_text(records[i])
    return root


def shards_listed(cache_dir: Path) -> int:
    """How many shards the progress file of the build in `cache_dir` lists (0 before it has one)."""
    try:
        return len(json.loads(next(cache_dir.glob("*.progress")).read_text())["shards"])
    except (StopIteration, FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow  # 15-30 s on 2 cores; test_a_build_interrupted_anywhere_equals_a_clean_build is its fast variant
def test_a_build_killed_at_random_points_equals_a_clean_build(tmp_path):
    """`kill -9` at 4 random points of a `python -m gpt_exp.prepare`, each followed by the same command: its temp
    files are cleaned up and the manifest and every shard end up the clean build's, byte for byte."""
    root = shakespeare_corpus(tmp_path / "corpus", copies=12)  # 15 MB: 8 shards of 2 chunks of 1 MB
    args = ["data=text", f"data.path={root}", "data.shard_tokens=500000"]
    clean = run_cli("prepare", *args, f"data.cache_dir={tmp_path / 'clean'}", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    clean_files = cache_files(tmp_path / "clean")
    total, rng, cache_dir = len(clean_files) - 1, random.Random(11), tmp_path / "c"
    assert total >= 8
    for target in sorted(rng.sample(range(1, total - 2), 4)):
        proc = run_cli_async("prepare", *args, f"data.cache_dir={cache_dir}", cwd=tmp_path)
        while shards_listed(cache_dir) < target and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.1))  # at a shard's end or into the next one: in a write, in a tokenizer thread
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL and not list(cache_dir.glob("*.json"))  # killed before it was done
    resumed = run_cli("prepare", *args, f"data.cache_dir={cache_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming an interrupted prepare" in resumed.stdout
    assert not list(cache_dir.glob(".*.tmp")) and not list(cache_dir.glob("*.progress"))
    files = cache_files(cache_dir)
    assert list(files) == list(clean_files)
    assert [name for name in clean_files if files[name] != clean_files[name]] == []  # the files that differ


def test_cache_files_follow_the_umask(tmp_path, small_chunks):
    """A shared token cache: under umask 022 the shards, the manifest and the hash memo are readable by all."""
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"Document number {i}. " * 200)
    old = os.umask(0o022)
    try:
        cache = prepare_tokens(text_cfg(tmp_path / "docs", tmp_path / "c", shard_tokens=1))
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "c").iterdir()}
    assert len(cache.shard_paths) == 6 and len(modes) == 9  # the shards, the manifest, the memo and the lock
    assert set(modes.values()) == {"0o644"}, modes


def progress_shards(cache_dir: Path) -> list[str]:
    return [s["file"] for s in json.loads(next(cache_dir.glob("*.progress")).read_text())["shards"]]


def test_a_full_disk_mid_shard_is_one_line_and_leaves_no_half_shard(corpus, tmp_path, small_chunks, monkeypatch):
    root, _ = corpus
    cfg = text_cfg(root, tmp_path / "c", text_key="body", shard_tokens=3000)
    prepare_tokens(text_cfg(root, tmp_path / "clean", text_key="body", shard_tokens=3000))

    class FillingDisk:  # the third shard's file: one chunk's tokens written, then half of the next and ENOSPC
        def __init__(self, path, mode):
            self.f, self.third, self.writes = open(path, mode), "-00002.bin." in str(path), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.writes += 1
            if self.third and self.writes == 2:
                self.f.write(bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

    monkeypatch.setattr(build, "open", FillingDisk, raising=False)  # the open() that _write_shards calls
    with pytest.raises(DataError) as error:
        prepare_tokens(cfg)
    assert str(error.value) == (f"cannot write the token cache in {tmp_path / 'c'} (No space left on device): free "
                                f"disk space there, or set data.cache_dir=DIR on another disk; the finished shards "
                                f"are kept for the next run")
    shards = sorted(p.name for p in (tmp_path / "c").glob("*.bin"))
    assert len(shards) == 2 and progress_shards(tmp_path / "c") == shards  # none half-written, none unlisted
    assert not list((tmp_path / "c").glob(".*.tmp")) and not list((tmp_path / "c").glob("*.json"))
    monkeypatch.delattr(build, "open")
    prepare_tokens(cfg)
    assert cache_files(tmp_path / "c") == cache_files(tmp_path / "clean")


def test_a_shard_over_the_file_size_limit_is_one_line_and_the_next_run_goes_on(tmp_path):
    """`ulimit -f` below the second shard: exit 2, one line naming the limit, the first shard kept and no half of the
    second; without the limit the same command goes on from the first and builds what a clean build does."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("the " * 200_000)  # 200,001 tokens: a 400 KB shard
    (tmp_path / "docs" / "b.txt").write_text("7 " * 400_000)  # 400K tokens: an 800 KB shard
    args = ["data=text", f"data.path={tmp_path / 'docs'}", f"data.cache_dir={tmp_path / 'c'}", "data.shard_tokens=1000"]
    limit = 600_000

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run([sys.executable, "-m", "gpt_exp.prepare", *args], cwd=tmp_path, preexec_fn=small_files,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr == (f"error: cannot write the token cache in {tmp_path / 'c'} (File too large): a shard is "
                             f"over the file size limit (ulimit -f): raise it, or lower data.shard_tokens=1000; the "
                             f"finished shards are kept for the next run\n")
    [kept] = (tmp_path / "c").glob("*.bin")
    assert progress_shards(tmp_path / "c") == [kept.name] and kept.stat().st_size == 400_002
    assert not list((tmp_path / "c").glob(".*.tmp")) and not list((tmp_path / "c").glob("*.json"))
    resumed = run_cli("prepare", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming an interrupted prepare: 1 shard(s) already built" in resumed.stdout
    prepare_tokens(text_cfg(tmp_path / "docs", tmp_path / "clean", shard_tokens=1000))
    assert cache_files(tmp_path / "c") == cache_files(tmp_path / "clean")


def test_a_damaged_shard_is_rebuilt_alone(corpus, tmp_path, small_chunks, caplog):
    root, docs = corpus
    cfg = text_cfg(root, tmp_path / "c", text_key="body", shard_tokens=3000)
    cache = prepare_tokens(cfg)
    before = shard_mtimes(cache)
    with open(cache.shard_paths[1], "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with open(cache.shard_paths[2], "r+b") as f:
        f.truncate(10)
    killed_repair = cache.shard_paths[1].parent / f".{cache.shard_paths[1].name}.host.4321.x1y2.tmp"
    killed_repair.write_bytes(b"half a shard from a repair killed with kill -9")
    rebuilt = prepare_tokens(cfg)
    assert not killed_repair.exists()
    assert caplog.text.count("is corrupt (checksum mismatch); rebuilding it") == 1
    assert caplog.text.count("is truncated or missing; rebuilding it") == 1
    after = shard_mtimes(rebuilt)
    assert after[0] == before[0] and after[3:] == before[3:] and after[1] != before[1] and after[2] != before[2]
    assert rebuilt.load()[:].tolist() == expected(docs)


def write_jsonl_gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text"}\n'), r"a\.jsonl:3 has no 'text' field \(it has: body\); set data\.text_key=FIELD"),
        (lambda d: (d / "a.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n'), r"a\.jsonl:2: 'text' is int, not a string"),
        (lambda d: (d / "a.jsonl").write_text('{"text": "ok"\n'), r"a\.jsonl:1 is not valid JSON"),
        (lambda d: (d / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), r"a\.jsonl:2 is not UTF-8 \(byte 28: b'\\xe9'\)"),
        (lambda d: (d / "a.jsonl.gz").write_text('{"text": "plain, not gzip"}\n'), r"a\.jsonl\.gz is not a gzip file"),
        (lambda d: (d / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "cut"}\n' * 100)[:-30]), r"a\.jsonl\.gz is truncated"),
        (lambda d: (d / "big.txt").write_bytes(b"word " * 2000 + b"caf\xe9" + b" more" * 100), r"big\.txt is not UTF-8 \(byte 10003: b'\\xe9'\)"),
    ],
    ids=["jsonl without the key", "text not a string", "bad json", "jsonl not utf-8", "not gzip",
         "truncated gzip", "not utf-8 deep in a split file"],
)
def test_bad_corpus_is_one_clear_error_and_leaves_nothing(tmp_path, small_chunks, make, message):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "0_first.txt").write_text("A good document first, so that shards get written.\n" * 100)
    make(tmp_path / "corpus")
    with pytest.raises(DataError, match=message):
        prepare_tokens(text_cfg(tmp_path / "corpus", tmp_path / "c", shard_tokens=100))
    left = [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # nothing that could pass for a cache entry, or half of one


def test_records_with_empty_texts_are_an_empty_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    write_jsonl_gz(tmp_path / "corpus" / "a.jsonl.gz", ['{"text": ""}', '{"text": ""}'])
    with pytest.raises(DataError, match=r"the corpus at .*corpus/a\.jsonl\.gz is empty"):
        prepare_tokens(text_cfg(tmp_path / "corpus", tmp_path / "c"))
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []


def test_compressed_text_is_refused(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"text"))
    with pytest.raises(DataError, match=r"a\.txt\.gz is compressed; only \.jsonl\.gz files are read compressed"):
        prepare_tokens(text_cfg(tmp_path / "a.txt.gz", tmp_path / "c"))


def test_parquet_rows_are_documents(tmp_path, small_chunks, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setattr(corpus_module, "_PARQUET_BATCH_ROWS", 7)  # pieces of 7 rows: shards end inside row groups

    rng = random.Random(2)
    docs = [tricky_text(rng, rng.randint(0, 80)) for _ in range(60)]
    table = pa.table({"id": list(range(60)), "content": docs})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=16)
    cfg = text_cfg(tmp_path / "rows.parquet", tmp_path / "c", text_key="content", shard_tokens=500)
    cache = prepare_tokens(cfg)
    assert cache.load()[:].tolist() == expected(docs) and len(cache.shard_paths) >= 3
    with open(cache.shard_paths[1], "r+b") as f:  # rebuilt from its starting row
        f.truncate(4)
    assert prepare_tokens(cfg).load()[:].tolist() == expected(docs)
    with pytest.raises(DataError, match=r"rows\.parquet has no 'text' column \(it has: id, content\)"):
        prepare_tokens(text_cfg(tmp_path / "rows.parquet", tmp_path / "c"))


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"rows\.parquet is a Parquet file: reading it needs pyarrow \(pip install"):
        prepare_tokens(text_cfg(tmp_path / "rows.parquet", tmp_path / "c"))


def test_val_split_holds_out_whole_documents(tmp_path):
    (tmp_path / "docs").mkdir()
    docs = [f"Document {i}: " + "words and more words. " * (i % 7 + 1) for i in range(50)]
    for i, doc in enumerate(docs):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(doc)
    tokens = prepare_tokens(text_cfg(tmp_path / "docs", tmp_path / "c")).load()
    train, val = split_tokens(tokens, 0.1)
    held_out = [i for i in range(50) if ((i + 1) * 0.6180339887498949) % 1 < 0.1]
    assert held_out == [4, 12, 25, 33, 46]  # spread over the corpus, the same on every run
    eot = [EOT_TOKEN]
    assert val[:].tolist() == sum((ENC.encode_ordinary(docs[i]) + eot for i in held_out), [])
    kept = [i for i in range(50) if i not in held_out]
    assert train[:].tolist() == sum((ENC.encode_ordinary(docs[i]) + eot for i in kept), [])[:-1]
    assert len(train) + len(val) == len(tokens) and (train.num_documents, val.num_documents) == (45, 5)
    again_train, again_val = split_tokens(prepare_tokens(text_cfg(tmp_path / "docs", tmp_path / "c")).load(), 0.1)
    assert again_val[:].tolist() == val[:].tolist() and again_train[:].tolist() == train[:].tolist()


def test_too_few_documents_hold_out_the_tail(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(3):  # no document of 3 passes the rule at 0.1
        (tmp_path / "docs" / f"{i}.txt").write_text(f"Document {i} " * 50)
    tokens = prepare_tokens(text_cfg(tmp_path / "docs", tmp_path / "c")).load()
    train, val = split_tokens(tokens, 0.1)
    assert len(val) == int(len(tokens) * 0.1) > 0 and val[:].tolist() == tokens[len(train) :].tolist()


def synthetic_shards(sizes: list[int]) -> ShardedTokens:
    starts = np.cumsum([0, *sizes])
    return ShardedTokens([np.arange(a, a + n, dtype=np.uint16) for a, n in zip(starts, sizes)])


def test_epochs_after_the_first_shuffle_the_shards_and_resume_exactly():
    tokens = synthetic_shards([100, 120, 80, 100, 91])  # 491 tokens: 49 batches of B*T+1 = 11
    loader = BatchLoader(tokens, B=1, T=10, shuffle_seed=0)
    first_epoch = [loader.next_batch()[0] for _ in range(loader.batches_per_epoch)]
    assert loader.epoch == 1 and torch.equal(torch.cat(first_epoch).flatten(), torch.arange(490))  # stored order
    second = torch.cat([loader.next_batch()[0] for _ in range(49)]).flatten().tolist()
    shuffled = tokens.shuffled(0, 1)[:].tolist()
    assert second == shuffled[:490] and second != list(range(490)) and sorted(shuffled) == list(range(491))
    assert [shuffled[i] // 100 for i in (0, 100)] != [0, 1]  # whole shards moved, each in its own order
    assert shuffled == tokens.shuffled(0, 1)[:].tolist() != tokens.shuffled(0, 2)[:].tolist()
    resumed = BatchLoader(tokens, B=1, T=10, shuffle_seed=0)
    resumed.load_state_dict(loader.state_dict())
    for _ in range(60):  # through the wrap into the fourth epoch
        assert torch.equal(resumed.next_batch()[0], loader.next_batch()[0])
    assert loader.epoch == 3
    assert BatchLoader(tokens, B=1, T=10).tokens is tokens  # without a seed no epoch is shuffled
    one = synthetic_shards([490])
    assert one.shuffled(0, 3)[:].tolist() == one[:].tolist()  # one shard: every epoch reads the same


def test_prepare_command_builds_the_cache_the_run_reads(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gpt_exp")
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"Document number {i}. " * 40)
    result = run_cli("prepare", "data=text", f"data.path={tmp_path / 'docs'}", f"data.cache_dir={tmp_path / 'c'}",
                     "model=tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    n = len(expected([f"Document number {i}. " * 40 for i in range(3)]))
    assert f"tokenized 3 document(s): {n:,} tokens" in result.stdout
    assert f"token cache ready: {n:,} tokens" in result.stdout
    cache = prepare_tokens(text_cfg(tmp_path / "docs", tmp_path / "c"))
    assert "token cache hit" in caplog.text and cache.num_tokens == n


@pytest.mark.parametrize(
    "args, line",
    [
        (["data=text", "data.path={tmp}/nope"], "error: data.path={tmp}/nope does not exist"),
        (["data=text", "data.path={tmp}/a.jsonl"], "error: {tmp}/a.jsonl:1 has no 'text' field (it has: body); set data.text_key=FIELD"),
        (["data.shard_tokens=0"], "error: data.shard_tokens=0 is invalid: it must be >= 1"),
        (["data.text_kye=x"], "error: unknown config key 'data.text_kye'; did you mean data.text_key?"),
    ],
)
def test_prepare_command_errors_are_one_line(tmp_path, args, line):
    (tmp_path / "a.jsonl").write_text('{"body": "no text key"}\n')
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_cli("prepare", f"data.cache_dir={tmp_path / 'c'}", *args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(line.format(tmp=tmp_path)), result.stderr


def test_benchmark_smoke(tmp_path):
    bench = Path(__file__).parents[1] / "bench" / "prepare.py"
    result = subprocess.run([sys.executable, str(bench), "--mb", "1", "--small-mb", "0.5", "--repeat", "1"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "one tiktoken thread" in result.stdout and "ratio" in result.stdout and "peak RSS" in result.stdout
