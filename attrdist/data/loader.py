"""The DataLoader over a batch plan: whole batches of (index, epoch) go to each worker, which decodes,
augments and collates them (`samples.collate`), so per-sample tensors never cross a process boundary
one by one.
"""

from __future__ import annotations

import functools
from typing import Callable

from torch.utils.data import DataLoader, Dataset

from attrdist.core.order import BatchPlan
from attrdist.data.samples import collate


def tuned_workers(malloc: str):
    """A DataLoader worker_init_fn applying run.malloc in each worker (`attrdist.malloc.tune_malloc`), as in the training
    process. Workers forked from a tuned process inherit it anyway; this makes the loader the same wherever
    it is built (a benchmark, a tool). With today's pixel stage the workers fault little either way
    (bench/input_profile.py)."""
    from attrdist.malloc import tune_malloc

    return functools.partial(_init_worker, tune_malloc, malloc) if malloc == "keep" else None


def _init_worker(tune, malloc: str, worker_id: int) -> None:
    tune(malloc)


class Prefetching:
    """A plan's batches, keeping a remote pack's node cache ahead of them (`ShardReader.prefetch`). Before each
    batch it hands over, in order of need, the shards of the windows that are open at that batch or open
    within the next window's span of batches, whenever that set changes: the cache downloads the missing ones
    in the background and pins the set (never evicted) until the next call. The loader draws batches from it
    ahead of the workers (prefetch_factor x workers), so shards are asked for earlier still."""

    def __init__(self, plan, prefetch: Callable[[list[int]], None]):
        self.plan, self.prefetch = plan, prefetch

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        windows = self.plan.schedule()  # [(first batch, last batch, shards)] by first batch
        span = max((last - first + 1 for first, last, _ in windows), default=1)  # batches one window lasts
        k, wanted = 0, []
        for b, batch in enumerate(self.plan, start=self.plan.start):
            changed = False
            while k < len(windows) and windows[k][0] < b + span:
                wanted.append(windows[k])
                k, changed = k + 1, True
            if any(w[1] < b for w in wanted):
                wanted, changed = [w for w in wanted if w[1] >= b], True
            if changed:
                self.prefetch(list(dict.fromkeys(s for _, _, shards in wanted for s in shards)))
            yield batch


def make_loader(dataset: Dataset, plan: BatchPlan, num_workers: int, pin_memory: bool = False,
                malloc: str = "keep", collate_fn: Callable = collate) -> DataLoader:
    """Batches of `plan` (its global batch's slice for this rank), read, decoded and collated by
    `num_workers` worker processes (`collate_fn`: `samples.collate`, or a task's own). A windowed plan over a
    reader that can prefetch (a remote pack) asks for each window's shards ahead (`Prefetching`)."""
    reader = getattr(dataset, "reader", None)
    if getattr(reader, "cache", None) is not None and hasattr(plan, "schedule"):
        plan = Prefetching(plan, reader.prefetch)
    return DataLoader(dataset, batch_sampler=plan, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, persistent_workers=False, worker_init_fn=tuned_workers(malloc),
                      prefetch_factor=2 if num_workers else None)
