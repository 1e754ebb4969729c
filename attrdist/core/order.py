"""The data order: which samples each rank reads in each step, a pure function of (seed, epoch).

Both orders cut an epoch into *global* batches of `data.batch_size`; rank r of W takes slice r of each
global batch. So 1 or N processes see the same samples in the same optimizer steps, and resuming at global
batch k of an epoch is "start the order at k": no saved RNG state, any supported world size.

`StreamPlan` (data.order=windowed, the default): the order of a split too large to read at random.

    shards   --permute(seed, epoch)-->  one sequence of samples, shard after shard
    sequence --cut in S equal parts-->  S canonical streams; S = gcd(data.streams, batch size)
    stream   --windows of k shards-->   each window's samples permuted (seed, epoch, stream, window)
    global batch b = stream 0's b-th slice + stream 1's + ... (B/S samples each)
    rank r of W    = streams r*S/W .. (r+1)*S/W - 1, so its slice of every global batch

A rank reads a contiguous 1/W of the epoch's shard sequence (plus at most two shards it shares with a
neighbour), k shards per stream at a time; the ranks of a node read a contiguous 1/nodes of it. The batches
are the same at every W that divides S. Memory is O(shards) for the shard sequence plus one window per
stream a rank owns; nothing is O(samples). Mixing: a global batch draws from S streams x k shards at once
(bench/scale.py measures distinct shards and classes per batch against the full permutation).

`BatchPlan` (data.order=permutation): a full permutation of the split keyed by (seed, epoch). Every batch
draws from anywhere, so every rank reads small pieces of every shard: best mixing, for data that fits a
node's page cache. Evaluation uses it unshuffled (the split in pack order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from attrdist.core import rng as rnglib

_SHARDS, _WINDOW = 1, 2  # sub-streams of rng.ORDER for StreamPlan (epoch_order uses the bare (seed, ORDER, epoch))


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of one epoch: a pure function of (n, seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return rnglib.generator(seed, rnglib.ORDER, epoch).permutation(n).astype(np.int64)


@dataclass(frozen=True)
class BatchPlan:
    """Which samples rank `rank` of `world` reads in each step of one epoch (full permutation)."""

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


def stream_count(streams: int, global_batch: int) -> int:
    """The canonical streams S of a run: every stream adds the same whole number of samples, B/S, to each
    global batch, so S divides both data.streams and the batch."""
    return math.gcd(streams, global_batch)


def first_samples(lengths, n: int) -> np.ndarray:
    """Shard lengths cut to the split's first `n` samples (data.subset): later shards dropped, the last kept
    one shortened."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    keep = int(np.searchsorted(ends, n, side="left")) + 1 if n < (ends[-1] if len(ends) else 0) else len(lengths)
    out = lengths[:keep].copy()
    if keep and out.sum() > n:
        out[-1] -= out.sum() - n
    return out


