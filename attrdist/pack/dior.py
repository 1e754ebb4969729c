"""DIOR (remote-sensing object detection, 20 classes) in its official layout -> attrdist shards.

Layout read (as distributed):

    <root>/JPEGImages-trainval/<id>.jpg      <root>/JPEGImages-test/<id>.jpg
    <root>/Annotations/Horizontal Bounding Boxes/<id>.xml    (VOC-style, <bndbox>)
    <root>/Annotations/Oriented Bounding Boxes/<id>.xml      (<robndbox> corner points + <angle>)
    <root>/ImageSets/Main/{train,val,test}.txt               (one id per line)

Each listed id with its image becomes one sample per official split:

    <id>.jpg   the original bytes (or re-encoded when --max-side shrinks it)
    <id>.json  {"id", "image_id" (id in coco_<split>.json), "file_name", "width", "height",
                "labels": sorted unique classes present (image-level multi-hot),
                "boxes": [[x, y, w, h] in pixels of the stored image], "box_labels", "ann_ids"}

Boxes come from <bndbox> where present, else the axis-aligned hull of the oriented corners. They
are clipped to the image; zero-area and fully-outside boxes are dropped and counted. An id whose
image is missing is counted ("missing_image"), not fatal. `coco_<split>.json` (COCO instances
of exactly the packed images, categories 1..20) is published with the shards for pycocotools.

`DiorFormat` is run by `attrdist.pack.pipeline.pack`: pass 1 (worker processes) parses the XML,
decodes and fingerprints each image and keeps only small metadata; then the cross-split leakage
check; pass 2 writes the samples in order.
"""

from __future__ import annotations

import io
import json
import os
import re
import zlib
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from attrdist.errors import AttrdistError
from attrdist.pack.pipeline import (DEFAULT_MAX_DROPPED, ImageItem, ItemError, ItemFailure, PackFormat, Task, Tally,
                                    job_identity, pack, read_checked,
                                    resize_max_side, verify_bytes)
from attrdist.pack.writer import source_entry

# (raw DIOR spelling, canonical snake_case name), in DIOR's official class order (COCO ids 1..20).
DIOR_CLASSES: list[tuple[str, str]] = [
    ("airplane", "airplane"), ("airport", "airport"), ("baseballfield", "baseball_field"),
    ("basketballcourt", "basketball_court"), ("bridge", "bridge"), ("chimney", "chimney"), ("dam", "dam"),
    ("Expressway-Service-area", "expressway_service_area"), ("Expressway-toll-station", "expressway_toll_station"),
    ("golffield", "golf_field"), ("groundtrackfield", "ground_track_field"), ("harbor", "harbor"),
    ("overpass", "overpass"), ("ship", "ship"), ("stadium", "stadium"), ("storagetank", "storage_tank"),
    ("tenniscourt", "tennis_court"), ("trainstation", "train_station"), ("vehicle", "vehicle"),
    ("windmill", "windmill"),
]
CLASS_NAMES = [c for _, c in DIOR_CLASSES]
VARIANTS = {"horizontal": "Horizontal Bounding Boxes", "oriented": "Oriented Bounding Boxes"}
IMAGE_DIRS = ("JPEGImages-trainval", "JPEGImages-test")
SPLITS = ("train", "val", "test")


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


_INDEX = {_norm(raw): i for i, (raw, _) in enumerate(DIOR_CLASSES)} | {_norm(c): i for i, c in enumerate(CLASS_NAMES)}


def class_index(raw: str) -> int | None:
    """Index into CLASS_NAMES of a raw DIOR class spelling (case, '-', '_' and spaces ignored)."""
    return _INDEX.get(_norm(raw))


def prompt(name: str) -> str:
    words = name.replace("_", " ")
    return f"a satellite image of {'an' if words[0] in 'aeiou' else 'a'} {words}"


PROMPTS = [prompt(c) for c in CLASS_NAMES]


def _safe_name(name: str, where: Path) -> str:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or "\x00" in name:
        raise AttrdistError(f"{where}: file name {name!r} is empty, absolute or contains '..'; "
                            f"refusing to read outside the dataset root; fix the entry")
    return name


@dataclass(frozen=True)
class DiorObject:
    label: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (original image pixels, unclipped)


