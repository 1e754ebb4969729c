"""COCO-format readers and packers: captions (weak labels), image-level categories, object crops.

Three packers share one two-pass scheme:

  pass 1  every image is read and decoded once in worker processes (`packing.verify_bytes`: a
          JPEG's entropy-coded data in full, DCT-downscaled; a truncated or corrupt file fails
          here and is counted as "corrupt_image") and fingerprinted from that decode (sha1 +
          perceptual hash); only small metadata comes back to this process.
  check   `attrdist.pack.leakage.find_leaks` over all splits; `--on-leak error|warn|drop`
          (`apply_policy`); its report is stored in the manifest under report["leakage"].
  pass 2  samples are written in a deterministic order (image id, then annotation id). Resizing
          and cropping run in worker processes; bytes copied through are read (and checked
          against pass 1's sha1) by threads, since sending them back from a process would cost
          more than the read. Results in order.

Nothing is dropped silently: every image / object that is not packed is counted by reason per
split in the manifest report (`report[split]["dropped"]`).

Packers:
- `pack_coco_captions`: image-level samples, labels from caption text through a vocabulary
  (`labels`), optionally the demo's true attributes from an instances JSON (`true_labels`).
  Original bytes copied through.
- `pack_coco_images`: image-level multi-hot over the categories of a COCO instances (2014/2017)
  or COCO panoptic (COCONut) JSON; manifest attributes = category names in category-id order.
  Sample JSON: {"id", "file_name", "width", "height", "labels", "boxes" [[x, y, w, h] in pixels
  of the stored image], "box_labels", "box_iscrowd"}. Bytes copied through unless `max_side`.
- `pack_coco_objects`: one sample per object, a crop of its box with a context margin,
  re-encoded as JPEG. Sample JSON: {"id" (image id), "ann_id", "category_id", "labels" [the
  category index], "box" (the annotation's [x, y, w, h], original image pixels), "crop_box"
  ([x, y, w, h] of the crop in original image pixels), "box_in_crop" ([x, y, w, h] of the
  visible box in stored crop pixels), "width", "height" (stored crop)}.
  Drop reasons: crowd (iscrowd=1), bad_box (malformed, zero area or outside the image),
  too_small (visible box side < min_size px), missing_image, not_an_image, corrupt_image,
  unknown_image (annotation's image_id not in "images"), unknown_category, leak.

The panoptic format (one annotation per image with "segments_info", categories with "isthing")
is detected automatically and converted to instances-like records (one per segment; the
segment id is the sample's "ann_id" and ids are only unique within an image). Segmentation
content (polygons, RLE, PNG masks) is never needed and never read.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from PIL import Image
from tqdm import tqdm

from attrdist.errors import AttrdistError
from attrdist.pack.pipeline import (ItemError, ItemFailure, encode_jpeg, job_identity, open_image, parallel_map, read_ahead,
                              read_checked, resize_max_side, verify_bytes)
from attrdist.pack.writer import PackWriter, source_entry
from attrdist.pack.vocab import Vocabulary, count_positives

LEAK_POLICIES = ("error", "warn", "drop")


@dataclass(frozen=True)
class SplitSource:
    name: str
    images: Path
    captions: Path
    instances: Path | None = None


@dataclass(frozen=True)
class AnnSource:
    """One split for the image/objects packers: an image directory and an instances or panoptic JSON."""

    name: str
    images: Path
    annotations: Path


# ------------------------------------------------------------------------------------------
# Reading COCO JSON
# ------------------------------------------------------------------------------------------

_SHAPE = 'expected a COCO JSON object {"images": [...], "annotations": [...], "categories": [...]}'

# json.load's Python objects take ~5x the bytes of the file (measured on COCO-like instances: 65 MB of JSON,
# 333 MB more resident), plus the text itself while it is parsed.
JSON_MEMORY_FACTOR = 6


def _available_memory() -> int | None:
    """Bytes of memory this process may still use: MemAvailable, capped by a cgroup v2 limit (containers)."""
    avail = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        cg = Path("/sys/fs/cgroup")
        limit = (cg / "memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int((cg / "memory.current").read_text())
            avail = room if avail is None else min(avail, room)
    return avail


def json_size_problem(path: Path, size: int) -> str:
    """Why an annotation JSON of `size` bytes is not parsed ("" if it may be): it would not fit in memory
    (JSON_MEMORY_FACTOR x its size), or it exceeds ATTRDIST_MAX_JSON_BYTES when that is set."""
    env = os.environ.get("ATTRDIST_MAX_JSON_BYTES", "").strip()
    if env:
        if not env.isdigit():
            return f"ATTRDIST_MAX_JSON_BYTES={env!r} is not a number of bytes; set it to one (or unset it)"
        return (f"{size / 1e6:.1f} MB of JSON, more than ATTRDIST_MAX_JSON_BYTES={env} allows; raise it to parse this "
                f"file") if size > int(env) else ""
    avail = _available_memory()
    if avail is None or size * JSON_MEMORY_FACTOR <= avail:
        return ""
    return (f"{size / 1e9:.2f} GB of JSON needs about {size * JSON_MEMORY_FACTOR / 1e9:.1f} GB of memory to parse, "
            f"and {avail / 1e9:.1f} GB is available; free memory or use a machine with more (or set "
            f"ATTRDIST_MAX_JSON_BYTES={size} to try anyway)")


def read_coco_json(path: str | os.PathLike, *, need_categories: bool = False) -> dict:
    """Parse and shape-check a COCO-format JSON (captions, instances or panoptic).

    One-line AttrdistError naming the file for: missing file, a file too big for the memory (checked
    before reading: `json_size_problem`; running out anyway is caught too), invalid JSON, wrong shape,
    images without id/file_name, duplicate image ids.
    """
    path = Path(path)
    if not path.is_file():
        raise AttrdistError(f"{path}: annotation file not found; check the path")
    size = path.stat().st_size
    problem = json_size_problem(path, size)
    if problem:
        raise AttrdistError(f"{path}: {problem}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or text encoding, absurd nesting
        raise AttrdistError(f"{path}: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:120]}); pass a COCO annotation "
                            f"file") from None
    except MemoryError:
        raise AttrdistError(f"{path}: ran out of memory parsing {size / 1e6:.1f} MB of JSON; free memory or use a "
                            f"machine with more") from None
    except OSError as e:
        raise AttrdistError(f"{path}: cannot read annotation file ({e.strerror}); check the file and its "
                            f"permissions") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise AttrdistError(f"{path}: not a COCO annotation file; {_SHAPE}")
    if need_categories and not isinstance(data.get("categories"), list):
        raise AttrdistError(f"{path}: no \"categories\" list, so not an instances/panoptic file; {_SHAPE}")
    seen: set = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            raise AttrdistError(f"{path}: images[{i}] has no integer \"id\" and string \"file_name\"; {_SHAPE}")
        if img["id"] in seen:
            raise AttrdistError(f"{path}: duplicate image id {img['id']} (images[{i}]); each image must be listed "
                                f"once: fix or regenerate the file")
        seen.add(img["id"])
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise AttrdistError(f"{path}: annotations[{i}] is not an object; {_SHAPE}")
    return data


def _coco_from_dataset(dataset: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco(path: str | os.PathLike):
    """pycocotools COCO object with a clear error for a missing or malformed file."""
    path = Path(path)
    data = read_coco_json(path)
    try:
        return _coco_from_dataset(data)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise AttrdistError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None


def is_panoptic(data: dict) -> bool:
    anns = data.get("annotations") or []
    return bool(anns) and all("segments_info" in a for a in anns)


def panoptic_to_instances(data: dict, path: Path) -> dict:
    """COCO panoptic (COCONut) -> an instances-like dict: one annotation per segment.

    Each annotation gets a synthetic file-wide "id" (1..N) and keeps "segment_id" (unique only
    within its image). Two panoptic entries for one image -> one-line error.
    """
    anns, seen, n = [], set(), 0
    for i, entry in enumerate(data["annotations"]):
        if not isinstance(entry.get("image_id"), int) or not isinstance(entry.get("segments_info"), list):
            raise AttrdistError(f"{path}: annotations[{i}] needs an integer \"image_id\" and a \"segments_info\" list "
                                f"(COCO panoptic format)")
        if entry["image_id"] in seen:
            raise AttrdistError(f"{path}: image id {entry['image_id']} has two panoptic annotations (annotations[{i}]); "
                                f"fix or regenerate the file")
        seen.add(entry["image_id"])
        for j, seg in enumerate(entry["segments_info"]):
            if not isinstance(seg, dict):
                raise AttrdistError(f"{path}: annotations[{i}].segments_info holds a non-object; COCO panoptic format expected")
            if not isinstance(seg.get("id"), int) or isinstance(seg.get("id"), bool):
                raise AttrdistError(f"{path}: annotations[{i}].segments_info[{j}] has no integer \"id\" (got "
                                    f"{seg.get('id')!r}); COCO panoptic segment ids are integers: fix the file")
            n += 1
            anns.append({"id": n, "segment_id": seg.get("id"), "image_id": entry["image_id"],
                         "category_id": seg.get("category_id"), "bbox": seg.get("bbox"),
                         "area": seg.get("area", 0), "iscrowd": seg.get("iscrowd", 0)})
    out = {k: v for k, v in data.items() if k != "annotations"}
    out["annotations"] = anns
    return out


@dataclass
class Detections:
    """An instances or panoptic JSON, indexed: images, annotations per image, categories by id."""

    path: Path
    format: str  # "instances" | "panoptic"
    coco: Any  # pycocotools COCO
    categories: list[dict]  # sorted by id

    @property
    def imgs(self) -> dict:
        return self.coco.imgs

    @property
    def anns(self) -> dict:
        return self.coco.anns

    def anns_of(self, image_id: int) -> list[dict]:
        return sorted(self.coco.imgToAnns.get(image_id, []), key=lambda a: a["id"])


def load_detections(path: str | os.PathLike) -> Detections:
    """Read a COCO instances (2014/2017) or panoptic (COCONut) JSON; the format is detected."""
    path = Path(path)
    data = read_coco_json(path, need_categories=True)
    fmt = "panoptic" if is_panoptic(data) else "instances"
    if fmt == "panoptic":
        data = panoptic_to_instances(data, path)
    else:
        ids: set = set()
        for i, ann in enumerate(data["annotations"]):
            if "segments_info" in ann:
                raise AttrdistError(f"{path}: annotations mix panoptic (segments_info) and instances entries; "
                                    f"pass one format per file")
            if not isinstance(ann.get("id"), int):
                raise AttrdistError(f"{path}: annotations[{i}] has no integer \"id\"; {_SHAPE}")
            if ann["id"] in ids:
                raise AttrdistError(f"{path}: duplicate annotation id {ann['id']} (annotations[{i}]); fix or regenerate the file")
            ids.add(ann["id"])
    cats = data["categories"]
    names: set = set()
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise AttrdistError(f"{path}: categories[{i}] has no integer \"id\" and string \"name\"; {_SHAPE}")
        if c["name"] in names:
            raise AttrdistError(f"{path}: duplicate category name {c['name']!r}; category names must be unique")
        names.add(c["name"])
    if len({c["id"] for c in cats}) != len(cats):
        raise AttrdistError(f"{path}: duplicate category ids; category ids must be unique")
    try:
        coco = _coco_from_dataset(data)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise AttrdistError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None
    return Detections(path, fmt, coco, sorted(cats, key=lambda c: c["id"]))


def _safe_join(root: Path, name: str, ann_file: Path) -> Path:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise AttrdistError(f"{ann_file}: image file name {name!r} is absolute or contains '..'; refusing to read outside "
                            f"{root}: fix that entry (file names are relative to the image directory)")
    return root / rel


def true_attribute_ids(coco, image_id: int, index: dict[str, int], ann_file: Path) -> list[int] | None:
    """Union of image-level and object-level `attributes` names, as vocabulary indices."""
    img = coco.imgs[image_id]
    names = []
    for where in (img, *coco.imgToAnns.get(image_id, [])):
        attrs = where.get("attributes", [])
        if not isinstance(attrs, list) or not all(isinstance(n, str) for n in attrs):
            raise AttrdistError(f"{ann_file}: \"attributes\" of image {image_id} (or of one of its annotations) is not a "
                                f"list of attribute names; fix the file")
        names.extend(attrs)
    if "attributes" not in img and not names:
        return None
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        raise AttrdistError(f"{ann_file}: attribute names {unknown[:5]} are not in the vocabulary; use the matching vocabulary file")
    return sorted({index[n] for n in names})


# ------------------------------------------------------------------------------------------
# Per-image work (module level: runs in worker processes)
# ------------------------------------------------------------------------------------------


def verify_image(paths: str | list[str]) -> dict:
    """Pass 1: read + decode one image once (`packing.verify_bytes`), fingerprint it. The first existing path is used.

    Returns {"path", "width", "height", "format", "sha1", "phash"}; raises ItemFailure with
    reason missing_image / not_an_image / corrupt_image / decompression_bomb.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    path = next((str(p) for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise ItemFailure("missing_image", str(paths[0]))
    with open(path, "rb") as f:
        data = f.read()
    return {"path": path, **verify_bytes(data, path)}


def load_image_item(item: tuple) -> tuple[bytes, str, tuple[int, int], int]:
    """Pass 2, image-level: (path, sha1, format, max_side, quality) -> (bytes, ext, (w, h), crc32 of the bytes).

    Without max_side, JPEG and PNG bytes are copied through unchanged; other formats are
    re-encoded as JPEG. The crc32 (the sample's checksum, `PackWriter.add`) is taken here, in a pass-2
    thread or worker, not in the writing thread.
    """
    path, sha1, fmt, max_side, quality = item
    data = read_checked(path, sha1)
    if max_side:
        out, size, _ = resize_max_side(data, max_side, quality)
        if out is not data:
            return out, "jpg", size, zlib.crc32(out)
    if fmt in ("JPEG", "PNG"):
        with Image.open(io.BytesIO(data)) as im:
            return data, "jpg" if fmt == "JPEG" else "png", im.size, zlib.crc32(data)
    im = open_image(data)
    out = encode_jpeg(im, quality)
    return out, "jpg", im.size, zlib.crc32(out)


def crop_items(item: tuple) -> list[tuple[bytes, tuple[int, int]]]:
    """Pass 2, objects: (path, sha1, [crop [x, y, w, h]...], max_side, quality) -> [(jpeg, (w, h))...].

    The image is decoded once for all its crops.
    """
    path, sha1, crops, max_side, quality = item
    im = open_image(read_checked(path, sha1)).convert("RGB")
    out = []
    for x, y, w, h in crops:
        c = im.crop((x, y, x + w, y + h))
        if max_side and max(c.size) > max_side:
            s = max_side / max(c.size)
            c = c.resize((max(1, round(c.size[0] * s)), max(1, round(c.size[1] * s))), Image.BICUBIC)
        out.append((encode_jpeg(c, quality), c.size))
    return out


# ------------------------------------------------------------------------------------------
# Boxes
# ------------------------------------------------------------------------------------------


def check_box(ann: dict, img_w: int, img_h: int, min_size: float, margin: float, *,
              too_small: str = "too_small") -> tuple[str | None, list[float], list[int]]:
    """(drop reason or None, visible box [x, y, w, h] clipped to the image, crop [x, y, w, h] ints).

    Order: crowd, bad_box (malformed, non-positive size, outside the image), too_small
    (visible box narrower or shorter than min_size px). The crop is the box grown by
    `margin` x its width/height on each side, clipped to the image, on whole pixels.
    """
    if ann.get("iscrowd", 0):
        return "crowd", [], []
    b = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in b)
    except (TypeError, ValueError):
        return "bad_box", [], []
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return "bad_box", [], []
    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(img_w), x + w), min(float(img_h), y + h)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return "bad_box", [], []
    if x1 - x0 < min_size or y1 - y0 < min_size:
        return too_small, [], []
    cx0 = max(0, math.floor(x0 - margin * w))
    cy0 = max(0, math.floor(y0 - margin * h))
    cx1 = min(img_w, math.ceil(x1 + margin * w))
    cy1 = min(img_h, math.ceil(y1 + margin * h))
    return None, [x0, y0, x1 - x0, y1 - y0], [cx0, cy0, cx1 - cx0, cy1 - cy0]


