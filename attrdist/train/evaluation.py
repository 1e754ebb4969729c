"""One ordered evaluation pass for every task: the split in order, each rank its slice of every batch,
outputs gathered so that every rank ends with the whole split once, samples that failed to decode
counted per shard (and logged) the same way as in training.

    outputs = evaluation_pass(acc, model, task, loader, env, tally)   # collective: every rank calls it
    rec, details = task.evaluate(split, outputs, tune=...)
"""

from __future__ import annotations

import time

import numpy as np
import torch

from attrdist.data.samples import CorruptTally
from attrdist.tasks.base import EvalOutputs, StepEnv


def count_corrupt(acc, tally: CorruptTally, errors: list) -> int:
    """Add the skipped samples (`SampleError`s) of every rank to `tally`, counted per shard; rank 0 logs them.
    Collective with several ranks: all call it at the same point. Returns the tally's total."""
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        errors = gather_object(list(errors))  # every rank's list, concatenated
    tally.add(errors, log_them=acc.is_main_process)
    return tally.total


@torch.no_grad()
def evaluation_pass(acc, model, task, loader, env: StepEnv, tally: CorruptTally, n: int, reader=None,
                    progress=None) -> EvalOutputs:
    """Run `model` over `loader` (an ordered, padded batch plan of `n` samples) in eval mode and gather what
    `task.eval_batch` yields: per-sample tensors in split order (padding and undecodable samples dropped),
    objects of every rank in rank order, sums over all batches and ranks. `progress`: updated once a batch."""
    model.eval()
    chunks: dict[str, list] = {}
    objects, sums, errors = [], None, []
    t0 = time.perf_counter()
    try:
        with task.eval_mode(acc.unwrap_model(model)):
            for batch in loader:
                out = task.eval_batch(model, batch, env)
                errors += batch["errors"]  # counted per shard and logged below, all ranks together
                if out.per_sample is not None:
                    for k, v in acc.gather(out.per_sample).items():
                        chunks.setdefault(k, []).append(v.cpu())
                objects += out.objects
                if out.sums is not None:
                    sums = out.sums if sums is None else sums + out.sums
                if progress is not None:  # attrdist.train.progress.Progress: batches, rate, ETA (rank 0)
                    progress.update()
    finally:
        model.train()
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - t0
    per_sample = {}
    if chunks:
        cat = {k: torch.cat(v).numpy() for k, v in chunks.items()}
        keep = cat["valid"] & (cat["index"] >= 0)
        order = np.argsort(cat["index"][keep], kind="stable")
        per_sample = {k: v[keep][order] for k, v in cat.items()}
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        if task.gathers_objects:
            objects = gather_object(objects)
        if sums is not None:
            sums = acc.reduce(sums, "sum")
    corrupt = count_corrupt(acc, tally, errors)
    return EvalOutputs(per_sample=per_sample, objects=objects, sums=sums, corrupt=corrupt, seconds=seconds, n=n,
                       reader=reader)
