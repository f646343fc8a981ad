"""Benchmark: `prepare` (every core, streaming shards) against one tiktoken thread, and its peak memory (RSS).

    python bench/prepare.py                                    # ~80 MB corpus in a temp dir: about a minute on 2 cores
    python bench/prepare.py --mb 1 --small-mb 0.5 --repeat 1   # a smoke run (tests/test_prepare.py runs this)

Generates varied text (prose, blank lines, code, tables, non-Latin scripts): half of it as many files of 5-60 KB, half
as one big file. Times one thread of encode_ordinary over every document in this process, then prepare_tokens in a
fresh child process (timed inside, so the interpreter's start is not counted) with its peak RSS (VmHWM), on the
small and the full corpus. Prints MB/s of each, their ratio and the peak RSS; the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from gpt_exp.tokenizer import gpt2_encoding

# The child's peak RSS is its VmHWM: getrusage's ru_maxrss would carry over the peak of this (forked) process,
# which holds the corpus and the baseline's tokens, across fork + exec on Linux.
CHILD = """
import json, resource, sys, time
from gpt_exp.config import DataConfig, DataSource
from gpt_exp.data.cache import prepare_tokens

def kb(field):
    try:
        return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc (macOS: bytes, roughly)

rss_before = kb("VmRSS")
t0 = time.perf_counter()
cache = prepare_tokens(DataConfig(source=DataSource.text, path=sys.argv[1], cache_dir=sys.argv[2],
                                  shard_tokens=int(sys.argv[3])))
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": cache.num_tokens, "shards": len(cache.shard_paths),
                  "rss_before_kb": rss_before, "peak_rss_kb": kb("VmHWM")}))
"""
EXTRAS = [
    "def step_{n}(x, y):\n    return (x * {n} + y) // {m}  # integer maths\n",
    "| 2024-{m:02d}-{n:02d} | {n}.{m} | {m}{n} ms | ok |\n",
    "Größe, Straße und Übermaß: {n} naïve cafés, déjà vu.\n",
    "Ελληνικά κείμενα και αριθμοί {n}, {m}.\n",
    "日本語のテキストです。数字は{n}と{m}。\n",
    "Русский текст: {n} слов и {m} строк.\n",
    "https://example.org/{n}/page?id={m}&ref=bench\n",
    "\n\n\n    indented {n}\t{m}\n",
]


def document(rng: random.Random, lines: list[str], nbytes: int) -> str:
    parts, size = [], 0
    while size < nbytes:
        part = ("\n".join(rng.choices(lines, k=rng.randint(3, 30))) + "\n\n" if rng.random() < 0.8
                else rng.choice(EXTRAS).format(n=rng.randint(0, 99), m=rng.randint(1, 12)) * rng.randint(1, 6))
        parts.append(part)
        size += len(part.encode())
    return "".join(parts)


def write_corpus(root: Path, mb: float, seed: int = 0) -> list[str]:
    """Half of `mb` in files of 5-60 KB, half in one file; returns the documents in path order."""
    rng = random.Random(seed)
    lines = (resources.files("gpt_exp") / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines()
    root.mkdir(parents=True)
    docs, half = [], int(mb * 1e6 / 2)
    while sum(len(d.encode()) for d in docs) < half:
        docs.append(document(rng, lines, rng.randint(5_000, 60_000)))
    docs.append(document(rng, lines, half))
    for i, doc in enumerate(docs):
        (root / f"doc_{i:05d}.txt").write_text(doc, encoding="utf-8")
    return docs


def one_thread(docs: list[str]) -> tuple[float, int]:
    enc = gpt2_encoding()
    t0 = time.perf_counter()
    tokens = sum(len(enc.encode_ordinary(doc)) for doc in docs)
    return time.perf_counter() - t0, tokens


def prepare_in_child(corpus: Path, cache: Path, shard_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(cache), str(shard_tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_prepare(corpus: Path, tmp: Path, shard_tokens: int, repeat: int) -> dict:
    runs = [prepare_in_child(corpus, tmp / f"cache_{corpus.name}_{i}", shard_tokens) for i in range(repeat)]
    return min(runs, key=lambda r: r["seconds"]) | {"peak_rss_kb": max(r["peak_rss_kb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=80, help="corpus size in MB (default 80)")
    parser.add_argument("--small-mb", type=float, default=20, help="the smaller corpus for the peak-RSS check")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each timing; the best is kept")
    parser.add_argument("--shard-tokens", type=int, default=5_000_000, help="data.shard_tokens (several shards)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small, docs = write_corpus(tmp / "small", args.small_mb, seed=1), write_corpus(tmp / "full", args.mb)
        mb = sum(p.stat().st_size for p in (tmp / "full").iterdir()) / 1e6
        print(f"corpus: {mb:.1f} MB in {len(docs)} files (the biggest {len(docs[-1].encode()) / 1e6:.1f} MB); "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        base_s, base_tokens = min(one_thread(docs) for _ in range(args.repeat))
        print(f"one tiktoken thread (encode_ordinary): {mb / base_s:.1f} MB/s ({base_s:.2f} s, {base_tokens:,} tokens)")
        full = best_prepare(tmp / "full", tmp, args.shard_tokens, args.repeat)
        assert full["tokens"] == base_tokens + len(docs) - 1, (full["tokens"], base_tokens)  # EOTs between documents
        print(f"prepare ({os.cpu_count()} threads, streaming, {full['shards']} shards): "
              f"{mb / full['seconds']:.1f} MB/s ({full['seconds']:.2f} s); ratio {base_s / full['seconds']:.2f}x")
        small_run = best_prepare(tmp / "small", tmp, args.shard_tokens, 1)
        small_mb = sum(len(d.encode()) for d in small) / 1e6
        print(f"peak RSS of prepare: {small_run['peak_rss_kb'] / 1e3:.0f} MB at {small_mb:.0f} MB of corpus, "
              f"{full['peak_rss_kb'] / 1e3:.0f} MB at {mb:.0f} MB (after imports, before prepare: "
              f"{full['rss_before_kb'] / 1e3:.0f} MB)")


if __name__ == "__main__":
    main()
