"""Every bad input to `python -m gpt_exp.prepare`: one `error:` line naming the problem and the fix, exit code 2, no
traceback, the user's folder as it was (nothing deleted or changed, the token cache's other entries kept) and nothing
new in it but lock files: no shard, manifest or temp file that a later run could take for part of an entry."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from gpt_exp.config import DataConfig, DataSource
from gpt_exp.data.cache import prepare_tokens
from tests.helpers import run_cli

NO_PYARROW = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="Parquet needs pyarrow")
TEXT = ["data=text", "data.shard_tokens=1000"]  # small shards: the first ones are written before a late error


def row(case: str, args: list[str], line: str, *marks) -> object:
    """A case: the arguments and the error line ("..." where it varies); {tmp} is the folder the fixture fills."""
    return pytest.param(args, line, id=case, marks=marks)


CASES = [
    row("missing path", [*TEXT, "data.path={tmp}/nope.txt"],
        "error: data.path={tmp}/nope.txt does not exist; give an existing file, or a folder of .txt, .jsonl, "
        ".jsonl.gz or .parquet files"),
    row("path without data=text", ["data.path={tmp}/good.txt"],
        "error: data.path={tmp}/good.txt is invalid: data=shakespeare reads no path; add data=text to train on ..."),
    row("data=text without path", ["data=text"],
        "error: data.path=null is invalid: data=text needs data.path=FILE_OR_DIR"),
    row("empty file", [*TEXT, "data.path={tmp}/empty.txt"],
        "error: the corpus at {tmp}/empty.txt is empty; give a file with text"),
    row("only empty records", [*TEXT, "data.path={tmp}/empty_records.jsonl"],
        "error: the corpus at {tmp}/empty_records.jsonl is empty; give a file with text"),
    row("not UTF-8", [*TEXT, "data.path={tmp}/latin1.txt"],
        "error: {tmp}/latin1.txt is not UTF-8 (byte 3: b'\\xe9'); convert it, e.g. `iconv -f latin1 -t utf-8 "
        "latin1.txt`"),
    row("not UTF-8 after 3 MB", [*TEXT, "data.path={tmp}/late_latin1"],
        "error: {tmp}/late_latin1/big.txt is not UTF-8 (byte 3000003: b'\\xe9'); convert it, e.g. `iconv -f latin1 -t "
        "utf-8 big.txt`"),
    row("jsonl line not JSON", [*TEXT, "data.path={tmp}/bad_line.jsonl"],
        "error: {tmp}/bad_line.jsonl:2 is not valid JSON (Unterminated string starting at, column 10); write one "
        "object per line"),
    row("jsonl line not an object", [*TEXT, "data.path={tmp}/list.jsonl"],
        "error: {tmp}/list.jsonl:1 is not a JSON object; write one object per line, its text in 'text'"),
    row("jsonl without the text key", [*TEXT, "data.path={tmp}/body.jsonl"],
        "error: {tmp}/body.jsonl:1 has no 'text' field (it has: id, body); set data.text_key=FIELD"),
    row("jsonl text not a string", [*TEXT, "data.path={tmp}/number.jsonl"],
        "error: {tmp}/number.jsonl:2: 'text' is int, not a string; make it a string, or set data.text_key=FIELD"),
    row("jsonl.gz truncated", [*TEXT, "data.path={tmp}/cut.jsonl.gz"],
        "error: {tmp}/cut.jsonl.gz is truncated: its gzip stream ends early; compress or download it again (`gzip -t "
        "cut.jsonl.gz` checks it)"),
    row("jsonl.gz corrupt", [*TEXT, "data.path={tmp}/crc.jsonl.gz"],
        "error: {tmp}/crc.jsonl.gz is a corrupt gzip file (CRC check failed ...); compress or download it again (`gzip "
        "-t crc.jsonl.gz` checks it)"),
    row("jsonl.gz not gzip", [*TEXT, "data.path={tmp}/plain.jsonl.gz"],
        "error: {tmp}/plain.jsonl.gz is not a gzip file; name it .jsonl if it is not compressed"),
    row("txt.gz", [*TEXT, "data.path={tmp}/text.txt.gz"],
        "error: {tmp}/text.txt.gz is compressed; only .jsonl.gz files are read compressed: decompress it first"),
    row("folder without corpus files", [*TEXT, "data.path={tmp}/notes"],
        "error: data.path={tmp}/notes holds no .txt files (nor .jsonl, .jsonl.gz or .parquet); point it at a text file "
        "or a folder of them"),
    row("parquet without the column", [*TEXT, "data.path={tmp}/rows.parquet"],
        "error: {tmp}/rows.parquet has no 'text' column (it has: id, body); set data.text_key=COLUMN", NO_PYARROW),
    row("parquet damaged", [*TEXT, "data.path={tmp}/broken.parquet"],
        "error: {tmp}/broken.parquet is not a readable Parquet file (...); write it again, or move it out of "
        "data.path", NO_PYARROW),
    row("parquet with damaged pages", [*TEXT, "data.path={tmp}/damaged_pages.parquet"],
        "error: {tmp}/damaged_pages.parquet is a damaged Parquet file (...); write it again, or move it out of "
        "data.path", NO_PYARROW),
    row("shard_tokens=0", ["data.shard_tokens=0"],
        "error: data.shard_tokens=0 is invalid: it must be >= 1, e.g. 100000000"),
    row("shard_tokens not a number", ["data.shard_tokens=many"],
        "error: data.shard_tokens=many: Value 'many' of type 'str' could not be converted to Integer; fix the value of "
        "data.shard_tokens"),
    row("threads=0", ["data.threads=0"], "error: data.threads=0 is invalid: it must be >= 1, or null for one per core"),
    row("empty text_key", [*TEXT, "data.path={tmp}/body.jsonl", "data.text_key="],
        "error: data.text_key='' is invalid: name the field that holds the text, e.g. data.text_key=text"),
    row("cache dir under a file", [*TEXT, "data.path={tmp}/good.txt", "data.cache_dir={tmp}/good.txt/cache"],
        "error: cannot write the token cache in {tmp}/good.txt/cache (Not a directory); set data.cache_dir=..."),
    row("unknown key", ["data.text_kye=body"],
        "error: unknown config key 'data.text_kye'; did you mean data.text_key?"),
    row("unknown data option", ["data=wiki"], "error: unknown option data=wiki; choose one of: ...shakespeare, text"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Every bad input, a good corpus, and a token cache that holds the good corpus's entry."""
    tmp = tmp_path_factory.mktemp("bad_prepare")
    (tmp / "good.txt").write_text("A good document. " * 200)
    (tmp / "empty.txt").write_text("")
    (tmp / "empty_records.jsonl").write_text('{"text": ""}\n\n{"text": ""}\n')
    (tmp / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp / "late_latin1").mkdir()
    (tmp / "late_latin1" / "big.txt").write_bytes(b"word " * 600_000 + b"caf\xe9 " + b"more " * 1000)
    (tmp / "bad_line.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    (tmp / "list.jsonl").write_text('["a list", "not an object"]\n')
    (tmp / "body.jsonl").write_text('{"id": 1, "body": "text under another key"}\n')
    (tmp / "number.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    records = "".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(2000)).encode()
    (tmp / "cut.jsonl.gz").write_bytes(gzip.compress(records)[:-100])
    crc = bytearray(gzip.compress(records))
    crc[-8] ^= 0xFF  # the CRC32 in the trailer
    (tmp / "crc.jsonl.gz").write_bytes(bytes(crc))
    (tmp / "plain.jsonl.gz").write_bytes(records)
    (tmp / "text.txt.gz").write_bytes(gzip.compress(b"compressed text"))
    (tmp / "notes").mkdir()
    (tmp / "notes" / "README.md").write_text("markdown is not a corpus file")
    if importlib.util.find_spec("pyarrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": [1, 2], "body": ["a", "b"]}), tmp / "rows.parquet")
        (tmp / "broken.parquet").write_bytes(b"PAR1 not really parquet PAR1")
        pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(2000)]}), tmp / "damaged_pages.parquet",
                       row_group_size=500)
        data = bytearray((tmp / "damaged_pages.parquet").read_bytes())
        data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)  # inside the data pages; the footer is intact
        (tmp / "damaged_pages.parquet").write_bytes(bytes(data))
    prepare_tokens(DataConfig(source=DataSource.text, path=str(tmp / "good.txt"), cache_dir=str(tmp / "cache")))
    return tmp


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("args, expected", CASES)
def test_bad_prepare_input_is_one_line_and_loses_nothing(workdir, args, expected):
    args = [a.format(tmp=workdir) for a in args]
    if not any(a.startswith("data.cache_dir=") for a in args):
        args.append(f"data.cache_dir={workdir / 'cache'}")
    before = snapshot(workdir)
    result = run_cli("prepare", *args, cwd=workdir)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    expected = expected.format(tmp=workdir)
    parts = expected.split("...")
    assert lines[0].startswith(parts[0]) and lines[0].endswith(parts[-1]), f"{lines[0]}\n!= {expected}"
    at = 0
    for part in parts:  # in order, with anything where "..." stands
        at = lines[0].find(part, at)
        assert at >= 0, f"{lines[0]}\n!= {expected}"
        at += len(part)
    after = snapshot(workdir)
    assert {name: data for name, data in after.items() if name in before} == before  # nothing deleted or changed
    assert [name for name in after if name not in before and not name.endswith(".lock")] == []
