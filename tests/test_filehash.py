import hashlib
import json
import os
import subprocess
import sys

import pytest

from gpt_exp.data import filehash
from gpt_exp.errors import DataError
from gpt_exp.data.filehash import MEMO_NAME, FileHashes


@pytest.fixture
def reads(monkeypatch):
    """The paths whose contents were read to hash them."""
    seen = []
    real = filehash.file_sha256
    monkeypatch.setattr(filehash, "file_sha256", lambda path: seen.append(path.name) or real(path))
    return seen


def test_unchanged_files_are_not_read_again(tmp_path, reads):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be")
    want = hashlib.sha256(b"to be or not to be").hexdigest()
    hashes = FileHashes(tmp_path / "cache")
    assert hashes.sha256(corpus) == want
    hashes.save()
    assert FileHashes(tmp_path / "cache").sha256(corpus) == want  # the next run: from the memo
    assert reads == ["corpus.txt"]
    saved = json.loads((tmp_path / "cache" / MEMO_NAME).read_text())
    assert saved[str(corpus.resolve())]["sha256"] == want


def test_a_changed_file_is_hashed_again_even_with_its_old_mtime(tmp_path, reads):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be")
    hashes = FileHashes(tmp_path)
    hashes.sha256(corpus)
    hashes.save()
    mtime = corpus.stat().st_mtime_ns
    corpus.write_text("to be or NOT to be")  # same size
    os.utime(corpus, ns=(mtime, mtime))  # and the old mtime: the ctime still moves
    assert FileHashes(tmp_path).sha256(corpus) == hashlib.sha256(b"to be or NOT to be").hexdigest()
    assert reads == ["corpus.txt", "corpus.txt"]


def test_a_broken_memo_is_ignored_and_gone_files_are_dropped(tmp_path, reads):
    (tmp_path / MEMO_NAME).write_text("{not json")
    kept, gone = tmp_path / "kept.txt", tmp_path / "gone.txt"
    kept.write_text("a")
    gone.write_text("b")
    hashes = FileHashes(tmp_path)
    hashes.sha256(kept), hashes.sha256(gone)
    gone.unlink()
    hashes.save()
    assert list(json.loads((tmp_path / MEMO_NAME).read_text())) == [str(kept.resolve())]


def test_an_unreadable_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read .*missing.txt"):
        FileHashes(tmp_path).sha256(tmp_path / "missing.txt")


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from gpt_exp.data.filehash import FileHashes
hashes = FileHashes(Path(sys.argv[1]))
hashes.sha256(Path(sys.argv[2]))
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed with the memo's temp file written, not renamed
hashes.save()
"""


def test_a_killed_save_leaves_no_temp_file_after_the_next_save(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be")
    killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "cache"), str(corpus)])
    assert killed.returncode == -9
    [left] = (tmp_path / "cache").glob(f".{MEMO_NAME}.*.tmp")
    name, host, _, random, tmp = left.name.rsplit(".", 4)  # .NAME.host.pid.random.tmp
    live = tmp_path / "cache" / ".".join([name, host, str(os.getpid()), random, tmp])
    live.write_text("{}")  # a save in progress in a live process (this one): kept
    hashes = FileHashes(tmp_path / "cache")
    assert hashes.changed is False and hashes.sha256(corpus) == hashlib.sha256(b"to be or not to be").hexdigest()
    hashes.save()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([MEMO_NAME, live.name])
