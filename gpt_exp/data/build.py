"""Tokenize a corpus into the token cache's uint16 shards, streaming, on every core (what `python -m gpt_exp.prepare`
and a run's first start do).

Reads .txt (a document per file), .jsonl(.gz) and .parquet (a document per record); the run builds the same cache.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple
from pathlib import Path
from typing import Iterator

import numpy as np
import tiktoken

from gpt_exp.atomic import atomic_path, atomic_write_bytes
from gpt_exp.config import DataConfig
from gpt_exp.errors import DataError
from gpt_exp.data.corpus import CACHE_VERSION, PARQUET, TEXT, Chunk, Cursor, Piece, Source, chunks
from gpt_exp.data.filehash import FileHashes
from gpt_exp.tokenizer import EOT_TOKEN, TOKENIZER_ID, gpt2_encoding

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 5.0
_EOT = np.array([EOT_TOKEN], dtype=np.uint16)
_thread = threading.local()


# ---- tokenizing: on every core, in order ----


def _decode(data: bytes, path: str, offset: int, where: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where or path} is not UTF-8 (byte {offset + e.start}: {data[e.start:e.start + 1]!r}); "
                        f"convert it, e.g. `iconv -f latin1 -t utf-8 {Path(path).name}`") from None


def _json_text(line: bytes, path: str, where: str, offset: int, text_key: str) -> str:
    try:
        record = json.loads(_decode(line, path, offset, where))
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e.msg}, column {e.colno}); write one object per line") from None
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object; write one object per line, its text in {text_key!r}")
    if text_key not in record:
        raise DataError(f"{where} has no {text_key!r} field (it has: {', '.join(list(record)[:8])}); "
                        f"set data.text_key=FIELD")
    if not isinstance(record[text_key], str):
        raise DataError(f"{where}: {text_key!r} is {type(record[text_key]).__name__}, not a string; make it a string, "
                        f"or set data.text_key=FIELD")
    return record[text_key]


def _documents(piece: Piece, text_key: str) -> Iterator[tuple[str, bool]]:
    """(text, whether it starts a document) for the texts in a piece."""
    if piece.kind == TEXT:
        yield _decode(piece.data, piece.path, piece.offset), piece.offset == 0
    elif piece.kind == PARQUET:
        for i, text in enumerate(piece.data.to_pylist()):
            if not isinstance(text, str):
                raise DataError(f"{piece.path} row {piece.offset + i}: {text_key!r} is null; drop or fill that row")
            yield text, True
    else:
        offset = piece.offset
        for i, line in enumerate(piece.data.split(b"\n")):
            if line.strip():  # blank lines are no documents
                yield _json_text(line, piece.path, f"{piece.path}:{piece.line + i}", offset, text_key), True
            offset += len(line) + 1


def _thread_encoding() -> tiktoken.Encoding:
    """This thread's own copy of gpt2 (the same ranks and pattern): tiktoken's regex runs ~25% slower in every thread
    but the first one to use an Encoding, so each tokenizer thread gets one of its own (built in ~0.03 s)."""
    if not hasattr(_thread, "enc"):
        gpt2 = gpt2_encoding()
        _thread.enc = tiktoken.Encoding(gpt2.name, pat_str=gpt2._pat_str, mergeable_ranks=gpt2._mergeable_ranks,
                                        special_tokens=gpt2._special_tokens, explicit_n_vocab=gpt2.n_vocab)
    return _thread.enc


def encode_pieces(pieces: list[Piece], text_key: str) -> tuple[np.ndarray, int]:
    """The gpt2 tokens of `pieces`, an <|endoftext|> before every document that starts in them; and how many do."""
    enc = _thread_encoding()
    parts, docs = [], 0
    for piece in pieces:
        for text, starts_document in _documents(piece, text_key):
            if starts_document:
                parts.append(_EOT)
                docs += 1
            # encode_ordinary's tokens, as an array: no list of Python ints to build
            parts.append(enc.encode_to_numpy(text, disallowed_special=()).astype(np.uint16))
    return (np.concatenate(parts) if parts else np.empty(0, np.uint16)), docs


def _encoded(chunks: Iterator[Chunk], text_key: str, threads: int) -> Iterator[tuple[Chunk, tuple[np.ndarray, int]]]:
    """(chunk, its tokens and documents) in corpus order, encoded by `threads` threads (tiktoken lets go of the GIL
    while it encodes); at most 2 chunks per thread in flight, so memory stays flat however big the corpus."""
    encode = functools.partial(encode_pieces, text_key=text_key)
    gpt2_encoding()  # loaded once, before the threads copy it
    pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(encode, chunk.pieces)))
            if len(pending) >= 2 * threads:
                chunk, future = pending.popleft()
                yield chunk, future.result()
        while pending:
            chunk, future = pending.popleft()
            yield chunk, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error or Ctrl-C: the chunks being encoded finish first


# ---- writing: shards, the progress file, the manifest ----


def shard_path(cache_dir: Path, key: str, index: int) -> Path:
    return cache_dir / f"{key}-{index:05d}.bin"


def manifest_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.json"


def _progress_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.progress"  # not .json: nothing that could pass for a manifest


class _Progress:
    """A line with MB/s and tokens/s every few seconds while shards are written, and the rates at the end."""

    def __init__(self, total_bytes: int):
        self.total, self.t0, self.last, self.nbytes, self.tokens = max(total_bytes, 1), time.perf_counter(), 0.0, 0, 0

    def update(self, chunk: Chunk, tokens: int) -> None:
        self.nbytes, self.tokens = self.nbytes + chunk.nbytes, self.tokens + tokens
        now = time.perf_counter()
        if now - max(self.last, self.t0) >= PROGRESS_SECONDS:
            self.last, dt = now, now - self.t0
            log.info("prepare: %3.0f%% | %s MB, %.1f MB/s | %s tokens, %.2fM tok/s", 100 * chunk.position / self.total,
                     f"{self.nbytes / 1e6:,.1f}", self.nbytes / 1e6 / dt, f"{self.tokens:,}", self.tokens / 1e6 / dt)

    def summary(self) -> str:
        dt, mb = max(time.perf_counter() - self.t0, 1e-9), self.nbytes / 1e6
        return f"{mb:,.1f} MB in {dt:.2f} s ({mb / dt:.1f} MB/s, {self.tokens / dt / 1e6:.2f}M tok/s)"


def _write_shards(encoded: Iterator, cache_dir: Path, key: str, index: int, cursor: Cursor, shard_tokens: float,
                  progress: _Progress) -> Iterator[dict]:
    """Shards of at least `shard_tokens` tokens (ending at a chunk boundary), each written atomically; their entries."""
    pending = next(encoded, None)
    while pending is not None:
        path, start, n, digest = shard_path(cache_dir, key, index), cursor, 0, hashlib.sha256()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            while pending is not None and n < shard_tokens:
                chunk, (tokens, docs) = pending
                if docs and cursor.docs == 0:
                    tokens = tokens[1:]  # an <|endoftext|> goes between documents: none before the first
                f.write(tokens.data)
                digest.update(tokens.data)
                n, cursor = n + len(tokens), Cursor(*chunk.end, cursor.docs + docs)
                progress.update(chunk, len(tokens))
                pending = next(encoded, None)
        yield {"file": path.name, "num_tokens": n, "sha256": digest.hexdigest(), "start": astuple(start),
               "end": astuple(cursor)}
        index += 1


def _thread_count(threads: int | None) -> int:
    return threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _build(sources: list[Source], cache_dir: Path, key: str, text_key: str, start: Cursor, stop: Cursor | None,
           index: int, shard_tokens: float, threads: int, progress: _Progress) -> Iterator[dict]:
    """Tokenize the corpus from `start` to `stop` (the end if None) into shards numbered from `index`."""
    encoded = _encoded(chunks(sources, start, stop, text_key), text_key, threads)
    try:
        yield from _write_shards(encoded, cache_dir, key, index, start, shard_tokens, progress)
    finally:
        encoded.close()  # on an error or an interrupt: stop the threads now


def shard_problem(cache_dir: Path, shard: dict, hashes: FileHashes) -> str | None:
    """Why a shard cannot be used ("truncated or missing", "corrupt (checksum mismatch)"), or None."""
    path = cache_dir / shard["file"]
    if not path.exists() or path.stat().st_size != 2 * shard["num_tokens"]:
        return "truncated or missing"
    return None if hashes.sha256(path) == shard["sha256"] else "corrupt (checksum mismatch)"


def shard_problems(cache_dir: Path, shards: list[dict], hashes: FileHashes) -> list[tuple[int, str]]:
    """(index, problem) of every shard that fails its size or sha256 check (checked in parallel threads)."""
    threads = max(1, min(8, len(shards)))
    with ThreadPoolExecutor(threads) as pool:
        problems = list(pool.map(lambda s: shard_problem(cache_dir, s, hashes), shards))
    return [(i, p) for i, p in enumerate(problems) if p]


def read_manifest(cache_dir: Path, key: str) -> dict | None:
    """The manifest of a complete cache entry (written last, so it marks completion), or None (absent, unreadable)."""
    path = manifest_path(cache_dir, key)
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        if manifest["num_tokens"] != sum(s["num_tokens"] for s in shards) or not all(
                {"file", "sha256", "start", "end"} <= s.keys() for s in shards):
            raise ValueError("its shards disagree with it")
        return manifest
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache dir: writing it will say why)
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        log.warning("token cache manifest %s is unreadable (%s); rebuilding the entry", path, e)
        return None


def _resumable(cache_dir: Path, key: str) -> list[dict]:
    """The intact shards an interrupted build left, in order (up to the first damaged one)."""
    try:
        shards = json.loads(_progress_path(cache_dir, key).read_text())["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return []
    damaged = shard_problems(cache_dir, shards, FileHashes(cache_dir))  # a killed build's shards: none is memoized
    return shards[: damaged[0][0]] if damaged else shards


def _remove_entry(cache_dir: Path, key: str) -> None:
    for path in (*cache_dir.glob(f"{key}-*.bin"), _progress_path(cache_dir, key)):
        path.unlink(missing_ok=True)


def _remove_temp_files(cache_dir: Path, key: str) -> None:
    """The temp files of the entry's atomic writes that a killed build left: the caller holds the entry's lock, so
    no live process is writing one."""
    for stale in cache_dir.glob(f".{key}*.tmp"):
        stale.unlink(missing_ok=True)


def _write_error(e: OSError, cache_dir: Path, cfg: DataConfig) -> DataError:
    """A failed write into the cache as one line with its fix. A shard is renamed into place only once complete, so a
    failure leaves no half of one, and the finished ones are what the same command goes on from."""
    if e.errno == errno.EFBIG:
        fix = ("a shard is over the file size limit (ulimit -f): raise it, or lower "
               f"data.shard_tokens={cfg.shard_tokens}")
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space there, or set data.cache_dir=DIR on another disk"
    else:
        fix = "fix its permissions, or set data.cache_dir=WRITABLE_DIR"
    return DataError(f"cannot write the token cache in {cache_dir} ({e.strerror or e}): {fix}; "
                     f"the finished shards are kept for the next run")


def build_cache(sources: list[Source], cache_dir: Path, key: str, cfg: DataConfig, where: str) -> dict:
    """Tokenize the corpus into shards and write the manifest last; resumes the shards an interrupted build finished.

    The caller holds the cache lock. A corpus error removes the entry: fixing the corpus changes the key anyway.
    """
    _remove_temp_files(cache_dir, key)
    shards = _resumable(cache_dir, key)
    start = Cursor(*shards[-1]["end"]) if shards else Cursor(0, 0, 0)
    left, threads = sum(s.size for s in sources[start.file :]), _thread_count(cfg.threads)
    if shards:
        log.info("resuming an interrupted prepare: %d shard(s) already built; going on at file %d of %d, offset %s",
                 len(shards), start.file + 1, len(sources), f"{start.offset:,}")
    log.info("tokenizing %d file(s), %s MB, into %s (%d thread(s))", len(sources) - start.file,
             f"{left / 1e6:,.1f}", cache_dir, threads)
    progress = _Progress(sum(s.size for s in sources))
    try:
        for shard in _build(sources, cache_dir, key, cfg.text_key, start, None, len(shards), cfg.shard_tokens, threads,
                            progress):
            shards.append(shard)
            atomic_write_bytes(_progress_path(cache_dir, key), json.dumps({"shards": shards}).encode())
        num_tokens, num_documents = sum(s["num_tokens"] for s in shards), shards[-1]["end"][2] if shards else 0
        if num_tokens <= max(num_documents - 1, 0):  # nothing but the <|endoftext|> between documents
            raise DataError(f"the corpus at {where} is empty; give a file with text")
        manifest = {"version": CACHE_VERSION, "tokenizer": TOKENIZER_ID, "dtype": "uint16", "num_tokens": num_tokens,
                    "num_documents": num_documents, "text_key": cfg.text_key, "num_sources": len(sources),
                    "sources": [str(s.path) for s in sources[:10]], "shards": shards}
        atomic_write_bytes(manifest_path(cache_dir, key), json.dumps(manifest, indent=1).encode())
    except DataError:
        _remove_entry(cache_dir, key)
        raise
    except OSError as e:
        raise _write_error(e, cache_dir, cfg) from None
    _progress_path(cache_dir, key).unlink(missing_ok=True)
    log.info("tokenized %s document(s): %s tokens, %s, %d shard(s)", f"{num_documents:,}", f"{num_tokens:,}",
             progress.summary(), len(shards))
    return manifest


def repair_shards(sources: list[Source], cache_dir: Path, key: str, manifest: dict, indices: list[int],
                  cfg: DataConfig) -> None:
    """Rebuild damaged shards of a complete entry from where each began in the corpus (the caller holds the lock)."""
    _remove_temp_files(cache_dir, key)
    for i in indices:
        shard = manifest["shards"][i]
        start, stop = Cursor(*shard["start"]), Cursor(*shard["end"])
        progress = _Progress(sum(s.size for s in sources))
        threads = _thread_count(cfg.threads)
        try:
            [rebuilt] = _build(sources, cache_dir, key, cfg.text_key, start, stop, i, float("inf"), threads, progress)
        except OSError as e:
            raise _write_error(e, cache_dir, cfg) from None
        if rebuilt["sha256"] != shard["sha256"]:
            raise RuntimeError(f"rebuilt shard {shard['file']} differs from its manifest entry; delete the entry {key}")
        log.info("rebuilt shard %s: %s tokens, %s", shard["file"], f"{rebuilt['num_tokens']:,}", progress.summary())
