"""Inference from a checkpoint: top attributes with probabilities for each image, or, for a
detector, the boxes drawn on each image (PNG) and listed.

    attrdist predict runs/coconut-demo-20261123-101500 image1.jpg image2.jpg --top 5
    attrdist predict runs/coconut-demo-... *.jpg --thresholds val --jsonl preds.jsonl --device cuda --batch-size 128
    attrdist predict runs/dior_remoteclip-demo-... scene.jpg --out detections/ --threshold 0.3
    attrdist predict runs/dior_remoteclip-demo-... scene.jpg --classes airport,helipad   # any names: open vocabulary

Images are prepared exactly as the run evaluated them: the size, eval crop, resampling filter and
mean/std recorded in the checkpoint's config (`Preprocess.of(cfg.data)`; resolved from the model when
the run started, attrdist.models.preprocess). A checkpoint from before those keys were recorded gets
the values attrdist used then (ImageNet mean/std, bilinear), so it predicts as it always did.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from attrdist.train import checkpoint
from attrdist.core.config import Config, from_dict
from attrdist.errors import AttrdistError
from attrdist.models import build_model
from attrdist.tasks import make_task
from attrdist.core.transforms import Preprocess, decode_image, eval_transform


def load_for_inference(path: str | Path, device: str = "cpu"):
    ckpt = checkpoint.resolve(path, "best")
    meta = checkpoint.verify(ckpt)
    cfg: Config = from_dict(Config, meta["config"])
    if cfg.run.precision == "auto" and torch.device(device).type == "cpu":
        from attrdist.train import precision

        measured = precision.previous(ckpt.parent.parent)  # the run's own probe: bf16 was slower for this model
        if measured and measured["choice"] == "no":
            cfg = replace(cfg, run=replace(cfg.run, precision="fp32"))
    # every weight comes from the checkpoint: no pretrained file, no text tower needed
    model_cfg = replace(cfg.model, pretrained="", attr_init="learned")
    quiet = logging.getLogger("attrdist")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "random init" notes are moot: the weights come next, from the checkpoint
    state = checkpoint.load_model_state(ckpt)
    try:
        model = build_model(model_cfg, len(meta["attributes"]), list(meta["attributes"]), state=state)
    finally:
        quiet.setLevel(level)
    model.load_state_dict(state)
    if hasattr(model, "set_classes"):  # detector: class embeddings from the (now loaded) frozen text tower
        from attrdist.pack.dior import prompt

        model.set_classes([prompt(n) for n in meta["attributes"]], novel=[prompt(n) for n in cfg.data.novel_classes])
    model.eval().to(device)
    return model, cfg, meta["attributes"], ckpt


def _decode(path: str, pre: Preprocess) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise AttrdistError(f"{p}: image not found")
    try:
        img = decode_image(p.read_bytes(), int(pre.image_size * pre.eval_resize))
    except Exception as e:
        raise AttrdistError(f"{p}: cannot decode image ({type(e).__name__})") from None
    return eval_transform(img, pre)


def val_thresholds(ckpt: Path, cfg: Config, attributes: list[str], field: str = "") -> tuple[np.ndarray, str]:
    """(per-attribute decision thresholds [A], what they are) that the run tuned on validation for
    checkpoint `ckpt`: report.json's `thresholds` of label field `field` (default data.eval_labels[0], the
    headline field). They exist for multilabel runs only, once the run has finished (its final evaluation
    tunes them on val with the best checkpoint), and they belong to that checkpoint: any other is refused."""
    task = cfg.data.task
    if task != "multilabel":
        why = ("a multiclass run predicts the one most probable class (softmax): it has no per-class thresholds"
               if task == "multiclass" else "detectors take one score threshold: --threshold T" if task == "detection"
               else f"task {task!r} tunes no per-attribute thresholds")
        raise AttrdistError(f"--thresholds val: {ckpt} is a {task} run; {why}. Drop --thresholds (use --top K)")
    run_dir = ckpt.parent.parent
    path = run_dir / "report.json"
    try:
        rep = json.loads(path.read_text())
    except FileNotFoundError:
        raise AttrdistError(f"--thresholds val: {path} not found; thresholds are tuned on val when a run finishes "
                            f"(resume it with run.resume=auto to finish), or drop --thresholds") from None
    except (OSError, ValueError) as e:
        raise AttrdistError(f"--thresholds val: {path} unreadable ({type(e).__name__}); drop --thresholds") from None
    field = field or cfg.data.eval_labels[0]
    table = rep.get("thresholds") if isinstance(rep, dict) else None
    if not isinstance(table, dict) or field not in table:
        have = ", ".join(table) if isinstance(table, dict) else "none"
        raise AttrdistError(f"--thresholds val: {path} has no thresholds for label field {field!r} (has: {have}); "
                            f"use --thresholds val:FIELD with one of those")
    best = Path(str(rep.get("best_checkpoint", ""))).name
    if best != ckpt.name:
        raise AttrdistError(f"--thresholds val: {path} tuned its thresholds for checkpoint {best}, not {ckpt.name}; "
                            f"predict with the run directory (its best checkpoint) or drop --thresholds")
    t = np.asarray(table[field], dtype=np.float64)
    if t.shape != (len(attributes),):
        raise AttrdistError(f"--thresholds val: {path} holds {t.size} thresholds for {field!r}, the checkpoint has "
                            f"{len(attributes)} attributes; drop --thresholds")
    return t, f"tuned on val against `{field}` ({path})"


@torch.inference_mode()
def iter_predictions(model, cfg: Config, attributes: list[str], images: list[str], top: int = 5,
                     device: str = "cpu", batch_size: int = 64, thresholds: np.ndarray | None = None
                     ) -> Iterator[tuple[str, list[tuple[str, float]], list[tuple[str, float]] | None]]:
    """(image, top-k [(attribute, probability)], the attributes at or above `thresholds` with their
    probabilities, most probable first, or None without thresholds) per image, a batch at a time, in
    order. Runs as evaluation does: batches, the run's preprocessing (`Preprocess.of(cfg.data)`), the
    run's precision where this device has it (run.precision=auto -> bf16 on CUDA and on CPUs with native
    bf16, unless the run's own probe found bf16 slower there: load_for_inference), channels_last if configured (one image per fp32 forward ran at 0.16x the bare model's
    throughput: bench/inference.py)."""
    from attrdist.train.runtime import resolve_precision

    mp = resolve_precision(cfg.run.precision if cfg.run.precision != "fp16" or device == "cuda" else "auto", device)
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    task, k, pre = make_task(cfg), min(top, len(attributes)), Preprocess.of(cfg.data)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    for i in range(0, len(images), batch_size):
        paths = images[i:i + batch_size]
        x = torch.stack([_decode(p, pre) for p in paths]).to(device, memory_format=fmt)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)["logits"]
        probs = task.probs(logits.float()).cpu()
        vals, idx = probs.topk(k, dim=1)
        for n, (path, vs, js) in enumerate(zip(paths, vals.tolist(), idx.tolist())):
            above = None
            if thresholds is not None:
                p = probs[n].double().numpy()
                above = sorted(((attributes[j], float(p[j])) for j in np.flatnonzero(p >= thresholds)),
                               key=lambda t: -t[1])
            yield path, [(attributes[j], float(v)) for v, j in zip(vs, js)], above


def predict_images(model, cfg: Config, attributes: list[str], images: list[str], top: int = 5,
                   device: str = "cpu", batch_size: int = 64) -> list[list[tuple[str, float]]]:
    """Top-k attributes per image (`iter_predictions`, collected)."""
    return [t for _, t, _ in iter_predictions(model, cfg, attributes, images, top, device, batch_size)]


@torch.no_grad()
def detect_images(model, attributes: list[str], images: list[str], out_dir: str | Path, *, threshold: float = 0.3,
                  classes: list[str] | None = None, novel: tuple[str, ...] = (), device: str = "cpu") -> list[tuple[Path, list[tuple[str, float, list]]]]:
    """Detect in each image (optionally against other class names: open vocabulary), draw the boxes
    above `threshold` and write <out_dir>/<stem>-detections.png. `novel`: the classes held out of training
    (data.novel_classes). Returns (png, [(class, score, xyxy)])."""
    from PIL import Image, ImageDraw

    from attrdist import atomic
    from attrdist.pack.dior import prompt
    from attrdist.pack.inspect import _font

    names = list(classes) if classes else list(attributes)
    if classes:  # a name that had no training box is novel (its CLIP crop score weighs more)
        trained = set(attributes) - set(novel)
        model.set_classes([prompt(n) for n in names], novel=[prompt(n) for n in names if n not in trained])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    font, results = _font(13), []
    for path in images:
        p = Path(path)
        if not p.is_file():
            raise AttrdistError(f"{p}: image not found")
        try:
            img = decode_image(p.read_bytes())
        except Exception as e:
            raise AttrdistError(f"{p}: cannot decode image ({type(e).__name__})") from None
        out = model([img.float().div(255).to(device)])[0]
        found = [(names[int(lab) - 1], float(sc), [round(v, 1) for v in box.tolist()])
                 for box, lab, sc in zip(out["boxes"], out["labels"], out["scores"]) if sc >= threshold]
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        scale = max(1, 512 // max(pil.size))  # small images are drawn larger so the labels stay readable
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
        draw = ImageDraw.Draw(pil)
        for name, score, (x0, y0, x1, y1) in found:
            draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=(255, 0, 255), width=2)
            label, ty = f"{name} {score:.2f}", max(0, y0 * scale - 16)
            draw.rectangle([x0 * scale, ty, x0 * scale + draw.textlength(label, font=font) + 4, ty + 16], fill=(255, 0, 255))
            draw.text((x0 * scale + 2, ty), label, fill=(255, 255, 255), font=font)
        png = out_dir / f"{p.stem}-detections.png"
        with atomic.atomic_path(png) as tmp:
            pil.save(tmp, format="PNG")
        results.append((png, found))
    return results
