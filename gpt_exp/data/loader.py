"""(B, T) batches from a token stream: the lecture's DataLoaderLite (a B*T+1 token buffer, x = buf[:-1], y = buf[1:],
wrapping at the end) read front to back or in a seeded order of its B*T-token blocks, a rank's stride under DDP, and
the copy to the training device.
"""

from __future__ import annotations

import numpy as np
import torch

from gpt_exp.config import DataOrder
from gpt_exp.data.cache import ShardedTokens
from gpt_exp.errors import DataError


def split_xy(buf: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lecture's inputs and targets: x = buf[:-1], y = buf[1:], as (B, T) views of one B*T+1 buffer."""
    return buf[:-1].view(B, T), buf[1:].view(B, T)


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finalizer: every output bit depends on every input bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class BlockOrder:
    """A permutation of the block indices [0, n) drawn from (seed, epoch), computed where it is read rather than
    stored: a stored int64 permutation of a 10B-token corpus in 128-token blocks is 625 MB, this is six keys.
    A 6-round Feistel network (keys from the seed) is a bijection of the 4**h >= n indices of its domain; an index it
    sends past n is sent through again (cycle-walking, which ends: the cycle through i holds i itself), fewer than 4
    times on average as 4**h < 4n. About 6 us a block in plain Python."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # bits in each half: 4**half >= n
        rng = np.random.default_rng([seed, epoch])
        self.keys = [int(k) for k in rng.integers(0, 2**64, size=self.ROUNDS, dtype=np.uint64)]

    def __getitem__(self, position: int) -> int:
        """The block at this position of the order."""
        if not 0 <= position < self.n:  # a walk from outside [0, n) need never come back into it
            raise IndexError(f"position {position} of an order of {self.n} blocks")
        i, mask = position, (1 << self.half) - 1
        while True:
            left, right = i >> self.half, i & mask
            for key in self.keys:
                left, right = right, left ^ (_mix64(right ^ key) & mask)
            i = (left << self.half) | right
            if i < self.n:
                return i


class BatchLoader:
    """Streams (x, y) batches of shape (B, T) through the token stream; in DDP each rank takes its own stride.

    An epoch is a sequence of blocks of B*T tokens (each read with the token after it, the last target): the stream's
    blocks in stored order (order=sequential, the lecture's loader) or in an order drawn from (order_seed, epoch)
    (order=shuffled), so that runs of different seeds see different batches. Global step k reads positions k*W ..
    k*W+W-1 of the epoch's block sequence, rank r position k*W+r; the position in tokens (k*W*B*T) is the state.

    overfit_batches=N > 0 cycles the first N batches (of this rank) forever: shuffled, the first N of epoch 0's
    order, so each seed overfits its own batches. With shuffle_seed, every sequential epoch after the first reads the
    shards of a ShardedTokens in an order drawn from (seed, epoch); one shard reads the same always. A shuffled epoch
    reorders every block already, so there shuffle_seed does nothing.
    """

    def __init__(self, tokens: ShardedTokens | np.ndarray, B: int, T: int, rank: int = 0, world_size: int = 1,
                 overfit_batches: int = 0, shuffle_seed: int | None = None,
                 order: DataOrder = DataOrder.sequential, order_seed: int = 0):
        self.source, self.B, self.T, self.shuffle_seed = tokens, B, T, shuffle_seed
        self.rank, self.world_size, self.overfit_batches = rank, world_size, overfit_batches
        self.order, self.order_seed = DataOrder(order), order_seed
        needed = B * T * world_size + 1
        if len(tokens) < needed:
            raise DataError(
                f"the data has {len(tokens):,} tokens but one batch needs B*T+1 = {needed:,}; lower B or T (or add data)"
            )
        self.reset()

    def _set_epoch(self, epoch: int) -> None:
        self.epoch, self.tokens, self.blocks = epoch, self.source, None
        if self.order == DataOrder.shuffled:
            self.blocks = BlockOrder((len(self.source) - 1) // (self.B * self.T), self.order_seed, epoch)
        elif epoch and self.shuffle_seed is not None and isinstance(self.source, ShardedTokens):
            self.tokens = self.source.shuffled(self.shuffle_seed, epoch)

    def reset(self) -> None:
        """Back to this rank's first batch (evaluation reads the same val batches every time)."""
        self.position, self.batches_in_cycle = 0, 0
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

    @property
    def buffer_shape(self) -> tuple[int, ...]:
        return (self.B * self.T + 1,)

    def split(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_xy(buf, self.B, self.T)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(torch.from_numpy(self.next_tokens().astype(np.int64)))

    def next_tokens(self) -> np.ndarray:
        """The next batch's B*T+1 tokens as stored in the cache (x and y overlap in all but one), advancing."""
        n = self.B * self.T
        start = self.position + self._start
        if self.blocks is not None:
            start = self.blocks[start // n] * n  # may cross a shard boundary: ShardedTokens slices across them
        tokens = self.tokens[start : start + n + 1]
        self.position += self._stride
        self.batches_in_cycle += 1
        if self.overfit_batches and self.batches_in_cycle == self.overfit_batches:
            self.reset()
        elif self._past_the_end(self.position):
            self.position = 0  # the next step would run past the end: wrap around, as the lecture's loader does
            self._set_epoch(self.epoch + 1)
        return tokens

    def _past_the_end(self, position: int) -> bool:
        """Whether the step at this global position needs a token past the stream (every rank decides alike)."""
        return position + self._stride + 1 > len(self.tokens)

    def state_dict(self) -> dict:
        """Where the next global step starts (no rank's offset in it), so any world size can resume it."""
        state = {"position": self.position, "batches_in_cycle": self.batches_in_cycle, "epoch": self.epoch,
                 "order": self.order.value}
        if self.order == DataOrder.shuffled:
            state.update(order_seed=self.order_seed, block_tokens=self.B * self.T)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("order", DataOrder.sequential.value)  # checkpoints from before data.order read in sequence
        if saved != self.order.value:
            raise DataError(f"resume: the checkpoint read its data with data.order={saved}; resume with "
                            f"data.order={saved}")
        n = self.B * self.T
        if self.order == DataOrder.shuffled and state["order_seed"] != self.order_seed:
            raise DataError(f"resume: the checkpoint's data order was drawn from train.seed={state['order_seed']}; "
                            f"resume with train.seed={state['order_seed']} (or start a new run)")
        if self.order == DataOrder.shuffled and state["block_tokens"] != n:
            raise DataError(f"resume: the checkpoint read shuffled blocks of B*T = {state['block_tokens']:,} tokens, "
                            f"not {n:,}; resume with the checkpoint's B and T")
        self._set_epoch(state["epoch"])
        position = state["position"]
        if position + n + 1 > len(self.tokens):
            raise DataError(f"resume: the checkpoint's data position (token {position:,}) plus one batch of "
                            f"B*T+1 = {n + 1:,} tokens runs past this corpus ({len(self.tokens):,} "
                            f"tokens); resume with the checkpoint's data, B and T")
        self.position, self.batches_in_cycle = position, state["batches_in_cycle"]
        if self._past_the_end(position):  # a step of more ranks than the checkpoint's no longer fits: as if wrapped
            self.position = 0
            self._set_epoch(self.epoch + 1)


class DeviceBatches:
    """A loader's (x, y) batches on the training device (a BatchLoader's, or a MixtureLoader's B rows of T+1 tokens:
    each loader says its buffer's shape and how it splits). On CUDA the tokens travel in one asynchronous copy
    from page-locked host memory, so the host goes on queueing the step meanwhile; two host buffers take turns, and
    an event per buffer keeps one from being refilled while its last copy may still be reading it. Elsewhere the
    loader's batch is already where it trains."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self.pinned = device.type == "cuda"
        if self.pinned:
            self._host = [torch.empty(loader.buffer_shape, dtype=torch.int64, pin_memory=True) for _ in range(2)]
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
        return self.loader.split(buf)