@dataclass(frozen=True)
class DiorAnnotation:
    file_name: str
    width: int | None
    height: int | None
    objects: tuple[DiorObject, ...]


def _num(el: ET.Element, path: Path) -> float:
    try:
        v = float((el.text or "").strip())
    except ValueError:
        raise AttrdistError(f"{path}: <{el.tag}> is {el.text!r}, not a number; fix or re-download the file") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise AttrdistError(f"{path}: <{el.tag}> is {el.text!r}, not a finite number; fix or re-download the file")
    return v


def parse_dior_xml(path: str | os.PathLike) -> DiorAnnotation:
    """Parse either DIOR XML variant; raises AttrdistError (one line naming the file) when bad."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise AttrdistError(f"{path}: annotation file not found; check --root (expects the official DIOR layout)") from None
    except OSError as e:
        raise AttrdistError(f"{path}: cannot read annotation file ({e.strerror}); check its permissions") from None
    except ET.ParseError as e:
        raise AttrdistError(f"{path}: malformed XML ({' '.join(str(e).split())[:160]}); re-download the "
                            f"annotation") from None
    if root.tag != "annotation":
        raise AttrdistError(f"{path}: root element is <{root.tag}>, not <annotation>; not a DIOR annotation file")
    fname = (root.findtext("filename") or "").strip() or f"{path.stem}.jpg"
    _safe_name(fname, path)
    w = root.find("size/width")
    h = root.find("size/height")
    width, height = (int(_num(w, path)) if w is not None else None), (int(_num(h, path)) if h is not None else None)
    objects = []
    for k, obj in enumerate(root.iter("object")):
        raw = (obj.findtext("name") or "").strip()
        label = class_index(raw)
        if label is None:
            raise AttrdistError(f"{path}: object {k} has unknown class {raw!r} (DIOR has: "
                                f"{', '.join(r for r, _ in DIOR_CLASSES)}); fix the name in the XML")
        bb = obj.find("bndbox")
        if bb is not None:
            coords = {}
            for t in ("xmin", "ymin", "xmax", "ymax"):
                el = bb.find(t)
                if el is None:
                    raise AttrdistError(f"{path}: object {k} <bndbox> has no <{t}>; fix or re-download the file")
                coords[t] = _num(el, path)
            box = (coords["xmin"], coords["ymin"], coords["xmax"], coords["ymax"])
        else:
            # oriented variant: <robndbox> x_left_top/y_left_top... or <polygon> x1..y4: hull of the corners
            ob = obj.find("robndbox")
            if ob is None:
                ob = obj.find("polygon")
            if ob is None:
                raise AttrdistError(f"{path}: object {k} has neither <bndbox> nor <robndbox>/<polygon>; "
                                    f"fix or re-download the file")
            xs = [_num(el, path) for el in ob if el.tag.lower().startswith("x")]
            ys = [_num(el, path) for el in ob if el.tag.lower().startswith("y")]
            if len(xs) < 2 or len(xs) != len(ys):
                raise AttrdistError(f"{path}: object {k} <{ob.tag}> has {len(xs)} x and {len(ys)} y corner "
                                    f"coordinates; fix or re-download the file")
            box = (min(xs), min(ys), max(xs), max(ys))
        objects.append(DiorObject(label, box))
    return DiorAnnotation(fname, width, height, tuple(objects))


def clip_boxes(objects, width: int, height: int) -> tuple[list[list[float]], list[int], Counter, list]:
    """Clip (x0, y0, x1, y1) boxes to the image; return kept [x, y, w, h], labels, counts of dropped
    ('zero_area', 'outside_image') and 'clipped' boxes, and the dropped ones as (object index, reason, box)."""
    boxes, labels, counts, dropped = [], [], Counter(), []
    for k, o in enumerate(objects):
        x0, y0, x1, y1 = o.box
        if x1 <= x0 or y1 <= y0:
            counts["zero_area"] += 1
            dropped.append((k, "zero_area", list(o.box)))
            continue
        cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
        if cx1 <= cx0 or cy1 <= cy0:
            counts["outside_image"] += 1
            dropped.append((k, "outside_image", list(o.box)))
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            counts["clipped"] += 1
        boxes.append([cx0, cy0, cx1 - cx0, cy1 - cy0])
        labels.append(o.label)
    return boxes, labels, counts, dropped


# ----------------------------------------------------------------------------------------------
# Per-item work (module level: run in worker processes)
# ----------------------------------------------------------------------------------------------


def _probe(item: tuple[str, str, tuple[str, ...]]) -> dict:
    """Pass 1: parse the XML, find + decode once (verified) + fingerprint the image; small metadata only."""
    xml, root, image_dirs = item
    ann = parse_dior_xml(xml)
    img = next((Path(root) / d / ann.file_name for d in image_dirs if (Path(root) / d / ann.file_name).is_file()), None)
    if img is None:
        where = [Path(root) / d / ann.file_name for d in image_dirs]
        raise ItemFailure("missing_image", f"{ann.file_name}: in none of {', '.join(map(str, where))}",
                          where[0] if where else Path(root) / ann.file_name)
    data = img.read_bytes()
    v = verify_bytes(data, str(img))  # one decode: verified and fingerprinted
    w, h = v["width"], v["height"]
    boxes, labels, counts, dropped = clip_boxes(ann.objects, w, h)
    return {"path": str(img), "bytes": len(data), "file_name": ann.file_name, "width": w, "height": h,
            "sha1": v["sha1"], "phash": v["phash"],
            "boxes": boxes, "box_labels": labels, "box_counts": dict(counts), "boxes_dropped": dropped,
            "size_mismatch": ann.width is not None and (ann.width, ann.height) != (w, h)}


def _encode(item: tuple[str, str, int, int]) -> tuple[bytes, str, int, int, int]:
    """Pass 2: the bytes to store (original, or shrunk to max_side and re-encoded) and their crc32; they must
    still be those pass 1 verified (else changed_during_pack)."""
    path, sha1, max_side, quality = item
    data = read_checked(path, sha1)
    if max_side:
        try:
            data, (w, h), _ = resize_max_side(data, max_side, quality)
        except UnidentifiedImageError:
            raise ItemFailure("not_an_image") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ItemFailure("corrupt_image", str(e)) from None
    with Image.open(io.BytesIO(data)) as im:
        fmt, (w, h) = im.format, im.size
    return data, ("png" if fmt == "PNG" else "jpg"), w, h, zlib.crc32(data)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


def _annotation_dir(root: Path, boxes: str) -> Path:
    if boxes not in VARIANTS:
        raise AttrdistError(f"--boxes {boxes!r}: expected one of {', '.join(VARIANTS)}")
    first = root / "Annotations" / VARIANTS[boxes]
    if first.is_dir():
        return first
    name = "oriented" if boxes == "horizontal" else "horizontal"
    if (root / "Annotations" / VARIANTS[name]).is_dir():  # never read the other variant in its place
        raise AttrdistError(f"{first}: annotation folder not found, but {VARIANTS[name]}/ is there; pass --boxes {name} "
                            f"to pack those boxes")
    raise AttrdistError(f"{first}: annotation folder not found; --root must be the DIOR root holding Annotations/, "
                        f"ImageSets/ and JPEGImages-*")


def read_split_ids(path: Path) -> list[str]:
    if path.is_dir():
        raise AttrdistError(f"{path}: is a folder, not a split file; ImageSets/Main must hold train.txt, val.txt, test.txt")
    if not path.is_file():
        raise AttrdistError(f"{path}: split file not found; choose --splits among those in {path.parent}")
    try:
        lines = path.read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise AttrdistError(f"{path}: cannot read split file ({' '.join(str(e).split())[:160]}); re-download "
                            f"ImageSets/Main") from None
    ids = []
    for s in lines:
        _safe_name(s, path)
        if "/" in s:
            raise AttrdistError(f"{path}: id {s!r} contains '/'; ImageSets lists bare image ids, fix the file")
        ids.append(s)
    return ids


def _scale_box(b: list[float], sx: float, sy: float) -> list[float]:
    return [round(b[0] * sx, 2), round(b[1] * sy, 2), round(b[2] * sx, 2), round(b[3] * sy, 2)]


class DiorFormat(PackFormat):
    """The official DIOR splits (ImageSets/Main/<split>.txt) as image-level samples with boxes (`pack_dior`)."""

    verify = staticmethod(_probe)  # parses the XML too
    produce = staticmethod(_encode)
    attributes = CLASS_NAMES

    def __init__(self, root: Path, *, splits: list[str] | None, boxes: str, max_side: int, quality: int, on_leak: str,
                 dataset: str, limit: int):
        if not root.is_dir():
            raise AttrdistError(f"{root}: DIOR root directory not found; check --root")
        if on_leak not in ("error", "warn", "drop"):
            raise AttrdistError(f"--on-leak {on_leak!r}: expected error, warn or drop")
        self.root, self.ann_dir = root, _annotation_dir(root, boxes)
        sets = root / "ImageSets" / "Main"
        if splits is None:  # the official split files there that list ids (an empty one is left out, and said so)
            present = [s for s in SPLITS if (sets / f"{s}.txt").is_file()]
            splits = [s for s in present if read_split_ids(sets / f"{s}.txt")]
            if not splits:
                raise AttrdistError(f"{sets}: no train.txt/val.txt/test.txt listing ids here; --root must be the DIOR "
                                    f"root" + (f" ({', '.join(present)} are empty)" if present else ""))
            self.empty_split_files = [s for s in present if s not in splits]
        else:
            self.empty_split_files = []
        self.dataset, self.splits, self.where = dataset, list(splits), str(root)
        self.max_side, self.quality = max_side, quality
        self.image_dirs = tuple(d for d in IMAGE_DIRS if (root / d).is_dir())
        needed = {"test": "JPEGImages-test"}
        for split in self.splits:
            want = needed.get(split, "JPEGImages-trainval")
            if not (root / want).is_dir():
                raise AttrdistError(f"{root / want}: image folder not found, and split {split!r} takes its images from "
                                    f"there; unpack DIOR's {want}.zip into --root (or leave {split} out of --splits)")
        self.tally = Tally(self.splits, ("duplicate_id",))
        self.ids: dict[str, list[str]] = {}
        self.listed: dict[str, int] = {}
        for split in self.splits:
            raw = read_split_ids(sets / f"{split}.txt")
            uniq = list(dict.fromkeys(raw))
            self.ids[split] = uniq[:limit] if limit else uniq
            self.listed[split] = len(raw)
            for dup in (k for k, n in Counter(raw).items() if n > 1):
                self.tally.drop(split, "duplicate_id", Counter(raw)[dup] - 1, file=sets / f"{split}.txt", key=dup)
        self.sources = [source_entry(sets / f"{s}.txt") for s in self.splits]
        self.inputs = [self.ann_dir, sets, *(root / d for d in self.image_dirs)]
        self._options = {"root": str(root), "annotations": str(self.ann_dir.relative_to(root)), "splits": self.splits,
                         "max_side": max_side, "quality": quality, "limit": limit, "on_leak": on_leak,
                         "box_format": "xywh pixels of the stored image", "prompts": PROMPTS,
                         "empty_split_files_left_out": self.empty_split_files,
                         "raw_class_names": [r for r, _ in DIOR_CLASSES]}
        self.kept: dict[str, list[str]] = {s: [] for s in self.splits}  # ids planned for pass 2
        self.next_ann: Counter = Counter()  # split -> the COCO annotation id of the next box planned
        self.coco: dict[str, dict] = {}  # split -> COCO instances of the packed images
        self.boxes, self.box_counts = Counter(), {s: {c: 0 for c in CLASS_NAMES} for s in self.splits}

    def images(self) -> list[ImageItem]:
        return [ImageItem(s, i, (str(self.ann_dir / f"{i}.xml"), str(self.root), self.image_dirs))
                for s in self.splits for i in self.ids[s]]

    def file_of(self, image):
        return image.path[0]  # the annotation XML

    def plan(self, image, meta):
        for k, reason, box in meta["boxes_dropped"]:
            self.tally.drop_box(image.split, reason, file=image.path[0], object=k, detail=f"box {box}")
        self.kept[image.split].append(image.key)
        first_ann = self.next_ann[image.split] + 1
        self.next_ann[image.split] += len(meta["boxes"])
        # ids fixed here, in pack order (`samples` runs in a shard's worker too): the image's position among
        # those planned and its first box's annotation id (an image pass 2 drops leaves its ids unused)
        return Task((meta["path"], meta["sha1"], self.max_side, self.quality), (len(self.kept[image.split]), first_ann))

    def samples(self, image, meta, task, result):
        data, ext, w, h, crc = result
        split, i = image.split, image.key
        sx, sy = w / meta["width"], h / meta["height"]
        c = self.coco.setdefault(split, {"images": [], "annotations": [],
                                         "numeric": all(k.isdigit() for k in self.kept[split])})
        position, first_ann = task.info
        image_id = int(i) if c["numeric"] else position
        bxs = [_scale_box(b, sx, sy) for b in meta["boxes"]]
        ann_ids = list(range(first_ann, first_ann + len(bxs)))
        c["images"].append({"id": image_id, "file_name": f"{i}.{ext}", "width": w, "height": h})
        for aid, b, lab in zip(ann_ids, bxs, meta["box_labels"]):
            c["annotations"].append({"id": aid, "image_id": image_id, "category_id": lab + 1, "bbox": b,
                                     "area": round(b[2] * b[3], 4), "iscrowd": 0})
            self.box_counts[split][CLASS_NAMES[lab]] += 1
        self.boxes[split] += len(bxs)
        sample = {"id": i, "image_id": image_id, "file_name": meta["file_name"], "width": w, "height": h,
                  "labels": sorted(set(meta["box_labels"])), "boxes": bxs, "box_labels": meta["box_labels"],
                  "ann_ids": ann_ids}
        yield i, {ext: data, "json": sample}, {ext: crc}

    def files(self) -> dict[str, bytes]:
        """coco_<split>.json: COCO instances of exactly the packed images, for pycocotools."""
        categories = [{"id": k + 1, "name": n, "supercategory": "dior"} for k, n in enumerate(CLASS_NAMES)]
        return {f"coco_{split}.json": json.dumps({
            "info": {"description": f"{self.dataset} {split} (attrdist pack)"}, "licenses": [],
            "images": c["images"], "annotations": c["annotations"], "categories": categories}).encode()
            for split, c in self.coco.items()}

    def job(self, verified: dict) -> dict:
        return job_identity(verified, options=self._options, sources=self.sources)

    @property
    def options(self) -> dict:
        return {**self._options, "coco_instances": {split: f"coco_{split}.json" for split in self.coco}}

    def report(self, verified: dict) -> dict:
        report = {}
        for split in self.splits:
            boxes_dropped, clipped, mismatch, missing = Counter(), 0, 0, []
            for i in self.ids[split]:  # pass 1's findings, for every image read (leaked ones too)
                m = verified[(split, i)]
                if isinstance(m, ItemError):
                    if m.reason == "missing_image" and len(missing) < 5:
                        missing.append(i)
                    continue
                counts = dict(m["box_counts"])
                clipped += counts.pop("clipped", 0)
                boxes_dropped.update(counts)
                mismatch += int(m["size_mismatch"])
            report[split] = {"listed": self.listed[split], "packed": self.tally.packed[split],
                             "dropped": self.tally.dropped(split), "boxes": self.boxes[split],
                             "boxes_dropped": dict(boxes_dropped), "boxes_clipped": clipped, "size_mismatch": mismatch,
                             "box_counts": self.box_counts[split], "missing_image_examples": missing}
        return report


def pack_dior(root: str | os.PathLike, out_dir: str | os.PathLike, *, splits: list[str] | None = None,
              boxes: str = "horizontal", max_side: int = 0, quality: int = 90, workers: int | None = None,
              on_leak: str = "error", dataset: str = "dior", max_samples: int = 1000, limit: int = 0,
              overwrite: bool = False, max_dropped: float = DEFAULT_MAX_DROPPED, progress: bool = True) -> dict:
    """Pack the official DIOR splits (ImageSets/Main/<split>.txt). Returns the manifest."""
    fmt = DiorFormat(Path(root), splits=splits, boxes=boxes, max_side=max_side, quality=quality, on_leak=on_leak,
                     dataset=dataset, limit=limit)
    return pack(fmt, out_dir, max_samples=max_samples, workers=workers, on_leak=on_leak, overwrite=overwrite,
                progress=progress, max_dropped=max_dropped)
