"""The final report of a run: report.md for people, report.json for programs.

Every figure stands beside the same figure for two trivial predictors (all-negative; the
training split's per-attribute prior), so a metric that cannot tell a model from a constant is
impossible to miss.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from attrdist import atomic
from attrdist.core.config import to_dict


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def headline(task, results: dict, fields: list[str]) -> str:
    val = results["val"]["_details"][fields[0]]
    h = task.headline
    base = ", ".join(f"{b} baseline {_fmt(val['baselines'][b][h])}" for b in task.baselines)
    return f"val {h} vs {fields[0]} = {_fmt(val[h])} ({base})"


def write(run_dir: Path, *, task, recipe, cfg, rt, results, state, timings, fields, attributes, best_dir,
          manifest, thresholds, n_train) -> Path:
    L: list[str] = []
    first = fields[0]
    val = results["val"]["_details"][first]
    L += [f"# {recipe}: report", "",
          f"- run directory: `{run_dir}`  ", f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S')}  ",
          f"- data: `{manifest.root}` (dataset `{manifest.data['dataset']}`, {len(attributes)} attributes, "
          f"trained on label field `{cfg.data.labels}`, {n_train} training samples)  ",
          f"- runtime: {rt.describe()}  ",
          f"- best checkpoint: `{best_dir}` (monitor `{cfg.run.monitor}` = {_fmt(abs(state.best))} at step {state.best_step})  ",
          f"- epochs run: {state.epoch} of {cfg.run.epochs}{' (early stop)' if state.stopped_early else ''}, "
          f"{state.step} optimizer steps", "",
          "## Headline", "",
          f"**Validation {task.headline} against `{first}`: {_fmt(val[task.headline])}**: "
          + ", ".join(f"{b.replace('_', '-')} baseline {_fmt(val['baselines'][b][task.headline])}" for b in task.baselines)
          + (f" ({val['n_attr_with_pos']} attributes with positives, {val['n_attr_without_pos']} without)."
             if "n_attr_with_pos" in val else "."), ""]
    for split, res in results.items():
        for f in fields:
            d = res["_details"][f]
            note = " (thresholds tuned on this split: optimistic)" if split == "val" else " (thresholds tuned on val)"
            L += [f"## {split} vs `{f}` ({d['n_samples']} images)", "",
                  "| metric | model | " + " | ".join(f"{b.replace('_', '-')} baseline" for b in task.baselines) + " |",
                  "| --- | ---: |" + " ---: |" * len(task.baselines)]
            for k, label in task.scalars:
                if k in d:
                    lab = label + (note if "tuned" in k else "")
                    L.append(f"| {lab} | {_fmt(d[k])} | "
                             + " | ".join(_fmt(d["baselines"][b].get(k)) for b in task.baselines) + " |")
            L.append("")
    split = "test" if "test" in results else "val"
    if "per_attribute" in results[split]["_details"][first]:
        L += _per_attribute(results, split, first)
    if "per_class" in results[split]["_details"][first]:
        L += _per_class(results[split]["_details"][first], split, first)
        if results[split]["_details"][first].get("confusion"):
            from attrdist.train.tracking import plot_confusion

            plot_confusion(run_dir / "confusion.png", results[split]["_details"][first]["confusion"],
                           [c["name"] for c in results[split]["_details"][first]["per_class"]],
                           f"{recipe}: {split} vs {first}")
            L += ["Confusion matrix as a picture: `confusion.png` (rows normalised to recall).", ""]
    L += _throughput(results, split, state, timings)
    L += _corrupt_section(state)
    md = "\n".join(L) + "\n"
    atomic.write_text(run_dir / "report.md", md)
    clean = {s: {k: v for k, v in r.items() if k != "_details"} | {"details": r["_details"]} for s, r in results.items()}
    atomic.write_json(run_dir / "report.json", {"recipe": recipe, "task": task.kind,
                                               "headline": headline(task, results, fields), "config": to_dict(cfg),
                                               "results": clean,
                                               "thresholds": {k: v.tolist() for k, v in thresholds.items()},
                                               "best_checkpoint": str(best_dir), "timings": timings,
                                               "nonfinite_steps": state.nonfinite, "runtime": rt.describe(),
                                               "corrupt_samples": _corrupt_json(state)})
    return run_dir / "report.md"


def _per_class(d: dict, split: str, field: str) -> list[str]:
    L = [f"## Per-class results on {split} vs `{field}`", "", "| class | precision | recall | F1 | support |",
         "| --- | ---: | ---: | ---: | ---: |"]
    L += [f"| {c['name']} | {_fmt(c['precision'])} | {_fmt(c['recall'])} | {_fmt(c['f1'])} | {c['support']} |"
          for c in d["per_class"]]
    cm = d.get("confusion")
    if cm and len(cm) <= 30:
        names = [c["name"] for c in d["per_class"]]
        L += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
              "| true \\ pred | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        L += [f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(cm)]
    return L + [""]


def _per_attribute(results: dict, split: str, first: str) -> list[str]:
    L: list[str] = []
    per = results[split]["_details"][first]["per_attribute"]
    ranked = sorted([p for p in per if p["ap"] is not None and not math.isnan(p["ap"])], key=lambda p: -p["ap"])
    missing = [p["name"] for p in per if p["ap"] is None or math.isnan(p["ap"])]
    head = "| attribute | AP | F1@0.5 | P@0.5 | R@0.5 | positives |"
    L += [f"## Per-attribute AP on {split} vs `{first}`: best 20", "", head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    L += [f"| {p['name']} | {_fmt(p['ap'])} | {_fmt(p['f1@0.5'])} | {_fmt(p['precision@0.5'])} | "
          f"{_fmt(p['recall@0.5'])} | {p['support']} |" for p in ranked[:20]]
    L += ["", f"## Per-attribute AP on {split} vs `{first}`: worst 20", "", head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    L += [f"| {p['name']} | {_fmt(p['ap'])} | {_fmt(p['f1@0.5'])} | {_fmt(p['precision@0.5'])} | "
          f"{_fmt(p['recall@0.5'])} | {p['support']} |" for p in ranked[::-1][:20]]
    L += ["", f"Attributes with no positive on {split} (excluded from mAP): {', '.join(missing) or 'none'}", ""]
    return L


def _throughput(results: dict, split: str, state, timings: dict) -> list[str]:
    step_rates = timings.get("step_img_s", [])[5:] or timings.get("step_img_s", [])
    return ["## Throughput and time", "",
          f"- training: median {_fmt(statistics.median(step_rates)) if step_rates else 'n/a'} images/s per optimizer "
          f"step over {len(step_rates)} steps (all ranks together; first 5 steps excluded as warm-up)",
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


def detection_headline(results: dict) -> str:
    d = results["val"]["_details"]
    s = f"val mAP@50 = {_fmt(d['mAP50'])} (shuffled-label baseline {_fmt(d['baseline']['mAP50'])})"
    if d["novel"]["classes"]:
        s += (f"; base {_fmt(d['base']['mAP50'])}, novel {_fmt(d['novel']['mAP50'])} "
              f"(baseline {_fmt(d['baseline']['novel']['mAP50'])})")
    return s


def write_detection(run_dir: Path, *, recipe, cfg, rt, results, state, timings, best_dir, manifest, novel,
                    n_train, scoring: str) -> Path:
    """report.md / report.json of a detector: COCO mAP (pycocotools), base vs novel classes, per-class AP,
    each beside the shuffled-label baseline."""
    L = [f"# {recipe}: report", "",
         f"- run directory: `{run_dir}`  ", f"- finished: {time.strftime('%Y-%m-%d %H:%M:%S')}  ",
         f"- data: `{manifest.root}` (dataset `{manifest.data['dataset']}`, {len(manifest.attributes)} classes, "
         f"{n_train} training images)  ",
         f"- novel classes (no training boxes; detected through their prompts only): {', '.join(novel) or 'none'}  ",
         f"- scores: {scoring}  ",
         f"- runtime: {rt.describe()}  ",
         f"- best checkpoint: `{best_dir}` (monitor `{cfg.run.monitor}` = {_fmt(abs(state.best))} at step {state.best_step})  ",
         f"- epochs run: {state.epoch} of {cfg.run.epochs}{' (early stop)' if state.stopped_early else ''}, "
         f"{state.step} optimizer steps", "",
         "## Headline", "", f"**{detection_headline(results)}**", "",
         "Baseline: the model's own boxes and scores with their class labels permuted across detections: it keeps "
         "localisation and class frequencies and removes the class decision.", ""]
    for split, res in results.items():
        d = res["_details"]
        L += [f"## {split} ({d['num_images']} images, {d['num_detections']} detections; COCOeval, up to 100 per image)", "",
              "| metric | model | shuffled-label baseline |", "| --- | ---: | ---: |"]
        for key, label in (("mAP", "mAP @ IoU 0.50:0.95"), ("mAP50", "mAP @ IoU 0.50"), ("mAP75", "mAP @ IoU 0.75")):
            L.append(f"| {label} | {_fmt(d[key])} | {_fmt(d['baseline'][key])} |")
        for group in ("base", "novel"):
            with_gt = sum(1 for n, c in d["per_class"].items() if c["num_gt"] and (n in novel) == (group == "novel"))
            if d[group]["classes"]:
                for key in ("mAP", "mAP50"):
                    L.append(f"| {group} classes ({with_gt} with boxes here): {key} | {_fmt(d[group][key])} | "
                             f"{_fmt(d['baseline'][group][key])} |")
        L += ["", f"Per-class AP on {split} (classes without ground truth here: {d['classes_without_gt']}, left out):", "",
              "| class | group | AP | AP50 | AP75 | boxes |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        L += [f"| {n} | {'novel' if n in novel else 'base'} | {_fmt(c['AP'])} | {_fmt(c['AP50'])} | {_fmt(c['AP75'])} | "
              f"{c['num_gt']} |" for n, c in d["per_class"].items() if c["num_gt"]]
        L.append("")
    split = "test" if "test" in results else "val"
    L += _throughput(results, split, state, timings)
    L += _corrupt_section(state)
    atomic.write_text(run_dir / "report.md", "\n".join(L) + "\n")
    clean = {s: {k: v for k, v in r.items() if k != "_details"} | {"details": r["_details"]} for s, r in results.items()}
    atomic.write_json(run_dir / "report.json", {"recipe": recipe, "task": "detection",
                                               "headline": detection_headline(results), "config": to_dict(cfg),
                                               "results": clean, "best_checkpoint": str(best_dir), "timings": timings,
                                               "nonfinite_steps": state.nonfinite, "runtime": rt.describe(),
                                               "novel_classes": list(novel), "corrupt_samples": _corrupt_json(state)})
    return run_dir / "report.md"