def box_in_crop(visible: list[float], crop: list[int], stored: tuple[int, int]) -> list[float]:
    sx, sy = stored[0] / crop[2], stored[1] / crop[3]
    return [round((visible[0] - crop[0]) * sx, 2), round((visible[1] - crop[1]) * sy, 2),
            round(visible[2] * sx, 2), round(visible[3] * sy, 2)]


# ------------------------------------------------------------------------------------------
# Shared pass machinery
# ------------------------------------------------------------------------------------------


def verify_all(jobs: list[tuple[str, Any, Any]], workers: int | None, progress: bool, desc: str) -> dict:
    """Pass 1 over [(split, key, paths)] -> {(split, key): metadata dict | ItemError}."""
    out = {}
    paths = read_ahead((p for _, _, p in jobs), path_of=lambda p: p if isinstance(p, (str, os.PathLike)) else p[0])
    results = parallel_map(verify_image, paths, workers)
    for (split, key, _), r in zip(jobs, tqdm(results, total=len(jobs), desc=desc, unit="img", disable=not progress)):
        out[(split, key)] = r
    return out


def check_leakage(verified: dict, split_names: list[str], policy: str, where: str) -> tuple[dict, dict[str, set]]:
    """Leak report over all verified images + the keys to drop per split (policy error|warn|drop)."""
    from attrdist.pack.leakage import apply_policy, find_leaks

    if policy not in LEAK_POLICIES:
        raise AttrdistError(f"--on-leak {policy!r}: expected one of {', '.join(LEAK_POLICIES)}")
    items: dict[str, list] = {s: [] for s in split_names}
    for (split, key), r in verified.items():
        if not isinstance(r, ItemError):
            items[split].append((key, r["sha1"], r["phash"]))
    report = find_leaks(items)
    drop = apply_policy(report, policy, where) or {}
    return _jsonable(report), {s: set(v) for s, v in drop.items()}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted((_jsonable(v) for v in x), key=str)
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return x.item()
    return x