@dataclass(frozen=True, eq=False)
class StreamPlan:
    """Which samples rank `rank` of `world` reads in each step of one epoch, shard-local (module docstring).

    `lengths`: samples per shard of the split, in pack order (cut by `first_samples` for data.subset);
    sample i of the split is position i - start(shard) of its shard. Training order: the last incomplete
    global batch is dropped, as with the full permutation (floor(n / B) batches, the same count)."""

    lengths: np.ndarray = field(repr=False)
    global_batch: int
    world: int
    rank: int
    seed: int
    epoch: int
    streams: int = 64  # data.streams: the canonical count; the plan uses stream_count(streams, global_batch)
    window: int = 4  # data.shuffle_window: shards per window
    start: int = 0  # first global batch (mid-epoch resume)

    def __post_init__(self):
        S = self.num_streams
        if self.global_batch % self.world or S % self.world:
            raise ValueError(f"{self.world} processes do not divide the {S} canonical streams of global batch "
                             f"{self.global_batch}")
        if self.window < 1:
            raise ValueError(f"a window of {self.window} shards")

    @property
    def num_streams(self) -> int:
        return stream_count(self.streams, self.global_batch)

    @property
    def n(self) -> int:
        return int(np.sum(self.lengths))

    @property
    def per_stream(self) -> int:
        """Samples each stream adds to a global batch."""
        return self.global_batch // self.num_streams

    @property
    def num_batches(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    # ---- the pure core: the epoch's shard sequence, each stream's pieces and windows
    def shard_sequence(self) -> np.ndarray:
        """The epoch's order of the shards (indices into `lengths`)."""
        return rnglib.generator(self.seed, rnglib.ORDER, self.epoch, _SHARDS).permutation(len(self.lengths))

    def pieces(self, stream: int, sequence: np.ndarray | None = None,
               ends: np.ndarray | None = None) -> list[tuple[int, int, int]]:
        """Stream `stream`'s part of the shard sequence: [(shard, first position, end position)] in order."""
        seq = self.shard_sequence() if sequence is None else sequence
        ends = np.cumsum(self.lengths[seq]) if ends is None else ends
        L = self.n // self.num_streams
        lo, hi = stream * L, (stream + 1) * L
        out, t = [], int(np.searchsorted(ends, lo, side="right"))
        while t < len(seq) and hi > 0:
            begin = int(ends[t] - self.lengths[seq[t]])
            if begin >= hi:
                break
            a, b = max(lo, begin) - begin, min(hi, int(ends[t])) - begin
            if b > a:
                out.append((int(seq[t]), a, b))
            t += 1
        return out

    def window_samples(self, stream: int, j: int, pieces: list[tuple[int, int, int]], starts: np.ndarray) -> np.ndarray:
        """The split indices of window `j` of `stream`, in their shuffled order."""
        idx = np.concatenate([np.arange(starts[s] + a, starts[s] + b, dtype=np.int64)
                              for s, a, b in pieces[j * self.window:(j + 1) * self.window]])
        return idx[rnglib.generator(self.seed, rnglib.ORDER, self.epoch, _WINDOW, stream, j).permutation(len(idx))]

    def owned_streams(self) -> range:
        per = self.num_streams // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def schedule(self) -> list[tuple[int, int, list[int]]]:
        """This rank's windows from global batch `start` on: [(first batch, last batch, [shards])], by first
        batch (what to prefetch, and when; the windows a resumed epoch has passed are left out)."""
        seq = self.shard_sequence()
        ends = np.cumsum(self.lengths[seq])
        q, out = self.per_stream, []
        for s in self.owned_streams():
            pcs, pos = self.pieces(s, seq, ends), 0
            for j in range(0, len(pcs), self.window):
                size = sum(b - a for _, a, b in pcs[j:j + self.window])
                first, last = pos // q, min((pos + size - 1) // q, self.num_batches - 1)
                if last >= self.start and first < self.num_batches:
                    out.append((first, last, [p[0] for p in pcs[j:j + self.window]]))
                pos += size
        return sorted(out, key=lambda w: w[0])

    def __iter__(self):
        seq = self.shard_sequence()
        ends = np.cumsum(self.lengths[seq])
        starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        q = self.per_stream
        streams = [_Stream(self, s, self.pieces(s, seq, ends), starts, self.start * q) for s in self.owned_streams()]
        for _ in range(self.start, self.num_batches):
            yield [(int(i), self.epoch) for st in streams for i in st.take(q)]


class _Stream:
    """One stream's samples from position `pos` on, one window in memory at a time."""

    def __init__(self, plan: StreamPlan, stream: int, pieces: list, starts: np.ndarray, pos: int):
        self.plan, self.stream, self.pieces, self.starts = plan, stream, pieces, starts
        self.j, self.buf = 0, np.empty(0, dtype=np.int64)
        sizes = [sum(b - a for _, a, b in pieces[j:j + plan.window]) for j in range(0, len(pieces), plan.window)]
        while self.j < len(sizes) and pos >= sizes[self.j]:  # resume: skip whole windows without building them
            pos -= sizes[self.j]
            self.j += 1
        if self.j < len(sizes):
            self._next_window()
            self.buf = self.buf[pos:]

    def _next_window(self) -> None:
        self.buf = self.plan.window_samples(self.stream, self.j, self.pieces, self.starts)
        self.j += 1

    def take(self, k: int) -> np.ndarray:
        out = [self.buf[:k]]
        self.buf, need = self.buf[k:], k - len(out[0])
        while need:
            self._next_window()
            out.append(self.buf[:need])
            self.buf, need = self.buf[need:], need - len(out[-1])
        return np.concatenate(out) if len(out) > 1 else out[0]
