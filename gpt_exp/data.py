"""The data path: pretokenize a corpus once into a uint16 cache keyed by content, then stream (B, T) batches.

The loader is the lecture's DataLoaderLite: a B*T+1 token buffer, x = buf[:-1], y = buf[1:], wrapping at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from filelock import FileLock, Timeout

from gpt_exp.atomic import atomic_path, atomic_write_bytes
from gpt_exp.config import DataConfig, DataError, DataSource
from gpt_exp.tokenizer import EOT_TOKEN, TOKENIZER_ID, gpt2_encoding

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt_exp" / "tokens"


def source_files(cfg: DataConfig) -> list[Path]:
    """The documents of a corpus, in a fixed order (one file is one document)."""
    if cfg.source == DataSource.shakespeare:
        return [Path(str(resources.files("gpt_exp") / "assets" / "tinyshakespeare.txt"))]
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data.path={cfg.path} holds no .txt files; point it at a text file or a folder of .txt files")
        return files
    raise DataError(f"data.path={cfg.path} does not exist; give an existing text file or folder of .txt files")


def _read_documents(files: list[Path]) -> tuple[list[str], str]:
    """Decode every file as UTF-8 and hash the corpus (with the tokenizer) into the cache key."""
    digest = hashlib.sha256(TOKENIZER_ID.encode())
    texts = []
    for path in files:
        raw = path.read_bytes()
        digest.update(len(raw).to_bytes(8, "little"))  # document boundaries are part of the content
        digest.update(raw)
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                f"convert it, e.g. `iconv -f latin1 -t utf-8 {path.name}`"
            ) from None
    return texts, digest.hexdigest()[:24]


def _tokenize(texts: list[str]) -> np.ndarray:
    """gpt2 tokens of every document, an <|endoftext|> between documents."""
    enc = gpt2_encoding()
    encoded = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1) if len(texts) > 1 else [
        enc.encode_ordinary(texts[0])
    ]
    out: list[int] = []
    for i, ids in enumerate(encoded):
        if i:
            out.append(EOT_TOKEN)
        out.extend(ids)
    return np.array(out, dtype=np.uint16)  # the gpt2 vocab (50257) fits in 16 bits


@dataclass(frozen=True)
class TokenCache:
    bin_path: Path
    meta_path: Path
    num_tokens: int

    def load(self) -> np.memmap:
        return np.memmap(self.bin_path, dtype=np.uint16, mode="r", shape=(self.num_tokens,))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _cached(bin_path: Path, meta_path: Path) -> TokenCache | None:
    """A complete, intact cache entry, or None. The meta file is written last, so its presence marks completion;
    a token file whose size or checksum disagrees with it is reported and left to be rebuilt."""
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        meta["num_tokens"], meta["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        log.warning("token cache metadata %s is unreadable; rebuilding the entry", meta_path)
        return None
    if not bin_path.exists() or bin_path.stat().st_size != 2 * meta["num_tokens"]:
        log.warning("token cache %s is truncated or missing; rebuilding it", bin_path)
        return None
    if _sha256(bin_path) != meta["sha256"]:
        log.warning("token cache %s is corrupt (checksum mismatch); rebuilding it", bin_path)
        return None
    return TokenCache(bin_path, meta_path, meta["num_tokens"])


def _build_cache(texts: list[str], files: list[Path], bin_path: Path, meta_path: Path) -> TokenCache:
    n_bytes = sum(len(t) for t in texts)
    t0 = time.perf_counter()
    tokens = _tokenize(texts)
    dt = time.perf_counter() - t0
    log.info("tokenized %d document(s), %.1f MB in %.2f s (%.1f MB/s)", len(texts), n_bytes / 1e6, dt, n_bytes / 1e6 / dt)
    with atomic_path(bin_path) as tmp:
        tokens.tofile(tmp)
    meta = {"num_tokens": int(tokens.size), "sha256": _sha256(bin_path), "num_documents": len(texts),
            "tokenizer": TOKENIZER_ID, "dtype": "uint16", "sources": [str(p) for p in files[:10]]}
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    return TokenCache(bin_path, meta_path, int(tokens.size))


def prepare_tokens(cfg: DataConfig) -> TokenCache:
    """Tokenize the corpus into the cache unless a complete entry for the same content exists.

    Any number of runs may start at once on one cache: a file lock lets exactly one tokenize while the
    others wait, then read what it wrote.
    """
    files = source_files(cfg)
    texts, key = _read_documents(files)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    bin_path, meta_path = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    hit = _cached(bin_path, meta_path)
    if hit is not None:
        log.info("token cache hit: %s", bin_path)
        return hit
    if not any(texts):
        raise DataError(f"the corpus at {files[0] if len(files) == 1 else cfg.path} is empty; give a file with text")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(cache_dir / f"{key}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("another process is tokenizing this corpus into %s; waiting for it", cache_dir)
            lock.acquire()
        try:
            hit = _cached(bin_path, meta_path)  # built by the process that held the lock before us?
            if hit is not None:
                log.info("token cache hit: %s", bin_path)
                return hit
            return _build_cache(texts, files, bin_path, meta_path)
        finally:
            lock.release()
    except OSError as e:
        raise DataError(f"cannot write the token cache in {cache_dir} ({e.strerror}); set data.cache_dir=WRITABLE_DIR") from None


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the tail of the stream for validation; slices of a memmap stay memmaps (no copy)."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


class BatchLoader:
    """Streams (x, y) batches of shape (B, T) through the token stream; in DDP each rank takes its own stride.

    overfit_batches=N > 0 cycles the first N batches (of this rank) forever.
    """

    def __init__(self, tokens: np.ndarray, B: int, T: int, rank: int = 0, world_size: int = 1, overfit_batches: int = 0):
        self.tokens, self.B, self.T = tokens, B, T
        self.rank, self.world_size, self.overfit_batches = rank, world_size, overfit_batches
        needed = B * T * world_size + 1
        if len(tokens) < needed:
            raise DataError(
                f"the data has {len(tokens):,} tokens but one batch needs B*T+1 = {needed:,}; lower B or T (or add data)"
            )
        self.reset()

    def reset(self) -> None:
        """Back to this rank's first batch (evaluation reads the same val batches every time)."""
        self.position, self.batches_in_cycle, self.epoch = self._start, 0, 0

    @property
    def _start(self) -> int:
        return self.B * self.T * self.rank

    @property
    def _stride(self) -> int:
        return self.B * self.T * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self.tokens) // self._stride

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.B * self.T
        buf = torch.from_numpy(self.tokens[self.position : self.position + n + 1].astype(np.int64))
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        self.position += self._stride
        self.batches_in_cycle += 1
        if self.overfit_batches and self.batches_in_cycle == self.overfit_batches:
            self.position, self.batches_in_cycle = self._start, 0
        elif self.position + self._stride + 1 > len(self.tokens):
            # the next batch would run past the end: wrap around, as the lecture's loader does
            self.position, self.epoch = self._start, self.epoch + 1
        return x, y

    def state_dict(self) -> dict:
        return {"position": self.position, "batches_in_cycle": self.batches_in_cycle, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.batches_in_cycle, self.epoch = state["position"], state["batches_in_cycle"], state["epoch"]
