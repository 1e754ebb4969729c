"""COCO-format readers and the image-level COCO packer (captions -> weak attribute labels).

Inputs per split: an image directory, a COCO captions JSON, and optionally a COCO instances JSON
whose images/annotations carry an `attributes` list (the built-in demo writes these: they are
the *true* attributes, used for evaluation only). Each image becomes one sample:

    <key>.jpg   the original bytes (copied through, never re-encoded)
    <key>.json  {"id", "file_name", "width", "height", "captions": [...],
                 "labels": caption-derived positives, "true_labels": instance-derived positives}

Images are read with pycocotools; every image that cannot be packed is counted by reason in
the manifest's report (missing file, not an image), never silently dropped.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from attrdist.errors import AttrdistError
from attrdist.shards import PackWriter, source_entry
from attrdist.vocab import Vocabulary, count_positives


@dataclass(frozen=True)
class SplitSource:
    name: str
    images: Path
    captions: Path
    instances: Path | None = None


def load_coco(path: str | os.PathLike):
    """pycocotools COCO object with a clear error for a missing or malformed file."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise AttrdistError(f"{path}: annotation file not found; check the path")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise AttrdistError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None


def _safe_join(root: Path, name: str, ann_file: Path) -> Path:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise AttrdistError(f"{ann_file}: image file name {name!r} is absolute or contains '..'; refusing to read outside {root}")
    return root / rel


def true_attribute_ids(coco, image_id: int, index: dict[str, int], ann_file: Path) -> list[int] | None:
    """Union of image-level and object-level `attributes` names, as vocabulary indices."""
    img = coco.imgs[image_id]
    names = list(img.get("attributes", []))
    for ann in coco.imgToAnns.get(image_id, []):
        names.extend(ann.get("attributes", []))
    if "attributes" not in img and not names:
        return None
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        raise AttrdistError(f"{ann_file}: attribute names {unknown[:5]} are not in the vocabulary; use the matching vocabulary file")
    return sorted({index[n] for n in names})


def pack_coco_captions(out_dir: str | os.PathLike, splits: list[SplitSource], vocab: Vocabulary, *,
                       dataset: str = "coco-captions", max_samples: int = 1000, limit: int = 0,
                       vocab_path: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Pack image-level samples with caption-derived labels. Returns the manifest."""
    index = {n: i for i, n in enumerate(vocab.names)}
    has_true = any(s.instances for s in splits)
    fields = ["labels"] + (["true_labels"] if has_true else [])
    sources = [source_entry(vocab_path)] if vocab_path else []
    report: dict = {}
    with PackWriter(out_dir, dataset=dataset, attributes=list(vocab.names), label_fields=fields,
                    max_samples=max_samples) as writer:
        for split in splits:
            caps = load_coco(split.captions)
            sources.append(source_entry(split.captions))
            inst = None
            if split.instances:
                inst = load_coco(split.instances)
                sources.append(source_entry(split.instances))
            if not split.images.is_dir():
                raise AttrdistError(f"{split.images}: image directory not found; check --split {split.name} ...")
            dropped = {"missing_image": 0, "not_an_image": 0, "no_true_attributes": 0}
            no_hit = 0
            rows = []
            ids = sorted(caps.imgs)
            if limit:
                ids = ids[:limit]
            for image_id in tqdm(ids, desc=f"pack {split.name}", disable=not progress, unit="img"):
                img = caps.imgs[image_id]
                path = _safe_join(split.images, img["file_name"], split.captions)
                if not path.is_file():
                    dropped["missing_image"] += 1
                    continue
                data = path.read_bytes()
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        fmt, (w, h) = im.format, im.size
                except Exception:
                    dropped["not_an_image"] += 1
                    continue
                captions = [a["caption"] for a in caps.imgToAnns.get(image_id, [])]
                labels = vocab.labels(captions)
                meta = {"id": image_id, "file_name": img["file_name"], "width": w, "height": h,
                        "captions": captions, "labels": [int(i) for i in labels.nonzero()[0]]}
                if inst is not None:
                    true = true_attribute_ids(inst, image_id, index, split.instances) if image_id in inst.imgs else None
                    if true is None:
                        dropped["no_true_attributes"] += 1
                        continue
                    meta["true_labels"] = true
                no_hit += int(labels.sum() == 0)
                ext = "png" if fmt == "PNG" else "jpg"
                writer.add(split.name, f"{image_id:012d}", {ext: data, "json": meta})
                rows.append(labels)
            counts = count_positives(rows) if rows else [0] * len(vocab)
            report[split.name] = {"packed": len(rows), "dropped": dropped, "images_without_caption_hit": no_hit,
                                  "caption_positives": {n: int(c) for n, c in zip(vocab.names, counts)}}
        return writer.commit(sources=sources, report=report, options={
            "vocab": str(vocab_path) if vocab_path else vocab.name, "max_samples": max_samples, "limit": limit,
            "splits": {s.name: {"images": str(s.images), "captions": str(s.captions),
                                "instances": str(s.instances) if s.instances else None} for s in splits}})
