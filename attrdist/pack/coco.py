"""COCO-format readers and packers: captions (weak labels), image-level categories, object crops.

Each packer is a `PackFormat` (`CaptionsFormat`, `ImagesFormat`, `ObjectsFormat`) run by
`attrdist.pack.pipeline.pack`: pass 1 reads, decodes and fingerprints every image once in worker
processes (a truncated or corrupt file is counted as "corrupt_image"), the leak check runs over all
splits (`--on-leak error|warn|drop`, its report under report["leakage"]), and pass 2 writes the
samples in a deterministic order (image id, then annotation id), each shard written whole by a worker
process (reading, checked against pass 1's sha1, and resizing or cropping).

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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from attrdist.errors import AttrdistError
from attrdist.pack.pipeline import (DEFAULT_MAX_DROPPED, ImageItem, PackFormat, Task, Tally, check_split_names, encode_jpeg,
                                    load_image_item, open_image, pack, read_checked, verify_image)
from attrdist.pack.vocab import Vocabulary, count_positives
from attrdist.pack.writer import source_entry


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
    if path.is_dir():
        raise AttrdistError(f"{path}: is a folder, not an annotation file; pass the COCO JSON file itself (e.g. "
                            f"annotations/instances_val2017.json)")
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


def safe_join(root: Path, name: str, ann_file: Path) -> Path:
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
# Captions packer
# ------------------------------------------------------------------------------------------


def _image_key(image_id: int) -> str:
    return f"{image_id:012d}"


class CaptionsFormat(PackFormat):
    """COCO captions (+ optional instances with true attributes) -> image-level samples (`pack_coco_captions`)."""

    verify = staticmethod(verify_image)
    produce = staticmethod(load_image_item)  # bytes copied through

    def __init__(self, splits: list[SplitSource], vocab: Vocabulary, *, dataset: str, max_samples: int, limit: int,
                 vocab_path: str | os.PathLike | None, on_leak: str):
        check_split_names([s.name for s in splits])
        self.dataset, self.attributes, self.splits = dataset, list(vocab.names), [s.name for s in splits]
        self.label_fields = ["labels"] + (["true_labels"] if any(s.instances for s in splits) else [])
        self.tally = Tally(self.splits, ("missing_image", "not_an_image", "corrupt_image", "no_true_attributes",
                                         "leak"))
        self.vocab, self.index = vocab, {n: i for i, n in enumerate(vocab.names)}
        self.sources = [source_entry(vocab_path)] if vocab_path else []
        self.loaded: dict[str, tuple] = {}  # split -> (SplitSource, captions COCO, instances COCO | None, ids)
        for split in splits:
            caps = load_coco(split.captions)
            for i, a in enumerate(caps.dataset["annotations"]):
                if not isinstance(a.get("caption"), str):
                    raise AttrdistError(f"{split.captions}: annotations[{i}] has no string \"caption\"; pass a COCO captions "
                                        f"file (captions_*.json) as the captions of split {split.name!r}")
            self.sources.append(source_entry(split.captions))
            inst = None
            if split.instances:
                inst = load_coco(split.instances)
                self.sources.append(source_entry(split.instances))
            if not split.images.is_dir():
                raise AttrdistError(f"{split.images}: image directory not found; check --split {split.name} ...")
            ids = sorted(caps.imgs)
            self.loaded[split.name] = (split, caps, inst, ids[:limit] if limit else ids)
        self.limit = limit
        self.inputs = [p for s in splits for p in (s.images, s.captions, s.instances) if p] + \
            ([Path(vocab_path)] if vocab_path else [])
        self.rows: dict[str, list] = {s: [] for s in self.splits}  # label vectors packed
        self.no_hit = Counter()
        self.options = {"mode": "captions", "vocab": str(vocab_path) if vocab_path else vocab.name,
                        "max_samples": max_samples, "limit": limit, "on_leak": on_leak,
                        "splits": {s.name: {"images": str(s.images), "captions": str(s.captions),
                                            "instances": str(s.instances) if s.instances else None} for s in splits}}

    def images(self) -> list[ImageItem]:
        return [ImageItem(split.name, _image_key(i),
                          str(safe_join(split.images, caps.imgs[i]["file_name"], split.captions)), i)
                for split, caps, _, ids in self.loaded.values() for i in ids]

    def _true(self, image: ImageItem) -> list[int] | None:
        split, _, inst, _ = self.loaded[image.split]
        if inst is None or image.info not in inst.imgs:
            return None
        return true_attribute_ids(inst, image.info, self.index, split.instances)

    def reject(self, image: ImageItem, meta: dict) -> str | None:
        if self.loaded[image.split][2] is not None and self._true(image) is None:
            return "no_true_attributes"
        return None

    def samples(self, image, meta, task, result):
        data, ext, (w, h), crc = result
        caps = self.loaded[image.split][1]
        captions = [a["caption"] for a in caps.imgToAnns.get(image.info, [])]
        labels = self.vocab.labels(captions)
        sample = {"id": image.info, "file_name": caps.imgs[image.info]["file_name"], "width": w, "height": h,
                  "captions": captions, "labels": [int(i) for i in labels.nonzero()[0]]}
        true = self._true(image)
        if true is not None:
            sample["true_labels"] = true
        self.no_hit[image.split] += int(labels.sum() == 0)
        self.rows[image.split].append(labels)
        yield image.key, {ext: data, "json": sample}, {ext: crc}

    def report(self, verified: dict) -> dict:
        report = {}
        for name, (_, _, _, ids) in self.loaded.items():
            rows = self.rows[name]
            counts = count_positives(rows) if rows else [0] * len(self.vocab)
            report[name] = {"images": len(ids), "packed": len(rows), "dropped": self.tally.dropped(name),
                            "images_without_caption_hit": self.no_hit[name],
                            "caption_positives": {n: int(c) for n, c in zip(self.vocab.names, counts)}}
        return report


def pack_coco_captions(out_dir: str | os.PathLike, splits: list[SplitSource], vocab: Vocabulary, *,
                       dataset: str = "coco-captions", max_samples: int = 1000, limit: int = 0,
                       vocab_path: str | os.PathLike | None = None, progress: bool = True,
                       workers: int | None = None, on_leak: str = "error", overwrite: bool = False, max_dropped: float = DEFAULT_MAX_DROPPED) -> dict:
    """Pack image-level samples with caption-derived labels. Returns the manifest."""
    fmt = CaptionsFormat(splits, vocab, dataset=dataset, max_samples=max_samples, limit=limit, vocab_path=vocab_path,
                         on_leak=on_leak)
    return pack(fmt, out_dir, max_samples=max_samples, workers=workers, on_leak=on_leak, overwrite=overwrite,
                progress=progress, max_dropped=max_dropped)


# ------------------------------------------------------------------------------------------
# Instances / panoptic packers: image-level categories and object crops
# ------------------------------------------------------------------------------------------


def _load_splits(splits: list[AnnSource]) -> tuple[list[tuple[AnnSource, Detections]], list[dict]]:
    check_split_names([s.name for s in splits])
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


class _DetectionsFormat(PackFormat):
    """What the image and object packers share: splits of an image directory + an instances/panoptic JSON."""

    verify = staticmethod(verify_image)

    def __init__(self, splits: list[AnnSource], *, dataset: str, reasons: tuple[str, ...]):
        self.loaded, categories = _load_splits(splits)
        self.dataset, self.splits = dataset, [s.name for s in splits]
        self.attributes, self.categories = [c["name"] for c in categories], categories
        self.cat_index = {c["id"]: i for i, c in enumerate(categories)}
        self.tally = Tally(self.splits, reasons)
        self.sources = [source_entry(s.annotations) for s in splits]
        self.inputs = [p for s in splits for p in (s.images, s.annotations)]
        self.dets = {s.name: det for s, det in self.loaded}

    def _ids(self, split: str, ann: dict) -> dict:
        """How a drop names an annotation: its id, or for panoptic JSON the image and segment ids."""
        if self.dets[split].format == "panoptic":
            return {"image_id": ann.get("image_id"), "segment_id": ann.get("segment_id")}
        return {"ann_id": ann.get("id")}

    def _image(self, s: AnnSource, det: Detections, image_id: int, **kw) -> ImageItem:
        return ImageItem(s.name, _image_key(image_id), str(safe_join(s.images, det.imgs[image_id]["file_name"],
                                                                      s.annotations)), image_id, **kw)

    def _options_with(self, **options) -> dict:
        return {**options, "categories": _category_options(self.categories),
                "splits": {s.name: {"images": str(s.images), "annotations": str(s.annotations)}
                           for s, _ in self.loaded}}


class ImagesFormat(_DetectionsFormat):
    """Image-level multi-hot over the categories of instances/panoptic JSONs (`pack_coco_images`)."""

    produce = staticmethod(load_image_item)

    def __init__(self, splits: list[AnnSource], *, dataset: str, max_samples: int, limit: int, max_side: int,
                 quality: int, on_leak: str):
        super().__init__(splits, dataset=dataset, reasons=("missing_image", "not_an_image", "corrupt_image", "leak"))
        self.limit, self.max_side, self.quality = limit, max_side, quality
        self.ids = {s.name: (sorted(det.imgs)[:limit] if limit else sorted(det.imgs)) for s, det in self.loaded}
        self.no_labels, self.nboxes = Counter(), Counter()
        self.options = self._options_with(mode="image", max_side=max_side, quality=quality if max_side else None,
                                          max_samples=max_samples, limit=limit, on_leak=on_leak)

    def images(self) -> list[ImageItem]:
        return [self._image(s, det, i) for s, det in self.loaded for i in self.ids[s.name]]

    def plan(self, image, meta):
        return Task((meta["path"], meta["sha1"], meta["format"], self.max_side, self.quality))

    def samples(self, image, meta, task, result):
        data, ext, (w, h), crc = result
        det, split = self.dets[image.split], image.split
        sx, sy = w / meta["width"], h / meta["height"]
        labels, boxes, box_labels, crowd = set(), [], [], []
        for ann in det.anns_of(image.info):
            ci = self.cat_index.get(ann.get("category_id"))
            if ci is None:
                self.tally.drop_box(split, "unknown_category", file=det.path, **self._ids(split, ann))
                continue
            labels.add(ci)
            try:
                x, y, bw, bh = (float(t) for t in ann["bbox"])
                assert all(math.isfinite(t) for t in (x, y, bw, bh)) and bw > 0 and bh > 0
            except (KeyError, TypeError, ValueError, AssertionError):  # the label counts; the box is unusable
                self.tally.drop_box(split, "bad_box", file=det.path, detail=f"bbox {ann.get('bbox')!r}",
                                    **self._ids(split, ann))
                continue
            boxes.append([round(x * sx, 2), round(y * sy, 2), round(bw * sx, 2), round(bh * sy, 2)])
            box_labels.append(ci)
            crowd.append(int(bool(ann.get("iscrowd", 0))))
        sample = {"id": image.info, "file_name": det.imgs[image.info]["file_name"], "width": w, "height": h,
                  "labels": sorted(labels), "boxes": boxes, "box_labels": box_labels, "box_iscrowd": crowd}
        self.nboxes[image.split] += len(boxes)
        self.no_labels[image.split] += not labels
        yield image.key, {ext: data, "json": sample}, {ext: crc}

    def report(self, verified: dict) -> dict:
        return {s: {"images": len(self.ids[s]), "packed": self.tally.packed[s], "dropped": self.tally.dropped(s),
                    "images_without_labels": self.no_labels[s], "boxes": self.nboxes[s],
                    "annotations_not_usable": {"unknown_category": 0, "bad_box": 0, **self.tally.boxes_dropped(s)},
                    "format": self.dets[s].format}
                for s in self.splits}


def pack_coco_images(out_dir: str | os.PathLike, splits: list[AnnSource], *, dataset: str = "coco-images",
                     max_samples: int = 1000, limit: int = 0, max_side: int = 0, quality: int = 90,
                     workers: int | None = None, on_leak: str = "error", progress: bool = True,
                     overwrite: bool = False, max_dropped: float = DEFAULT_MAX_DROPPED) -> dict:
    """Image-level multi-hot over categories (instances or panoptic JSON). Returns the manifest."""
    fmt = ImagesFormat(splits, dataset=dataset, max_samples=max_samples, limit=limit, max_side=max_side,
                       quality=quality, on_leak=on_leak)
    return pack(fmt, out_dir, max_samples=max_samples, workers=workers, on_leak=on_leak, overwrite=overwrite,
                progress=progress, max_dropped=max_dropped)


class ObjectsFormat(_DetectionsFormat):
    """One sample per object: its box crop with context (`pack_coco_objects`)."""

    produce = staticmethod(crop_items)

    def __init__(self, splits: list[AnnSource], *, dataset: str, max_samples: int, limit: int, margin: float,
                 min_size: float, max_side: int, quality: int, on_leak: str):
        if margin < 0 or min_size < 0:
            raise AttrdistError(f"--margin {margin} / --min-size {min_size}: must be >= 0")
        super().__init__(splits, dataset=dataset, reasons=("unknown_image", "unknown_category", "crowd", "bad_box",
                                                           "too_small", "missing_image", "not_an_image",
                                                           "corrupt_image", "leak"))
        self.limit, self.margin, self.min_size, self.max_side, self.quality = limit, margin, min_size, max_side, quality
        self.total: dict[str, int] = {}
        self.candidates: dict[str, dict[int, list[dict]]] = {}  # split -> image id -> its packable annotations
        for s, det in self.loaded:
            ids = sorted(det.imgs)
            if limit:
                ids = ids[:limit]
            idset = set(ids)
            anns = sorted(det.anns.values(), key=lambda a: (a.get("image_id") if isinstance(a.get("image_id"), int)
                                                            else -1, a["id"]))
            if limit:  # objects of the images left out by --limit are not part of this pack
                anns = [a for a in anns if a.get("image_id") in idset or a.get("image_id") not in det.imgs]
            candidates: dict[int, list[dict]] = {}
            for ann in anns:
                named = {"file": s.annotations, **self._ids(s.name, ann)}
                if ann.get("image_id") not in det.imgs:
                    self.tally.drop(s.name, "unknown_image", detail=f"image_id {ann.get('image_id')!r}", **named)
                elif ann.get("category_id") not in self.cat_index:
                    self.tally.drop(s.name, "unknown_category", detail=f"category_id {ann.get('category_id')!r}",
                                    **named)
                elif ann.get("iscrowd", 0):
                    self.tally.drop(s.name, "crowd", **named)
                else:
                    candidates.setdefault(ann["image_id"], []).append(ann)
            self.total[s.name], self.candidates[s.name] = len(anns), candidates
        self.options = self._options_with(mode="objects", margin=margin, min_size=min_size, max_side=max_side,
                                          quality=quality, max_samples=max_samples, limit=limit, on_leak=on_leak)

    def images(self) -> list[ImageItem]:
        return [self._image(s, det, i, samples=len(self.candidates[s.name][i]))
                for s, det in self.loaded for i in sorted(self.candidates[s.name])]

    def plan(self, image, meta):
        keep = []
        for ann in self.candidates[image.split][image.info]:
            reason, visible, crop = check_box(ann, meta["width"], meta["height"], self.min_size, self.margin)
            if reason:
                self.tally.drop(image.split, reason, file=meta["path"], detail=f"bbox {ann.get('bbox')!r}",
                                **self._ids(image.split, ann))
            else:
                keep.append((ann, visible, crop))
        if not keep:
            return None
        return Task((meta["path"], meta["sha1"], [c for _, _, c in keep], self.max_side, self.quality), keep, len(keep))

    def sample_ids(self, image, task=None):
        anns = [a for a, _, _ in task.info] if task else self.candidates[image.split][image.info]
        return [self._ids(image.split, a) for a in anns]

    def samples(self, image, meta, task, result):
        det = self.dets[image.split]
        for (ann, visible, crop), (data, size) in zip(task.info, result):
            ann_id = ann["segment_id"] if det.format == "panoptic" else ann["id"]
            sample = {"id": image.info, "ann_id": ann_id, "category_id": ann["category_id"],
                      "labels": [self.cat_index[ann["category_id"]]], "box": [float(t) for t in ann["bbox"]],
                      "crop_box": crop, "box_in_crop": box_in_crop(visible, crop, size),
                      "width": size[0], "height": size[1], "file_name": det.imgs[image.info]["file_name"]}
            yield f"{image.info:012d}_{ann_id}", {"jpg": data, "json": sample}, None

    def report(self, verified: dict) -> dict:
        report = {}
        for s in self.splits:
            packed, dropped, total = self.tally.packed[s], self.tally.dropped(s), self.total[s]
            assert packed + sum(dropped.values()) == total, (s, packed, dropped, total)
            report[s] = {"objects": total, "packed": packed, "dropped": dropped, "images": len(self.candidates[s]),
                         "format": self.dets[s].format}
        return report


def pack_coco_objects(out_dir: str | os.PathLike, splits: list[AnnSource], *, dataset: str = "coco-objects",
                      max_samples: int = 1000, limit: int = 0, margin: float = 0.1, min_size: float = 16,
                      max_side: int = 0, quality: int = 90, workers: int | None = None, on_leak: str = "error",
                      progress: bool = True, overwrite: bool = False, max_dropped: float = DEFAULT_MAX_DROPPED) -> dict:
    """One sample per object: its box crop with context. Every annotation is packed or counted."""
    fmt = ObjectsFormat(splits, dataset=dataset, max_samples=max_samples, limit=limit, margin=margin,
                        min_size=min_size, max_side=max_side, quality=quality, on_leak=on_leak)
    return pack(fmt, out_dir, max_samples=max_samples, workers=workers, on_leak=on_leak, overwrite=overwrite,
                progress=progress, max_dropped=max_dropped)


def summary_lines(manifest: dict, what: str = "images") -> Iterable[str]:
    """One line per split: packed, total and the drop reasons that occurred."""
    names = [k for k in manifest["report"] if k != "leakage"]
    for name in names + [k for k in manifest["splits"] if k not in names]:
        rep = manifest["report"].get(name, {})
        drops = ", ".join(f"{k} {v}" for k, v in sorted(rep.get("dropped", {}).items()) if v) or "none"
        total = rep.get("objects", rep.get("images", "?"))
        yield f"{name}: packed {rep.get('packed', 0)} of {total} {what}; dropped: {drops}"
