"""Weighted data mixtures (data=mix): each source a corpus of its own, cached and split as data=text caches and splits
one, and the run's training rows dealt to the sources by a schedule that keeps the weights' ratio exactly.

The rule. A mixture batch is B rows of T+1 tokens (x = row[:-1], y = row[1:]), each row from one source. The run's
rows, counted in order over its steps, micro-steps and ranks, are dealt so that after any n rows source i has had
floor(n * p_i) or ceil(n * p_i) rows, p_i = w_i / sum(w): less than one row from its share. Over any window of whole
steps a source's tokens therefore differ from its share of the window's tokens by less than 2 rows (2T tokens):
within one (B, T) block when B >= 2. Within a source, rows run through its train split front to back (data.order=
shuffled: in an order drawn from (train.seed, the source's name, epoch)), and start over, as a new epoch of that
source alone, after its last whole row. A source of weight 0 is dealt no rows: its val split is evaluated only.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from gpt_exp.config import DataConfig, DataOrder
from gpt_exp.data.cache import ShardedTokens, prepare_tokens, split_tokens
from gpt_exp.data.loader import BatchLoader, BlockOrder
from gpt_exp.errors import DataError

log = logging.getLogger(__name__)


class RowSchedule:
    """Which source each row of the run comes from: earliest deadline first.

    Source i's j-th row (from 1) may be dealt as row n (from 1) once n * p_i > j - 1 (its release) and must be by
    n = ceil(j / p_i) (its deadline): exactly the placements that keep |rows_i(n) - n * p_i| < 1. A sequence that
    meets every deadline exists (Tijdeman's chairman assignment theorem), and for rows of one slot each the earliest
    deadline first meets every deadline whenever any order does. Exact: the shares are Fractions of the weights, and
    a tie goes to the source listed first. The state is the rows dealt to each source.
    """

    def __init__(self, weights: list[float]):
        total = sum(Fraction(w) for w in weights)
        self.shares = [Fraction(w) / total for w in weights]
        self.set_counts([0] * len(weights))

    def set_counts(self, counts: list[int]) -> None:
        self.counts = list(counts)
        self.rows = sum(counts)
        self._next = [self._window(i) for i in range(len(counts))]

    def _window(self, i: int) -> tuple[int, int] | None:
        """(release, deadline) of source i's next row; None for a source of weight 0."""
        p, j = self.shares[i], self.counts[i] + 1
        return (math.floor((j - 1) / p) + 1, math.ceil(j / p)) if p else None

    def deal(self, n: int) -> list[tuple[int, int]]:
        """The next n rows as (source, that source's row index from 0), advancing."""
        dealt = []
        for _ in range(n):
            self.rows += 1
            ready = [(w[1], i) for i, w in enumerate(self._next) if w is not None and w[0] <= self.rows]
            _, i = min(ready)  # never empty: the shares sum to 1, so some source is behind or level
            dealt.append((i, self.counts[i]))
            self.counts[i] += 1
            self._next[i] = self._window(i)
        return dealt


class SourceRows:
    """A source's train split read as rows of T+1 tokens: its row j is row j mod R of epoch j // R (R whole rows an
    epoch), R blocks of T tokens in stored order, or in an order drawn from (seed, the source's name, epoch)."""

    def __init__(self, name: str, tokens: ShardedTokens, T: int, order: DataOrder, seed: int):
        self.tokens, self.T, self.order = tokens, T, order
        self.per_epoch = (len(tokens) - 1) // T
        # its own stream of orders: sources of one length must not read their blocks in the same order
        self.seed = int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])
        self._blocks: BlockOrder | None = None
        self._epoch = -1

    def row(self, j: int) -> np.ndarray:
        epoch, block = divmod(j, self.per_epoch)
        if self.order == DataOrder.shuffled:
            if epoch != self._epoch:
                self._blocks, self._epoch = BlockOrder(self.per_epoch, self.seed, epoch), epoch
            block = self._blocks[block]
        return self.tokens[block * self.T : block * self.T + self.T + 1]


