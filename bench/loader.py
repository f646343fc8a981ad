"""Benchmark 2: the data path. (a) Its share of a training step: the time in loader.next_batch() plus the copy to
the device, against the whole step, for the tiny and the 124M model at B=4, T=32 (goal < 1%). (b) Batches/s of the
loader alone on a memory-mapped multi-shard cache (batches cross shard boundaries).
    python bench/loader.py [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from gpt_exp.config import DataConfig, DataSource, DType
from gpt_exp.data import BatchLoader, prepare_tokens
from gpt_exp.device import Runtime
from gpt_exp.model import GPT, GPTConfig
from gpt_exp.train import LRSchedule, train

TINY = GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=24)


class TimedLoader(BatchLoader):
    """The real loader, with a stopwatch around each batch and its copy to the device."""

    seconds: list[float]

    def next_batch(self):
        t0 = time.perf_counter()
        x, y = super().next_batch()
        x, y = x.to("cpu"), y.to("cpu")
        self.seconds.append(time.perf_counter() - t0)
        return x, y


def data_share(config: GPTConfig, tokens, steps: int, warmup: int) -> tuple[float, float]:
    """(median data ms per step, median step ms), over the steps after `warmup`."""
    torch.manual_seed(1337)
    model = GPT(config)
    loader = TimedLoader(tokens, 4, 32)
    loader.seconds = []
    step_ms: list[float] = []
    optimizer = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), 1e-8, "cpu")
    runtime = Runtime(torch.device("cpu"), DType.fp32, compile=False)
    train(model, optimizer, loader, LRSchedule(6e-4, 10, steps), runtime, start_step=0, max_steps=steps,
          grad_accum_steps=1, grad_clip=1.0, on_step=lambda m: step_ms.append(m.dt_ms))
    return statistics.median(loader.seconds[warmup:]) * 1000, statistics.median(step_ms[warmup:])


def loader_alone(cache_dir: str, batches: int) -> tuple[float, int]:
    """Batches/s over a cache of several shards: 8 copies of tiny shakespeare as 8 documents (2.7M tokens)."""
    from importlib import resources
    from pathlib import Path

    corpus = Path(cache_dir) / "corpus"
    corpus.mkdir()
    text = (resources.files("gpt_exp") / "assets" / "tinyshakespeare.txt").read_text()
    for i in range(8):
        (corpus / f"copy{i}.txt").write_text(text)
    cfg = DataConfig(source=DataSource.text, path=str(corpus), cache_dir=cache_dir, shard_tokens=300_000)
    cache = prepare_tokens(cfg)
    loader = BatchLoader(cache.load(), 4, 32)
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches / (time.perf_counter() - t0), len(cache.shard_paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        tokens = prepare_tokens(DataConfig(source=DataSource.shakespeare, cache_dir=cache_dir)).load()
        for name, config in (("tiny", TINY), ("124M", GPTConfig())):
            data_ms, step_ms = data_share(config, tokens, args.steps, args.warmup)
            print(f"{name} B=4 T=32: data {data_ms:.3f} ms of a {step_ms:.1f} ms step = {data_ms / step_ms:.2%} "
                  f"(goal < 1%)", flush=True)
        rate, shards = loader_alone(cache_dir, 20_000)
        print(f"loader alone, {shards}-shard memmapped cache, B=4 T=32: {rate:,.0f} batches/s", flush=True)


if __name__ == "__main__":
    main()
