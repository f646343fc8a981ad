"""The corpus a cache is built from: its files and their kinds, the content key, and reading them in pieces of
about a megabyte, cut where the tokens cannot change (so pieces tokenize on separate threads exactly as a whole).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from gpt_exp.config import DataConfig, DataSource
from gpt_exp.errors import DataError
from gpt_exp.data.filehash import FileHashes
from gpt_exp.tokenizer import TOKENIZER_ID

TEXT, JSONL, JSONL_GZ, PARQUET = "text", "jsonl", "jsonl.gz", "parquet"
_SUFFIXES = {".txt": TEXT, ".jsonl": JSONL, ".jsonl.gz": JSONL_GZ, ".parquet": PARQUET}
CACHE_VERSION = "shards-v1"  # part of the cache key: a new layout never reads an old entry
CHUNK_BYTES = 1 << 20  # the unit of work of a tokenizer thread (~250K tokens; small: a short tail at the end)
_PARQUET_BATCH_ROWS = 1024
_PARQUET_FIX = "write it again, or move it out of data.path"


# ---- the corpus: files, their kinds, the content key ----


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # TEXT, JSONL, JSONL_GZ or PARQUET
    size: int  # bytes on disk


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for suffix, kind in _SUFFIXES.items() if name.endswith(suffix)), None)


def _source(path: Path, kind: str) -> Source:
    return Source(path, kind, path.stat().st_size)


def source_files(cfg: DataConfig, key: str = "data.path") -> list[Source]:
    """The files of a corpus, in a fixed order (sorted by path); `key`: the setting that named its path."""
    if cfg.source == DataSource.shakespeare:
        return [_source(Path(str(resources.files("gpt_exp") / "assets" / "tinyshakespeare.txt")), TEXT)]
    path = Path(cfg.path).expanduser()
    if path.is_file():
        if path.name.lower().endswith(".gz") and _kind(path) != JSONL_GZ:
            raise DataError(f"{path} is compressed; only .jsonl.gz files are read compressed: decompress it first")
        return [_source(path, _kind(path) or TEXT)]  # a file named directly is text unless its suffix says otherwise
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _kind(p) and p.is_file())
        if not files:
            raise DataError(f"{key}={cfg.path} holds no .txt files (nor .jsonl, .jsonl.gz or .parquet); "
                            f"point it at a text file or a folder of them")
        return [_source(p, _kind(p)) for p in files]
    raise DataError(f"{key}={cfg.path} does not exist; give an existing file, or a folder of .txt, .jsonl, "
                    f".jsonl.gz or .parquet files")


def corpus_key(sources: list[Source], text_key: str, hashes: FileHashes) -> str:
    """The cache key: a hash of every file's content, kind and order, and of the tokenizer (files unchanged since a
    run hashed them are not read again)."""
    digest = hashlib.sha256(f"{TOKENIZER_ID}|{CACHE_VERSION}".encode())
    if any(s.kind != TEXT for s in sources):
        digest.update(f"|text_key={text_key}".encode())
    with ThreadPoolExecutor(min(8, len(sources))) as pool:
        for source, file_hash in zip(sources, pool.map(hashes.sha256, [s.path for s in sources])):
            digest.update(f"|{source.kind}|{source.size}|{file_hash}".encode())
    return digest.hexdigest()[:24]


# ---- reading: pieces of files, cut where the tokens cannot change ----


@dataclass(frozen=True)
class Cursor:
    """A position in the corpus: a file, an offset in it (a byte; a row for Parquet), the documents begun before."""

    file: int
    offset: int
    docs: int


@dataclass(frozen=True)
class Piece:
    """Part of one file, tokenized by a thread: bytes of a text file or whole JSON lines, or Parquet rows."""

    path: str
    kind: str
    data: Any  # bytes, or a pyarrow string array for Parquet
    offset: int  # where data starts in its file (a byte; a row for Parquet); offset 0 of a text file starts a document
    line: int = 1  # jsonl: the line number of data's first line

    @property
    def nbytes(self) -> int:
        return len(self.data) if isinstance(self.data, bytes) else self.data.nbytes


# (piece, the offset after it or None at the end of its file, bytes of the file read so far)
_Pieces = Iterator[tuple[Piece, int | None, int]]


def _char_before(data: bytes | bytearray, i: int) -> str:
    return bytes(data[max(0, i - 4) : i]).decode("utf-8", "replace")[-1:]


def _char_at(data: bytes | bytearray, i: int) -> str:
    return bytes(data[i : i + 4]).decode("utf-8", "replace")[:1]


def safe_cut(data: bytes | bytearray, lo: int = 0) -> int:
    """The last point in data[lo:] where a text splits into two that tokenize to the same tokens as the whole, or 0.

    That is before a space or after a newline with a non-space character on each side: gpt2's pre-tokenizer always
    breaks there and a space never ends a piece, so no piece crosses the cut. Only the last 64 KB are searched.
    """
    lo, hi = max(lo, len(data) - (1 << 16), 1), len(data) - 4  # the character after the cut must be whole
    if hi <= lo:
        return 0
    space, newline = data.rfind(b" ", lo, hi), data.rfind(b"\n", lo, hi)
    while max(space, newline) >= lo:
        i = max(space, newline)
        if not _char_before(data, i).isspace() and not _char_at(data, i + 1).isspace():
            return i if i == space else i + 1
        if i == space:
            space = data.rfind(b" ", lo, i)
        else:
            newline = data.rfind(b"\n", lo, i)
    return 0


def _line_cut(data: bytes | bytearray, lo: int = 0) -> int:
    return data.rfind(b"\n", lo) + 1


def _byte_pieces(f: BinaryIO, offset: int, stop: int | None, cut: Callable) -> Iterator[tuple[bytes, int, bool]]:
    """(data, its offset, at the end of the file) for pieces of up to CHUNK_BYTES from `offset` up to `stop`.

    A piece is cut in the CHUNK_BYTES from its start (more only where they hold no cut point), never in bytes read
    past them for the piece before: so the pieces after any piece's end are the same whether the reading began there
    (a resumed build) or earlier (a clean build), and so are the chunks and shards made of them.
    """
    buf, window, searched = bytearray(), CHUNK_BYTES, 0  # buf: the file from `offset` on, as far as read
    while True:
        want = window - len(buf) if stop is None else min(window, stop - offset) - len(buf)
        more = f.read(want) if want > 0 else b""
        buf += more
        if len(more) < want or (stop is not None and offset + len(buf) >= stop):  # the end of the file or the range
            if buf or offset == 0:  # an empty text file is still a document
                yield bytes(buf), offset, len(more) < want
            return
        at = cut(buf if len(buf) <= window else buf[:window], searched)
        if at <= 0:  # no cut point yet (a very long line or word): read on
            window, searched = window + CHUNK_BYTES, max(0, window - 8)
            continue
        yield bytes(buf[:at]), offset, False
        offset, window, searched = offset + at, CHUNK_BYTES, 0
        del buf[:at]


def _skip_lines(f: BinaryIO, n: int) -> int:
    """Read past the first n bytes of f; the newlines among them."""
    lines = 0
    while n > 0 and (block := f.read(min(n, 1 << 23))):
        lines, n = lines + block.count(b"\n"), n - len(block)
    return lines


@contextmanager
def _open_bytes(source: Source) -> Iterator[tuple[BinaryIO, Callable[[], int]]]:
    """A binary stream of the file's text (decompressed for .jsonl.gz) and a function giving its position on disk."""
    raw = open(source.path, "rb")
    try:
        yield (gzip.GzipFile(fileobj=raw) if source.kind == JSONL_GZ else raw), raw.tell
    finally:
        raw.close()


