"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written one.

The temp file (or dir) beside the target is named `.NAME.<host>.<pid>.<random>.tmp`, so that a later start can tell
one left by a killed writer (its process is gone) from one a live writer is still filling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterator

_HOST = socket.gethostname().replace(".", "-")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; once the block succeeds, fsync it and rename it onto `path`, with the
    permissions of any file the user creates (mkstemp's 0600 would hide a shared cache from a labmate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}.{os.getpid()}."


def make_temp_dir(path: Path) -> Path:
    """A new empty dir beside `path` to fill and then rename onto it, named as atomic_path's temp files are (so that
    remove_stale_temp_files takes it once its writer is killed), with the user's umask (mkdtemp's is 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete dir `new` in the place of `target` (which this run wrote before, or nothing): a reader sees
    the old dir or the new one, and a kill in between leaves the old one beside as `.NAME.old`, never a half dir."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)  # a kill between the renames of an earlier replace left it
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _writer_gone(tmp: Path) -> bool:
    """True when the temp file's writer was a process of this host that no longer runs."""
    parts = tmp.name.rsplit(".", 4)  # [.NAME, host, pid, random, tmp]
    if len(parts) != 5 or parts[1] != _HOST or not parts[2].isdigit():
        return False  # another host's writer (or not ours): it may still be writing
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a live process of another user
        return False
    return False


def remove_stale_temp_files(folder: Path, name_glob: str = "*") -> list[Path]:
    """Remove the temp files and dirs of atomic writes into `folder` whose writer was killed; returns them. Only
    what our naming made: a regular file or dir, never a symlink (nor what it points to)."""
    removed = []
    for p in folder.glob(f".{name_glob}.*.tmp") if folder.is_dir() else []:
        try:
            mode = p.lstat().st_mode
        except FileNotFoundError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) or not _writer_gone(p):
            continue  # not ours (we make no links, fifos or sockets), or a live writer's
        if stat.S_ISDIR(mode):
            shutil.rmtree(p, ignore_errors=True)  # never follows a symlink inside it; what cannot go stays
        else:
            p.unlink(missing_ok=True)
        if not p.exists():
            removed.append(p)
    return removed