class MixtureLoader:
    """(x, y) batches of B rows, each of T+1 tokens from one source, the sources dealt by a RowSchedule. Every rank
    deals the whole micro-step's B * world_size rows alike and reads its own B of them (rank r: rows r*B .. r*B+B-1),
    so the ratio holds over all ranks together; the state is the rows dealt to each source, whatever the world size.
    """

    def __init__(self, sources: dict[str, tuple[float, ShardedTokens]], B: int, T: int, rank: int = 0,
                 world_size: int = 1, order: DataOrder = DataOrder.sequential, order_seed: int = 0):
        self.names = sorted(sources)  # by name: the schedule does not depend on how the config lists them
        self.weights = {name: float(sources[name][0]) for name in self.names}
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.order, self.order_seed = DataOrder(order), order_seed
        self.schedule = RowSchedule([self.weights[name] for name in self.names])
        self.rows = [SourceRows(name, sources[name][1], T, self.order, order_seed) for name in self.names]

    @property
    def buffer_shape(self) -> tuple[int, ...]:
        return (self.B, self.T + 1)

    def split(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of B rows of T+1 tokens (contiguous: the loss views the targets flat)."""
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(torch.from_numpy(self.next_tokens().astype(np.int64)))

    def next_tokens(self) -> np.ndarray:
        """This rank's B rows of the next micro-step, as (B, T+1) tokens as stored in the cache, advancing."""
        dealt = self.schedule.deal(self.B * self.world_size)
        mine = dealt[self.rank * self.B : (self.rank + 1) * self.B]
        return np.stack([self.rows[i].row(j) for i, j in mine])

    @property
    def tokens_drawn(self) -> dict[str, int]:
        """Training tokens dealt to each source so far, over all ranks (T a row: a row's targets)."""
        return {name: count * self.T for name, count in zip(self.names, self.schedule.counts)}

    @property
    def train_tokens(self) -> int:
        """The train splits' tokens of the sources that are trained on."""
        return sum(len(rows.tokens) for name, rows in zip(self.names, self.rows) if self.weights[name] > 0)

    def state_dict(self) -> dict:
        return {"rows": self.schedule.rows, "source_rows": dict(zip(self.names, self.schedule.counts)),
                "weights": dict(self.weights), "order": self.order.value, "order_seed": self.order_seed,
                "row_tokens": self.T}

    def load_state_dict(self, state: dict) -> None:
        if state["weights"] != self.weights:
            raise DataError(f"resume: data.sources={_weights(state['weights'])} is how the checkpoint mixed its data, "
                            f"not {_weights(self.weights)}; resume with the checkpoint's sources and weights (a change "
                            f"breaks their exact ratio), or start a new run from its weights with init_from=")
        for key, name, now in (("order", "data.order", self.order.value), ("order_seed", "train.seed", self.order_seed),
                               ("row_tokens", "T", self.T)):
            if state[key] != now and (key != "order_seed" or self.order == DataOrder.shuffled):
                raise DataError(f"resume: the checkpoint read its mixture with {name}={state[key]}; resume with "
                                f"{name}={state[key]}")
        self.schedule.set_counts([state["source_rows"][name] for name in self.names])


def _weights(weights: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {{weight: {w:g}}}" for name, w in weights.items()) + "}"


@dataclass(frozen=True)
class Mixture:
    loader: MixtureLoader
    val: dict[str, BatchLoader]  # each source's val split, by name (empty without evaluation)


def build_mixture(data: DataConfig, B: int, T: int, rank: int, world_size: int, seed: int, evaluate: bool) -> Mixture:
    """Each source's cache (its own, by content: another weight builds nothing), its train and val splits, checked
    to hold a (B, T) block each, and the loaders over them."""
    trains, vals = {}, {}
    for name in sorted(data.sources):
        source, key = data.sources[name], f"data.sources.{name}.path"
        tokens = prepare_tokens(data.source_config(name), key).load()
        train, val = split_tokens(tokens, data.val_fraction)
        log.info("source %s (weight %g): %s tokens (train %s, val %s)", name, source.weight, f"{len(tokens):,}",
                 f"{len(train):,}", f"{len(val):,}")
        if source.weight > 0 and len(train) < B * T + 1:
            raise DataError(f"{key}={source.path} is too small: its train split has {len(train):,} tokens but one "
                            f"(B, T) block needs B*T+1 = {B * T + 1:,}; give it more text, lower B or T, or set "
                            f"data.sources.{name}.weight=0 to evaluate it only")
        if evaluate and len(val) < B * T * world_size + 1:
            raise DataError(f"{key}={source.path} is too small: its val split has {len(val):,} tokens but one batch "
                            f"needs B*T*world_size+1 = {B * T * world_size + 1:,}; raise data.val_fraction, lower B "
                            f"or T, or give it more text")
        trains[name] = (source.weight, train)
        if evaluate:
            vals[name] = BatchLoader(val, B, T, rank, world_size)
    return Mixture(MixtureLoader(trains, B, T, rank, world_size, data.order, seed), vals)