def _text_pieces(source: Source, first: int, stop: int | None) -> _Pieces:
    with _open_bytes(source) as (f, position):
        line = 1
        if source.kind == TEXT:
            f.seek(first)
        else:
            line += _skip_lines(f, first)
        cut = safe_cut if source.kind == TEXT else _line_cut
        for data, offset, eof in _byte_pieces(f, first, stop, cut):
            after = None if eof else offset + len(data)
            yield Piece(str(source.path), source.kind, data, offset, line), after, position()
            if source.kind != TEXT:
                line += data.count(b"\n")


def _read_pieces(source: Source, first: int, stop: int | None, text_key: str) -> _Pieces:
    """The pieces of a file from `first` to `stop`; its reading errors as one line."""
    try:
        if source.kind == PARQUET:
            yield from _parquet_pieces(source, first, stop, text_key)
        else:
            yield from _text_pieces(source, first, stop)
    except gzip.BadGzipFile as e:  # an OSError: first
        if not _starts_as_gzip(source.path):
            raise DataError(f"{source.path} is not a gzip file; name it .jsonl if it is not compressed") from None
        raise DataError(f"{source.path} is a corrupt gzip file ({e}); {_gzip_fix(source.path)}") from None
    except EOFError:
        raise DataError(f"{source.path} is truncated: its gzip stream ends early; {_gzip_fix(source.path)}") from None
    except zlib.error as e:
        raise DataError(f"{source.path} is a corrupt gzip file ({e}); {_gzip_fix(source.path)}") from None
    except OSError as e:
        raise DataError(f"cannot read {source.path} ({e.strerror or e}); check that it is a readable file") from None