def _check_split_names(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise AttrdistError(f"splits {names}: a split name is given twice; give each --split a unique name")
    for n in names:
        if n == "leakage" or not n or "/" in n or n.startswith("."):
            raise AttrdistError(f"split name {n!r} is not allowed (reserved, empty, or a path); choose another name")


def _dropped(*reasons: str) -> Counter:
    c: Counter = Counter()
    for r in reasons:
        c[r] = 0
    return c


# ------------------------------------------------------------------------------------------
# Captions packer
# ------------------------------------------------------------------------------------------


def pack_coco_captions(out_dir: str | os.PathLike, splits: list[SplitSource], vocab: Vocabulary, *,
                       dataset: str = "coco-captions", max_samples: int = 1000, limit: int = 0,
                       vocab_path: str | os.PathLike | None = None, progress: bool = True,
                       workers: int | None = None, on_leak: str = "error", overwrite: bool = False) -> dict:
    """Pack image-level samples with caption-derived labels. Returns the manifest."""
    _check_split_names([s.name for s in splits])
    index = {n: i for i, n in enumerate(vocab.names)}
    has_true = any(s.instances for s in splits)
    fields = ["labels"] + (["true_labels"] if has_true else [])
    sources = [source_entry(vocab_path)] if vocab_path else []
    loaded = []
    jobs = []
    for split in splits:
        caps = load_coco(split.captions)
        for i, a in enumerate(caps.dataset["annotations"]):
            if not isinstance(a.get("caption"), str):
                raise AttrdistError(f"{split.captions}: annotations[{i}] has no string \"caption\"; pass a COCO captions "
                                    f"file (captions_*.json) as the captions of split {split.name!r}")
        sources.append(source_entry(split.captions))
        inst = None
        if split.instances:
            inst = load_coco(split.instances)
            sources.append(source_entry(split.instances))
        if not split.images.is_dir():
            raise AttrdistError(f"{split.images}: image directory not found; check --split {split.name} ...")
        ids = sorted(caps.imgs)
        if limit:
            ids = ids[:limit]
        for image_id in ids:
            path = _safe_join(split.images, caps.imgs[image_id]["file_name"], split.captions)
            jobs.append((split.name, f"{image_id:012d}", str(path)))
        loaded.append((split, caps, inst, ids))
    verified = verify_all(jobs, workers, progress, "verify")
    leak_report, leak_drop = check_leakage(verified, [s.name for s in splits], on_leak, str(out_dir))
    report: dict = {"leakage": leak_report}
    job = job_identity(verified, mode="captions", sources=sources, limit=limit)
    with PackWriter(out_dir, dataset=dataset, attributes=list(vocab.names), label_fields=fields,
                    max_samples=max_samples, overwrite=overwrite, job=job) as writer:
        for split, caps, inst, ids in loaded:
            dropped = _dropped("missing_image", "not_an_image", "corrupt_image", "no_true_attributes", "leak")
            no_hit = 0
            rows = []
            todo = []
            for image_id in ids:
                key = f"{image_id:012d}"
                v = verified[(split.name, key)]
                if isinstance(v, ItemError):
                    dropped[v.reason] += 1
                    continue
                true = None
                if inst is not None:
                    true = true_attribute_ids(inst, image_id, index, split.instances) if image_id in inst.imgs else None
                    if true is None:
                        dropped["no_true_attributes"] += 1
                        continue
                if key in leak_drop.get(split.name, ()):
                    dropped["leak"] += 1
                    continue
                todo.append((image_id, key, v, true))
            items = ((v["path"], v["sha1"], v["format"], 0, 90) for _, _, v, _ in todo)
            results = parallel_map(load_image_item, items, workers, threads=True)  # bytes copied through
            for (image_id, key, v, true), r in zip(todo, tqdm(results, total=len(todo), desc=f"write {split.name}",
                                                             unit="img", disable=not progress)):
                if isinstance(r, ItemError):
                    dropped[r.reason] += 1
                    continue
                data, ext, (w, h), crc = r
                img = caps.imgs[image_id]
                captions = [a["caption"] for a in caps.imgToAnns.get(image_id, [])]
                labels = vocab.labels(captions)
                meta = {"id": image_id, "file_name": img["file_name"], "width": w, "height": h,
                        "captions": captions, "labels": [int(i) for i in labels.nonzero()[0]]}
                if true is not None:
                    meta["true_labels"] = true
                no_hit += int(labels.sum() == 0)
                writer.add(split.name, key, {ext: data, "json": meta}, crc32={ext: crc})
                rows.append(labels)
            counts = count_positives(rows) if rows else [0] * len(vocab)
            report[split.name] = {"images": len(ids), "packed": len(rows), "dropped": dict(dropped),
                                  "images_without_caption_hit": no_hit,
                                  "caption_positives": {n: int(c) for n, c in zip(vocab.names, counts)}}
        return writer.commit(sources=sources, report=report, options={
            "mode": "captions", "vocab": str(vocab_path) if vocab_path else vocab.name, "max_samples": max_samples,
            "limit": limit, "on_leak": on_leak,
            "splits": {s.name: {"images": str(s.images), "captions": str(s.captions),
                                "instances": str(s.instances) if s.instances else None} for s in splits}})


# ------------------------------------------------------------------------------------------
# Instances / panoptic packers: image-level categories and object crops
# ------------------------------------------------------------------------------------------


def _load_splits(splits: list[AnnSource]) -> tuple[list[tuple[AnnSource, Detections]], list[dict]]:
    _check_split_names([s.name for s in splits])
    loaded = []
    cats = None
    for s in splits:
        det = load_detections(s.annotations)
        if not s.images.is_dir():
            raise AttrdistError(f"{s.images}: image directory not found; check --split {s.name} ...")
        key = [(c["id"], c["name"]) for c in det.categories]
        if cats is None:
            cats, first = key, s.annotations
        elif key != cats:
            raise AttrdistError(f"{s.annotations}: categories differ from those of {first}; every split must use "
                                f"the same category list")
        loaded.append((s, det))
    return loaded, (loaded[0][1].categories if loaded else [])


def _category_options(categories: list[dict]) -> list[dict]:
    return [{k: c[k] for k in ("id", "name", "supercategory", "isthing") if k in c} for c in categories]


def pack_coco_images(out_dir: str | os.PathLike, splits: list[AnnSource], *, dataset: str = "coco-images",
                     max_samples: int = 1000, limit: int = 0, max_side: int = 0, quality: int = 90,
                     workers: int | None = None, on_leak: str = "error", progress: bool = True,
                     overwrite: bool = False) -> dict:
    """Image-level multi-hot over categories (instances or panoptic JSON). Returns the manifest."""
    loaded, categories = _load_splits(splits)
    cat_index = {c["id"]: i for i, c in enumerate(categories)}
    jobs, plans = [], []
    for s, det in loaded:
        ids = sorted(det.imgs)
        if limit:
            ids = ids[:limit]
        for image_id in ids:
            path = _safe_join(s.images, det.imgs[image_id]["file_name"], s.annotations)
            jobs.append((s.name, f"{image_id:012d}", str(path)))
        plans.append((s, det, ids))
    verified = verify_all(jobs, workers, progress, "verify")
    leak_report, leak_drop = check_leakage(verified, [s.name for s in splits], on_leak, str(out_dir))
    report: dict = {"leakage": leak_report}
    sources = [source_entry(s.annotations) for s in splits]
    job = job_identity(verified, mode="image", sources=sources, limit=limit, max_side=max_side, quality=quality)
    with PackWriter(out_dir, dataset=dataset, attributes=[c["name"] for c in categories], label_fields=["labels"],
                    max_samples=max_samples, overwrite=overwrite, job=job) as writer:
        for s, det, ids in plans:
            dropped = _dropped("missing_image", "not_an_image", "corrupt_image", "leak")
            box_drops = _dropped("unknown_category", "bad_box")
            todo = []
            for image_id in ids:
                key = f"{image_id:012d}"
                v = verified[(s.name, key)]
                if isinstance(v, ItemError):
                    dropped[v.reason] += 1
                elif key in leak_drop.get(s.name, ()):
                    dropped["leak"] += 1
                else:
                    todo.append((image_id, key, v))
            items = ((v["path"], v["sha1"], v["format"], max_side, quality) for _, _, v in todo)
            results = parallel_map(load_image_item, items, workers, threads=not max_side)  # no max_side: copied through
            packed = no_labels = nboxes = 0
            for (image_id, key, v), r in zip(todo, tqdm(results, total=len(todo), desc=f"write {s.name}",
                                                       unit="img", disable=not progress)):
                if isinstance(r, ItemError):
                    dropped[r.reason] += 1
                    continue
                data, ext, (w, h), crc = r
                sx, sy = w / v["width"], h / v["height"]
                labels, boxes, box_labels, crowd = set(), [], [], []
                for ann in det.anns_of(image_id):
                    ci = cat_index.get(ann.get("category_id"))
                    if ci is None:
                        box_drops["unknown_category"] += 1
                        continue
                    labels.add(ci)
                    try:
                        x, y, bw, bh = (float(t) for t in ann["bbox"])
                        assert all(math.isfinite(t) for t in (x, y, bw, bh)) and bw > 0 and bh > 0
                    except (KeyError, TypeError, ValueError, AssertionError):
                        box_drops["bad_box"] += 1  # the label counts; the box is unusable
                        continue
                    boxes.append([round(x * sx, 2), round(y * sy, 2), round(bw * sx, 2), round(bh * sy, 2)])
                    box_labels.append(ci)
                    crowd.append(int(bool(ann.get("iscrowd", 0))))
                meta = {"id": image_id, "file_name": det.imgs[image_id]["file_name"], "width": w, "height": h,
                        "labels": sorted(labels), "boxes": boxes, "box_labels": box_labels, "box_iscrowd": crowd}
                writer.add(s.name, key, {ext: data, "json": meta}, crc32={ext: crc})
                packed += 1
                nboxes += len(boxes)
                no_labels += not labels
            report[s.name] = {"images": len(ids), "packed": packed, "dropped": dict(dropped),
                              "images_without_labels": no_labels, "boxes": nboxes,
                              "annotations_not_usable": dict(box_drops), "format": det.format}
        return writer.commit(sources=sources, report=report, options={
            "mode": "image", "max_side": max_side, "quality": quality if max_side else None,
            "max_samples": max_samples, "limit": limit, "on_leak": on_leak,
            "categories": _category_options(categories),
            "splits": {s.name: {"images": str(s.images), "annotations": str(s.annotations)} for s in splits}})


def pack_coco_objects(out_dir: str | os.PathLike, splits: list[AnnSource], *, dataset: str = "coco-objects",
                      max_samples: int = 1000, limit: int = 0, margin: float = 0.1, min_size: float = 16,
                      max_side: int = 0, quality: int = 90, workers: int | None = None, on_leak: str = "error",
                      progress: bool = True, overwrite: bool = False) -> dict:
    """One sample per object: its box crop with context. Every annotation is packed or counted."""
    if margin < 0 or min_size < 0:
        raise AttrdistError(f"--margin {margin} / --min-size {min_size}: must be >= 0")
    loaded, categories = _load_splits(splits)
    cat_index = {c["id"]: i for i, c in enumerate(categories)}
    jobs, plans = [], []
    for s, det in loaded:
        pre = _dropped("unknown_image", "unknown_category", "crowd", "bad_box", "too_small")
        ids = sorted(det.imgs)
        if limit:
            ids = ids[:limit]
        idset = set(ids)
        anns = sorted(det.anns.values(), key=lambda a: (a.get("image_id") if isinstance(a.get("image_id"), int) else -1,
                                                        a["id"]))
        if limit:  # objects of the images left out by --limit are not part of this pack
            anns = [a for a in anns if a.get("image_id") in idset or a.get("image_id") not in det.imgs]
        candidates: dict[int, list[dict]] = {}
        for ann in anns:
            if ann.get("image_id") not in det.imgs:
                pre["unknown_image"] += 1
            elif ann.get("category_id") not in cat_index:
                pre["unknown_category"] += 1
            elif ann.get("iscrowd", 0):
                pre["crowd"] += 1
            else:
                candidates.setdefault(ann["image_id"], []).append(ann)
        for image_id in sorted(candidates):
            path = _safe_join(s.images, det.imgs[image_id]["file_name"], s.annotations)
            jobs.append((s.name, f"{image_id:012d}", str(path)))
        plans.append((s, det, len(anns), pre, candidates))
    verified = verify_all(jobs, workers, progress, "verify")
    leak_report, leak_drop = check_leakage(verified, [s.name for s in splits], on_leak, str(out_dir))
    report: dict = {"leakage": leak_report}
    sources = [source_entry(s.annotations) for s in splits]
    job = job_identity(verified, mode="objects", sources=sources, limit=limit, max_side=max_side, quality=quality,
                       margin=margin, min_size=min_size)
    with PackWriter(out_dir, dataset=dataset, attributes=[c["name"] for c in categories], label_fields=["labels"],
                    max_samples=max_samples, overwrite=overwrite, job=job) as writer:
        for s, det, total, dropped, candidates in plans:
            for r in ("missing_image", "not_an_image", "corrupt_image", "leak"):
                dropped[r] += 0
            todo = []
            for image_id in sorted(candidates):
                key = f"{image_id:012d}"
                v, objs = verified[(s.name, key)], candidates[image_id]
                if isinstance(v, ItemError):
                    dropped[v.reason] += len(objs)
                    continue
                if key in leak_drop.get(s.name, ()):
                    dropped["leak"] += len(objs)
                    continue
                keep = []
                for ann in objs:
                    reason, visible, crop = check_box(ann, v["width"], v["height"], min_size, margin)
                    if reason:
                        dropped[reason] += 1
                    else:
                        keep.append((ann, visible, crop))
                if keep:
                    todo.append((image_id, v, keep))
            items = ((v["path"], v["sha1"], [c for _, _, c in keep], max_side, quality) for _, v, keep in todo)
            results = parallel_map(crop_items, items, workers)
            packed = 0
            for (image_id, v, keep), r in zip(todo, tqdm(results, total=len(todo), desc=f"write {s.name}",
                                                         unit="img", disable=not progress)):
                if isinstance(r, ItemError):
                    dropped[r.reason] += len(keep)
                    continue
                for (ann, visible, crop), (data, size) in zip(keep, r):
                    ann_id = ann["segment_id"] if det.format == "panoptic" else ann["id"]
                    meta = {"id": image_id, "ann_id": ann_id, "category_id": ann["category_id"],
                            "labels": [cat_index[ann["category_id"]]], "box": [float(t) for t in ann["bbox"]],
                            "crop_box": crop, "box_in_crop": box_in_crop(visible, crop, size),
                            "width": size[0], "height": size[1], "file_name": det.imgs[image_id]["file_name"]}
                    writer.add(s.name, f"{image_id:012d}_{ann_id}", {"jpg": data, "json": meta})
                    packed += 1
            assert packed + sum(dropped.values()) == total, (s.name, packed, dict(dropped), total)
            report[s.name] = {"objects": total, "packed": packed, "dropped": dict(dropped),
                              "images": len(candidates), "format": det.format}
        return writer.commit(sources=sources, report=report, options={
            "mode": "objects", "margin": margin, "min_size": min_size, "max_side": max_side, "quality": quality,
            "max_samples": max_samples, "limit": limit, "on_leak": on_leak,
            "categories": _category_options(categories),
            "splits": {s.name: {"images": str(s.images), "annotations": str(s.annotations)} for s in splits}})


def summary_lines(manifest: dict, what: str = "images") -> Iterable[str]:
    """One line per split: packed, total and the drop reasons that occurred."""
    names = [k for k in manifest["report"] if k != "leakage"]
    for name in names + [k for k in manifest["splits"] if k not in names]:
        rep = manifest["report"].get(name, {})
        drops = ", ".join(f"{k} {v}" for k, v in sorted(rep.get("dropped", {}).items()) if v) or "none"
        total = rep.get("objects", rep.get("images", "?"))
        yield f"{name}: packed {rep.get('packed', 0)} of {total} {what}; dropped: {drops}"
