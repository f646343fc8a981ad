"""sha256 of files, remembered across runs by each file's stat.

A run hashes its corpus (the cache key) and its token shards (their integrity) before training. At a few MB that
is instant; at 10B tokens it is ~60 GB to read at every start of every job of a sweep. The hashes are kept in the
cache dir with each file's size, mtime, ctime and inode, and a file whose stat is unchanged is not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gpt_exp.atomic import atomic_write_bytes, remove_stale_temp_files
from gpt_exp.errors import DataError

MEMO_NAME = "file-hashes.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 23):
                digest.update(block)  # releases the GIL: files hash in parallel threads
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None
    return digest.hexdigest()


def _signature(path: Path) -> list[int]:
    # Any write changes the size, the mtime or the ctime, and the ctime cannot be set back (touch -d sets the
    # mtime only), so an edit in place is seen even if the mtime is restored; a new file at the path has a new inode.
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class FileHashes:
    """The sha256 of files, read from the memo in `cache_dir` where the file's stat matches, else computed."""

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / MEMO_NAME
        try:
            known = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: everything is hashed anew
            known = {}
        self.known: dict = known if isinstance(known, dict) else {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        key, signature = str(path.resolve()), _signature(path)  # the stat before the read: a write during it shows
        entry = self.known.get(key)
        if isinstance(entry, dict) and entry.get("stat") == signature and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = file_sha256(path)
        self.known[key] = {"stat": signature, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        """Write the memo (atomically), without the entries of files that are gone. A cache dir that cannot be
        written loses nothing but the memo: the next run hashes again."""
        if not self.changed:
            return
        known = {path: entry for path, entry in self.known.items() if os.path.exists(path)}
        try:
            remove_stale_temp_files(self.path.parent, MEMO_NAME)  # a killed save's (its memo was not written)
            atomic_write_bytes(self.path, json.dumps(known).encode())
        except OSError:
            pass
        self.changed = False
