"""(B, T) batches from a token stream: the lecture's DataLoaderLite (a B*T+1 token buffer, x = buf[:-1], y = buf[1:],
wrapping at the end), a rank's stride under DDP, and the copy to the training device.
"""

from __future__ import annotations

import numpy as np
import torch

from gpt_exp.data.cache import ShardedTokens
from gpt_exp.errors import DataError


def split_xy(buf: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lecture's inputs and targets: x = buf[:-1], y = buf[1:], as (B, T) views of one B*T+1 buffer."""
    return buf[:-1].view(B, T), buf[1:].view(B, T)


class BatchLoader:
    """Streams (x, y) batches of shape (B, T) through the token stream; in DDP each rank takes its own stride.

    overfit_batches=N > 0 cycles the first N batches (of this rank) forever. With shuffle_seed, every epoch after the
    first reads the shards of a ShardedTokens in an order drawn from (seed, epoch); one shard reads the same always.
    """

    def __init__(self, tokens: ShardedTokens | np.ndarray, B: int, T: int, rank: int = 0, world_size: int = 1,
                 overfit_batches: int = 0, shuffle_seed: int | None = None):
        self.source, self.B, self.T, self.shuffle_seed = tokens, B, T, shuffle_seed
        self.rank, self.world_size, self.overfit_batches = rank, world_size, overfit_batches
        needed = B * T * world_size + 1
        if len(tokens) < needed:
            raise DataError(
                f"the data has {len(tokens):,} tokens but one batch needs B*T+1 = {needed:,}; lower B or T (or add data)"
            )
        self.reset()

    def _set_epoch(self, epoch: int) -> None:
        self.epoch, self.tokens = epoch, self.source
        if epoch and self.shuffle_seed is not None and isinstance(self.source, ShardedTokens):
            self.tokens = self.source.shuffled(self.shuffle_seed, epoch)

    def reset(self) -> None:
        """Back to this rank's first batch (evaluation reads the same val batches every time)."""
        self.position, self.batches_in_cycle = self._start, 0
        self._set_epoch(0)

    @property
    def _start(self) -> int:
        return self.B * self.T * self.rank

    @property
    def _stride(self) -> int:
        return self.B * self.T * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return (len(self.source) - 1) // self._stride  # a batch reads B*T+1 tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return split_xy(torch.from_numpy(self.next_tokens().astype(np.int64)), self.B, self.T)

    def next_tokens(self) -> np.ndarray:
        """The next batch's B*T+1 tokens as stored in the cache (x and y overlap in all but one), advancing."""
        n = self.B * self.T
        tokens = self.tokens[self.position : self.position + n + 1]
        self.position += self._stride
        self.batches_in_cycle += 1
        if self.overfit_batches and self.batches_in_cycle == self.overfit_batches:
            self.position, self.batches_in_cycle = self._start, 0
        elif self.position + self._stride + 1 > len(self.tokens):
            # the next batch would run past the end: wrap around, as the lecture's loader does
            self.position = self._start
            self._set_epoch(self.epoch + 1)
        return tokens

    def state_dict(self) -> dict:
        """Where the next global batch starts (this rank's own offset taken out), so any world size can resume it."""
        return {"position": self.position - self._start, "batches_in_cycle": self.batches_in_cycle,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self._set_epoch(state["epoch"])
        position = state["position"] + self._start
        if position + self.B * self.T + 1 > len(self.tokens):
            raise DataError(f"resume: the checkpoint's data position (token {state['position']:,}) plus one batch of "
                            f"B*T+1 = {self.B * self.T + 1:,} tokens runs past this corpus ({len(self.tokens):,} "
                            f"tokens); resume with the checkpoint's data, B and T")
        self.position, self.batches_in_cycle = position, state["batches_in_cycle"]


class DeviceBatches:
    """A loader's (x, y) batches on the training device. On CUDA the B*T+1 tokens travel in one asynchronous copy
    from page-locked host memory, so the host goes on queueing the step meanwhile; two host buffers take turns, and
    an event per buffer keeps one from being refilled while its last copy may still be reading it. Elsewhere the
    loader's batch is already where it trains."""

    def __init__(self, loader: BatchLoader, device: torch.device):
        self.loader, self.device = loader, device
        self.pinned = device.type == "cuda"
        if self.pinned:
            n = loader.B * loader.T + 1
            self._host = [torch.empty(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._copied = [torch.cuda.Event() for _ in range(2)]
            self._turn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pinned:
            return self.loader.next_batch()
        host, copied = self._host[self._turn], self._copied[self._turn]
        self._turn ^= 1
        copied.synchronize()  # the last copy out of this buffer has finished (at once if there was none)
        host.numpy()[:] = self.loader.next_tokens()  # uint16 -> int64 straight into page-locked memory
        buf = host.to(self.device, non_blocking=True)
        copied.record()
        return split_xy(buf, self.loader.B, self.loader.T)
