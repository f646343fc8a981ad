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


from gpt_exp.config import DataConfig, DataSource, DeviceConfig, DeviceType, DType, ModelConfig, RunConfig, TrainConfig
from gpt_exp.data.cache import prepare_tokens
from gpt_exp.data.loader import BatchLoader, DeviceBatches
from gpt_exp.device import resolve_runtime
from gpt_exp.trainer import Trainer

TINY = ModelConfig(name="tiny", block_size=256, n_layer=2, n_head=2, n_embd=24)


class TimedLoader(BatchLoader):
    """The real loader, with a stopwatch around each batch and its copy to the device."""

    seconds: list[float]

    def next_batch(self):
        t0 = time.perf_counter()
        x, y = super().next_batch()
        x, y = x.to("cpu"), y.to("cpu")
        self.seconds.append(time.perf_counter() - t0)
        return x, y


def data_share(model: ModelConfig, cache_dir: str, steps: int, warmup: int) -> tuple[float, float]:
    """(median data ms per step, median step ms), over the steps after `warmup`: the real Trainer, its loader timed."""
    cfg = RunConfig(model=model, data=DataConfig(cache_dir=cache_dir), train=TrainConfig(max_steps=steps),
                    device=DeviceConfig(type=DeviceType.cpu, dtype=DType.fp32))
    trainer = Trainer(cfg, resolve_runtime(cfg.device))
    loader = TimedLoader(trainer.loader.source, 4, 32)
    loader.seconds = []
    trainer.loader, trainer.batches = loader, DeviceBatches(loader, trainer.runtime.device)
    step_ms: list[float] = []

    class Timings:
        wandb_id = None

        def log_step(self, m):
            step_ms.append(m.dt_ms)

    trainer.fit(Timings())
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
        for name, model in (("tiny", TINY), ("124M", ModelConfig())):
            data_ms, step_ms = data_share(model, cache_dir, args.steps, args.warmup)
            print(f"{name} B=4 T=32: data {data_ms:.3f} ms of a {step_ms:.1f} ms step = {data_ms / step_ms:.2%} "
                  f"(goal < 1%)", flush=True)
        rate, shards = loader_alone(cache_dir, 20_000)
        print(f"loader alone, {shards}-shard memmapped cache, B=4 T=32: {rate:,.0f} batches/s", flush=True)


if __name__ == "__main__":
    main()
