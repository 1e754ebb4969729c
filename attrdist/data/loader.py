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


def make_loader(dataset: Dataset, plan: BatchPlan, num_workers: int, pin_memory: bool = False,
                malloc: str = "keep", collate_fn: Callable = collate) -> DataLoader:
    """Batches of `plan` (its global batch's slice for this rank), read, decoded and collated by
    `num_workers` worker processes (`collate_fn`: `samples.collate`, or a task's own)."""
    return DataLoader(dataset, batch_sampler=plan, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, persistent_workers=False, worker_init_fn=tuned_workers(malloc),
                      prefetch_factor=2 if num_workers else None)
