"""The token cache: a corpus tokenized once (data/build.py) into uint16 shards keyed by its content, checked, locked
while one process builds it, and read back memory-mapped as one token stream, split into train and val.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from filelock import FileLock, Timeout

from gpt_exp.config import DataConfig
from gpt_exp.errors import ConfigError, DataError
from gpt_exp.data.corpus import corpus_key, source_files
from gpt_exp.data.filehash import FileHashes
from gpt_exp.data.build import build_cache, manifest_path, read_manifest, repair_shards, shard_problems
from gpt_exp.tokenizer import EOT_TOKEN

log = logging.getLogger(__name__)

_GOLDEN = (5**0.5 - 1) / 2  # frac((i + 1) * golden ratio) spreads documents evenly over [0, 1)
_SCAN_TOKENS = 1 << 24  # tokens per block when looking for document starts: memory stays flat


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt_exp" / "tokens"


class ShardedTokens:
    """A token stream over memory-mapped shards: len(), tokens[i] and tokens[a:b] across shard boundaries (a slice
    inside one shard is a view; one across shards copies only itself). `spans` lists its (shard, start, stop) pieces
    in stream order: whole shards, or what a val split or a shuffled epoch keeps of them."""

    def __init__(self, shards: list[np.ndarray], spans: np.ndarray | None = None, num_documents: int = 1):
        if spans is None:
            spans = np.array([(i, 0, len(s)) for i, s in enumerate(shards)], dtype=np.int64).reshape(-1, 3)
        self.shards, self.num_documents = shards, num_documents
        self.spans = spans[spans[:, 2] > spans[:, 1]]
        self._ends = np.cumsum(self.spans[:, 2] - self.spans[:, 1])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("ShardedTokens slices take no step")
            return self._read(start, max(start, stop))
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError(f"token {index} is out of range for {len(self)} tokens")
        return self._read(i, i + 1)[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        parts, k = [], int(np.searchsorted(self._ends, start, side="right"))
        while start < stop:
            shard, lo, hi = (int(v) for v in self.spans[k])
            span_start = int(self._ends[k]) - (hi - lo)
            a, b = lo + start - span_start, min(hi, lo + stop - span_start)
            parts.append(self.shards[shard][a:b])
            start, k = start + b - a, k + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)

    def take(self, ranges: np.ndarray | list, num_documents: int = 1) -> ShardedTokens:
        """The stream made of `ranges` ([start, stop) rows, in order) of this one, cut where its spans end."""
        r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        r = r[r[:, 1] > r[:, 0]]
        first = np.searchsorted(self._ends, r[:, 0], side="right")
        counts = np.searchsorted(self._ends, r[:, 1] - 1, side="right") - first + 1  # spans each range touches
        which = np.repeat(np.arange(len(r)), counts)
        k = first[which] + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        span_start = (self._ends - (self.spans[:, 2] - self.spans[:, 1]))[k]  # in stream coordinates
        lo = np.maximum(r[which, 0], span_start) - span_start + self.spans[k, 1]
        hi = np.minimum(r[which, 1], self._ends[k]) - span_start + self.spans[k, 1]
        return ShardedTokens(self.shards, np.stack([self.spans[k, 0], lo, hi], axis=1), num_documents)

    def shuffled(self, seed: int, epoch: int) -> ShardedTokens:
        """The same spans grouped by shard, the shards in an order drawn from (seed, epoch)."""
        rank = np.empty(len(self.shards), dtype=np.int64)
        rank[np.random.default_rng([seed, epoch]).permutation(len(self.shards))] = np.arange(len(self.shards))
        order = np.argsort(rank[self.spans[:, 0]], kind="stable")
        return ShardedTokens(self.shards, self.spans[order], self.num_documents)

    def document_starts(self) -> np.ndarray:
        """Where each document starts: at 0 and after every <|endoftext|> (gpt2 never encodes text as that token)."""
        def scan(start: int) -> np.ndarray:
            return np.flatnonzero(self[start : start + _SCAN_TOKENS] == EOT_TOKEN) + (start + 1)

        with ThreadPoolExecutor(8) as pool:  # numpy compares without the GIL
            found = list(pool.map(scan, range(0, len(self), _SCAN_TOKENS)))
        return np.concatenate([np.zeros(1, dtype=np.int64), *found])


@dataclass(frozen=True)
class TokenCache:
    manifest_path: Path
    shard_paths: tuple[Path, ...]
    shard_tokens: tuple[int, ...]
    num_tokens: int
    num_documents: int

    def load(self) -> ShardedTokens:
        shards = [np.memmap(p, dtype=np.uint16, mode="r", shape=(n,)) if n else np.empty(0, dtype=np.uint16)
                  for p, n in zip(self.shard_paths, self.shard_tokens)]
        return ShardedTokens(shards, num_documents=self.num_documents)


def _token_cache(cache_dir: Path, key: str, manifest: dict) -> TokenCache:
    shards = manifest["shards"]
    return TokenCache(manifest_path(cache_dir, key), tuple(cache_dir / s["file"] for s in shards),
                      tuple(s["num_tokens"] for s in shards), manifest["num_tokens"], manifest["num_documents"])


def _check(cfg: DataConfig) -> None:
    if cfg.shard_tokens < 1:
        raise ConfigError(f"data.shard_tokens={cfg.shard_tokens} is invalid: it must be >= 1, e.g. 100000000")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"data.threads={cfg.threads} is invalid: it must be >= 1, or null for one per core")
    if not cfg.text_key:
        raise ConfigError("data.text_key='' is invalid: name the field that holds the text, e.g. data.text_key=text")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the cache entry's file lock: one process builds it while the others wait, then read what it wrote."""
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is tokenizing this corpus into %s; waiting for it", path.parent)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def prepare_tokens(cfg: DataConfig, key: str = "data.path") -> TokenCache:
    """The corpus's token cache: read back when a complete, intact entry for the same content exists; otherwise built
    (or resumed, or its damaged shards rebuilt) here, under a file lock so that parallel first runs build it once.
    `key`: the setting that named the corpus's path (a mixture's data.sources.NAME.path), for its errors."""
    _check(cfg)
    sources = source_files(cfg, key)
    where = str(sources[0].path) if len(sources) == 1 else cfg.path
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    hashes = FileHashes(cache_dir)  # a file unchanged since an earlier run hashed it is not read again
    key = corpus_key(sources, cfg.text_key, hashes)
    manifest = read_manifest(cache_dir, key)
    if manifest is not None and not shard_problems(cache_dir, manifest["shards"], hashes):
        log.info("token cache hit: %s", manifest_path(cache_dir, key))
        hashes.save()
        return _token_cache(cache_dir, key, manifest)
    if not any(s.size for s in sources):
        raise DataError(f"the corpus at {where} is empty; give a file with text")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _locked(cache_dir / f"{key}.lock"):
            manifest = read_manifest(cache_dir, key)  # built or repaired by the process that held the lock before us?
            if manifest is None:
                manifest = build_cache(sources, cache_dir, key, cfg, where)
            else:
                damaged = shard_problems(cache_dir, manifest["shards"], hashes)
                for i, problem in damaged:
                    log.warning("token cache %s is %s; rebuilding it", cache_dir / manifest["shards"][i]["file"], problem)
                repair_shards(sources, cache_dir, key, manifest, [i for i, _ in damaged], cfg)
                if not damaged:
                    log.info("token cache hit: %s", manifest_path(cache_dir, key))
            hashes.save()
            return _token_cache(cache_dir, key, manifest)
    except OSError as e:
        raise DataError(f"cannot write the token cache in {cache_dir} ({e.strerror}); "
                        f"set data.cache_dir=WRITABLE_DIR") from None


