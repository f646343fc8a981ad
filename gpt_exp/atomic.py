"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written one.

The temp file beside the target is named `.NAME.<host>.<pid>.<random>.tmp`, so that a later start can tell a temp file
left by a killed writer (its process is gone) from one a live writer is still filling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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
    """Remove the temp files of atomic writes into `folder` whose writer was killed; returns them."""
    stale = [p for p in folder.glob(f".{name_glob}.*.tmp") if _writer_gone(p)] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
