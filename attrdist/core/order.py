"""The data order: which samples each rank reads in each step, a pure function of (seed, epoch).

The order of an epoch is a permutation of the split's sample indices keyed by (seed, epoch). It is cut
into *global* batches of `data.batch_size`; rank r of W takes slice r of each global batch. So 1 or N
processes see the same samples in the same optimizer steps, and resuming at global batch k of an
epoch is just "start the order at k" (no saved RNG state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from attrdist.core import rng as rnglib


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of one epoch: a pure function of (n, seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return rnglib.generator(seed, rnglib.ORDER, epoch).permutation(n).astype(np.int64)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples rank `rank` of `world` reads in each step of one epoch."""

    n: int
    global_batch: int
    world: int
    rank: int
    seed: int
    epoch: int
    shuffle: bool
    drop_last: bool
    start: int = 0  # first global batch (mid-epoch resume)

    def __post_init__(self):
        if self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {self.world} processes")

    @property
    def num_batches(self) -> int:
        return self.n // self.global_batch if self.drop_last else math.ceil(self.n / self.global_batch)

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        total = self.num_batches * self.global_batch
        if total > self.n:  # pad (eval only): index -1 = no sample
            order = np.concatenate([order, np.full(total - self.n, -1, dtype=np.int64)])
        local = self.global_batch // self.world
        for b in range(self.start, self.num_batches):
            sl = order[b * self.global_batch + self.rank * local: b * self.global_batch + (self.rank + 1) * local]
            yield [(int(i), self.epoch) for i in sl]