def _runs(starts: np.ndarray, selected: np.ndarray, num_tokens: int) -> np.ndarray:
    """[start, stop) token ranges of the runs of consecutive selected documents (each with its trailing separator)."""
    edges = np.append(starts, num_tokens)
    flips = np.diff(np.concatenate([[0], selected.astype(np.int8), [0]]))
    return np.stack([edges[np.flatnonzero(flips == 1)], edges[np.flatnonzero(flips == -1)]], axis=1)


def split_tokens(tokens: ShardedTokens | np.ndarray, val_fraction: float) -> tuple[ShardedTokens, ShardedTokens]:
    """Hold out documents for validation: document i (from 0) when frac((i + 1) * golden ratio) < val_fraction, a
    fixed and evenly spread sample; a corpus of one document, or of too few for the rule to pick one, holds out the
    tail of its token stream instead. Nothing is copied: both parts are spans of the same shards."""
    if not isinstance(tokens, ShardedTokens):
        tokens = ShardedTokens([np.asarray(tokens)])
    n = len(tokens)
    if val_fraction > 0 and tokens.num_documents > 1:
        starts = tokens.document_starts()
        held_out = np.modf((np.arange(len(starts)) + 1) * _GOLDEN)[0] < val_fraction
        if held_out.any():
            return (tokens.take(_runs(starts, ~held_out, n), int((~held_out).sum())),
                    tokens.take(_runs(starts, held_out, n), int(held_out.sum())))
    n_val = int(n * val_fraction)
    return tokens.take([[0, n - n_val]], tokens.num_documents), tokens.take([[n - n_val, n]], 1)