def _starts_as_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _gzip_fix(path: Path) -> str:
    return f"compress or download it again (`gzip -t {path.name}` checks it)"


def _parquet_module(path: Path):
    try:
        import pyarrow.parquet as pq  # optional: only Parquet corpora need it
    except ImportError:
        raise DataError(f"{path} is a Parquet file: reading it needs pyarrow (pip install pyarrow)") from None
    return pq


def _parquet_pieces(source: Source, first: int, stop: int | None, text_key: str) -> _Pieces:
    pq = _parquet_module(source.path)
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(source.path)
    except pa.ArrowException as e:
        raise DataError(f"{source.path} is not a readable Parquet file ({str(e).splitlines()[0]}); "
                        f"{_PARQUET_FIX}") from None
    key, schema = text_key, pf.schema_arrow
    if key not in schema.names:
        raise DataError(f"{source.path} has no {key!r} column (it has: {', '.join(schema.names[:8])}); "
                        f"set data.text_key=COLUMN")
    if not (pa.types.is_string(schema.field(key).type) or pa.types.is_large_string(schema.field(key).type)):
        raise DataError(f"{source.path}: column {key!r} holds {schema.field(key).type}, not text; "
                        f"set data.text_key=COLUMN")
    try:
        yield from _row_group_pieces(source, pf, key, first, stop)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the disk's error, not the file's: _read_pieces says so
        raise DataError(f"{source.path} is a damaged Parquet file ({str(e).splitlines()[0]}); {_PARQUET_FIX}") from None


def _row_group_pieces(source: Source, pf: Any, key: str, first: int, stop: int | None) -> _Pieces:
    rows, stop = pf.metadata.num_rows, pf.metadata.num_rows if stop is None else stop
    row = 0
    for g in range(pf.num_row_groups):
        if row + pf.metadata.row_group(g).num_rows <= first:  # before `first`: skipped without reading it
            row += pf.metadata.row_group(g).num_rows
            continue
        # Each row group read on its own: pyarrow's batches run on across row groups, so a read that began at a later
        # group (a resumed build) would cut other pieces than one that began at the first.
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[g], columns=[key]):
            lo, hi = max(first - row, 0), min(batch.num_rows, stop - row)
            if hi > lo:
                done = row + hi
                yield (Piece(str(source.path), PARQUET, batch.column(0).slice(lo, hi - lo), row + lo),
                       None if done >= rows else done, source.size * done // rows)
            row += batch.num_rows
            if row >= stop:
                return


@dataclass(frozen=True)
class Chunk:
    pieces: list[Piece]
    end: tuple[int, int]  # (file, offset) where the corpus continues after this chunk
    position: int  # bytes of the corpus's files read up to its end
    nbytes: int  # bytes of text (and JSON) in it


def chunks(sources: list[Source], start: Cursor, stop: Cursor | None, text_key: str) -> Iterator[Chunk]:
    """The corpus from `start` to `stop` in chunks of up to CHUNK_BYTES: a piece of a big file, or the pieces of small
    files that fit together. A chunk ends before the piece that would overfill it, so it depends on its pieces only."""
    group, size, done = [], 0, sum(s.size for s in sources[: start.file])
    for i in range(start.file, len(sources) if stop is None else min(stop.file + 1, len(sources))):
        first = start.offset if i == start.file else 0
        last = stop.offset if stop is not None and i == stop.file else None
        if last == 0:
            break
        for piece, after, position in _read_pieces(sources[i], first, last, text_key):
            if group and size + piece.nbytes > CHUNK_BYTES:
                yield Chunk(group, end, read, size)
                group, size = [], 0
            group.append(piece)
            size += piece.nbytes
            end, read = ((i + 1, 0) if after is None else (i, after)), done + position
        done += sources[i].size
    if group:
        yield Chunk(group, end, read, size)
