"""What is learned, one module per task kind: `data.task=<kind>` is `attrdist/tasks/<kind>.py`.

  multilabel   sigmoid per attribute, BCE (+ contrastive term), AP/F1 beside all-negative and prior predictors
  multiclass   softmax over classes, cross-entropy, accuracy & co. beside majority and prior predictors
  detection    boxes: torchvision's detection losses in the model, COCO mAP through pycocotools,
               base/novel classes, beside the shuffled-label baseline

A task module defines `Task(cfg, manifest)` with the interface of `attrdist.tasks.base.Task`: its
samples (dataset and collate), its training loss, what one evaluation batch yields, the metrics of a
whole evaluated split and its report section. The trainer, its single ordered evaluation pass, the
checkpoints and the launchers are the same for every task. Adding a task is one new module here plus
a recipe file that sets `data.task` (README: "How to add a task"; tests/test_contributing.py). A task
kept outside attrdist is named by its module (on PYTHONPATH): `data.task=my_project.tasks.segmentation`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from attrdist.errors import AttrdistError


def kinds() -> list[str]:
    """The task kinds available: the modules of this package that define `Task`."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if m.name not in ("base", "classification"))


def check_kind(kind: str) -> None:
    """One line for a data.task that names no task, without importing one (the SLURM launcher checks a recipe's
    overrides with it before anything is queued)."""
    import importlib.util

    if kind in kinds():
        return
    try:
        found = all(p.isidentifier() for p in kind.split(".")) and importlib.util.find_spec(kind) is not None
    except ModuleNotFoundError:  # a parent package of a dotted name is missing
        found = False
    if not found:
        raise AttrdistError(f"data.task={kind!r}: unknown task; have {', '.join(kinds())} (attrdist/tasks/<kind>.py), "
                            f"or name an importable module of your own that defines Task (on PYTHONPATH)")


def make_task(cfg, manifest=None):
    """The task of `cfg.data.task` for a run on `manifest` (None: only the parts that need no data, e.g. the
    loss and output probabilities for `attrdist predict` and the benchmarks)."""
    kind = cfg.data.task
    check_kind(kind)
    if kind in kinds():
        return importlib.import_module(f"attrdist.tasks.{kind}").Task(cfg, manifest)
    module = importlib.import_module(kind)
    if not hasattr(module, "Task"):
        raise AttrdistError(f"data.task={kind!r}: {module.__file__} defines no Task class (see attrdist.tasks.base.Task)")
    return module.Task(cfg, manifest)
