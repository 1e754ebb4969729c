"""The final report of a run: report.md for people, report.json for programs.

Every figure stands beside the same figure for trivial predictors (all-negative and the training
split's prior for attributes, the majority class for classes, shuffled labels for boxes: each task's
`report_sections`), so a metric that cannot tell a model from a constant is impossible to miss.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from attrdist import atomic
from attrdist.core.config import to_dict
from attrdist.tasks.base import fmt as _fmt


def write(run_dir: Path, *, task, recipe, cfg, rt, results, state, timings, best_dir, n_train, model) -> Path:
    """report.md and report.json of a finished run: the common frame (run, runtime, checkpoint, epochs,
    throughput, skipped samples) around the task's own sections (`attrdist.tasks.base.Task.report_*`)."""
    L = [f"# {recipe}: report", "",
         f"- run directory: `{run_dir}`  ", f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S')}  ",
         *task.report_header(n_train, model),
         f"- runtime: {rt.describe()}  ",
         f"- best checkpoint: `{best_dir}` (monitor `{cfg.run.monitor}` = {_fmt(abs(state.best))} at step {state.best_step})  ",
         f"- epochs run: {state.epoch} of {cfg.run.epochs}{' (early stop)' if state.stopped_early else ''}, "
         f"{state.step} optimizer steps", ""]
    L += task.report_sections(results, run_dir, recipe)
    split = "test" if "test" in results else "val"
    confusion = task.confusion(results)
    if confusion:
        from attrdist.train.tracking import plot_confusion

        matrix, names, title = confusion
        plot_confusion(run_dir / "confusion.png", matrix, names, f"{recipe}: {title}")
    L += _throughput(results, split, state, timings)
    L += _corrupt_section(state)
    atomic.write_text(run_dir / "report.md", "\n".join(L) + "\n")
    clean = {s: {k: v for k, v in r.items() if k != "_details"} | {"details": r["_details"]} for s, r in results.items()}
    atomic.write_json(run_dir / "report.json", {"recipe": recipe, "task": task.kind,
                                               "headline": task.headline_text(results), "config": to_dict(cfg),
                                               "results": clean, **task.report_json(results),
                                               "best_checkpoint": str(best_dir), "timings": timings,
                                               "nonfinite_steps": state.nonfinite, "runtime": rt.describe(),
                                               "corrupt_samples": _corrupt_json(state)})
    return run_dir / "report.md"


def _throughput(results: dict, split: str, state, timings: dict) -> list[str]:
    return ["## Throughput and time", "",
          f"- training: median {_fmt(timings.get('step_img_s_median'))} images/s per optimizer step over "
          f"{timings.get('steps_timed', 0)} steps (all ranks together; first 5 steps excluded as warm-up)",
          f"- evaluation ({split}): {_fmt(results[split].get(f'{split}/images_per_s'))} images/s (forward + gather, "
          f"includes decode)",
          _inference_line(timings.get("inference")),
          f"- time in training epochs: {timings.get('train_s', 0):.1f} s; wall time of the loop including evals: "
          f"{timings.get('wall_s', 0):.1f} s",
          f"- samples that failed to decode and were skipped: train {state.corrupt}, "
          + ", ".join(f"{s} {r.get(f'{s}/corrupt', 0)}" for s, r in results.items()),
          f"- optimizer steps skipped for a NaN/Inf loss or gradient: {state.nonfinite}", ""]


def _corrupt_json(state) -> dict:
    """{"training": {shard file: samples skipped over all epochs}, "<split>": {... in its latest evaluation}}."""
    return {k: dict(sorted(v.items())) for k, v in (getattr(state, "corrupt_shards", None) or {}).items()}


def _corrupt_section(state) -> list[str]:
    """Samples skipped as corrupt (unreadable, undecodable, missing a field), per shard file."""
    rows = [(where, shard, n) for where, counts in _corrupt_json(state).items() for shard, n in counts.items() if n]
    if not rows:
        return []
    L = ["## Samples skipped as corrupt, per shard", "",
         "Left out of training / evaluation (train.log names each sample and why). Restore or re-pack these shards; "
         "`data.max_corrupt` sets how many a run may skip.", "",
         "| during | shard file | samples skipped |", "| --- | --- | ---: |"]
    L += [f"| {'training (all epochs)' if w == 'training' else f'{w} evaluation (latest)'} | `{s}` | {n} |"
          for w, s, n in rows]
    return L + [""]


def _inference_line(inf: dict | None) -> str:
    if not inf:
        return "- inference: not measured"
    return (f"- inference: {_fmt(inf['images_per_s'])} images/s (model forward only on one real batch of "
            f"{inf['batch']}, {inf['batches']} timed batches after {inf['warmup']} warm-up batches; decode excluded)")


def load(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())
