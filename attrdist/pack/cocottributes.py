"""COCO Attributes (Patterson & Hays, ECCV 2016) -> object crops with 204 attribute labels.

The released `cocottributes_eccv_version.pkl` is a pickle of a dict:
    ann_vecs            patch_id -> 204 float votes (numpy array)
    patch_id_to_ann_id  patch_id -> COCO annotation id
    split               patch_id -> 'train2014' | 'val2014'
    attributes          [{"id", "name"}]; sorted by id = the vote-vector order

It is read with a restricted unpickler (`load_pickle`): only builtin containers/scalars and the
numpy functions that rebuild arrays and scalars are admitted; any other global (os.system,
subprocess, eval, ...) is refused with a one-line error before anything runs.

Labels: vote >= threshold (default 0.5) -> positive ("labels"). Unlabelled entries -- a NaN or a
negative vote (the pickle has no other marker) -- go to "labels_ignore" and are masked out of
loss and metrics by the data loader. A patch with no vote vector at all is dropped ("no_votes");
one whose vector has the wrong length is dropped ("bad_vector").

Each object is located through its COCO annotation id in one or more instances JSONs
(`instances`, 2014 and/or 2017: ids are the same in both, images moved between splits); the
first JSON holding the id wins. Its image is looked for under each `images` directory, by the
JSON's file name, then by the 2017 name (000000xxxxxx.jpg) and the 2014 names
(COCO_{train,val}2014_000000xxxxxx.jpg). Output split = the pickle's split ('train2014' ->
train, 'val2014' -> val, anything starting with train/val likewise). Crops as in
`attrdist.pack.coco.pack_coco_objects` (margin, min size, JPEG quality).

Every patch that is not packed is counted by reason per split: no_votes, bad_vector,
unknown_split, no_annotation_id, crowd, bad_box, box_too_small, image_missing, not_an_image,
corrupt_image, leak. Sample JSON: {"id" (image id), "ann_id", "patch_id", "category_id",
"labels", "labels_ignore", "box", "crop_box", "box_in_crop", "width", "height", "file_name"}.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np

from attrdist.errors import AttrdistError
from attrdist.pack.coco import box_in_crop, check_box, crop_items, load_detections, safe_join
from attrdist.pack.pipeline import DEFAULT_MAX_DROPPED, ImageItem, PackFormat, Task, Tally, pack, verify_image
from attrdist.pack.writer import source_entry


REASONS = ("no_votes", "bad_vector", "unknown_split", "no_annotation_id", "crowd", "bad_box", "box_too_small",
           "image_missing", "not_an_image", "corrupt_image", "leak")
_RENAME = {"missing_image": "image_missing", "too_small": "box_too_small"}
REQUIRED_KEYS = ("ann_vecs", "patch_id_to_ann_id", "split", "attributes")


def _np_core():
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def _allowed() -> dict[tuple[str, str], object]:
    import _codecs
    import builtins
    import collections

    multiarray, numeric = _np_core()
    ok: dict[tuple[str, str], object] = {}
    for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
                 "complex", "bool", "slice", "range"):
        ok[("builtins", name)] = getattr(builtins, name)
        ok[("__builtin__", name)] = getattr(builtins, name)  # Python 2 pickles
    ok[("__builtin__", "unicode")] = str
    ok[("__builtin__", "long")] = int
    ok[("copy_reg", "_reconstructor")] = ok[("copyreg", "_reconstructor")] = _safe_reconstructor
    ok[("collections", "OrderedDict")] = collections.OrderedDict
    ok[("collections", "defaultdict")] = collections.defaultdict
    ok[("_codecs", "encode")] = _codecs.encode  # bytes in protocol-2 pickles written by Python 3
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        ok[(mod, "_reconstruct")] = multiarray._reconstruct
        ok[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        ok[(mod, "_frombuffer")] = numeric._frombuffer
    ok[("numpy", "ndarray")] = np.ndarray
    ok[("numpy", "dtype")] = np.dtype
    for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
              "uint64", "bool_"):
        ok[("numpy", t)] = getattr(np, t)
    return ok


def _safe_reconstructor(cls, base, state):
    """copyreg._reconstructor for old-protocol pickles; cls/base already passed `find_class`."""
    import copyreg

    if not (isinstance(cls, type) and isinstance(base, type)):
        raise pickle.UnpicklingError(f"copyreg._reconstructor({cls!r}, {base!r})")
    return copyreg._reconstructor(cls, base, state)


class RestrictedUnpickler(pickle.Unpickler):
    """Admits builtin containers/scalars and numpy array/scalar reconstruction; refuses every other global."""

    def __init__(self, f, path: Path):
        super().__init__(f, encoding="latin1")  # Python 2 pickles (the released file is one)
        self.path = path
        self.allowed = _allowed()

    def find_class(self, module: str, name: str):
        obj = self.allowed.get((module, name))
        if obj is None:
            where = f"{module}.{name}"
            where = where if where.isprintable() else ascii(where)  # one line, whatever the pickle holds
            raise AttrdistError(f"{self.path}: pickle refers to {where}, which is not allowed (only builtin "
                                f"containers and numpy arrays); refusing to load it: use the released "
                                f"cocottributes_eccv_version.pkl or re-save it as plain dicts + numpy arrays")
        return obj


def load_pickle(path: str | os.PathLike):
    path = Path(path)
    if path.is_dir():
        raise AttrdistError(f"{path}: is a folder, not the COCO Attributes pickle; pass the path of "
                            f"cocottributes_eccv_version.pkl itself")
    if not path.is_file():
        raise AttrdistError(f"{path}: COCO Attributes pickle not found; pass the path of cocottributes_eccv_version.pkl")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path).load()
    except AttrdistError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated / not a pickle
        raise AttrdistError(f"{path}: not a readable pickle ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                            f"re-download cocottributes_eccv_version.pkl") from None


def load_cocottributes(path: str | os.PathLike) -> dict:
    """The pickle, checked: {"ann_vecs", "patch_id_to_ann_id", "split", "attributes" (sorted by id)}."""
    path = Path(path)
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise AttrdistError(f"{path}: expected a pickled dict with keys {', '.join(REQUIRED_KEYS)}, got "
                            f"{type(data).__name__}")
    data = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in data.items()}
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise AttrdistError(f"{path}: missing keys {missing} (have {sorted(map(str, data))[:8]}); "
                            f"expected the COCO Attributes ECCV pickle")
    for k in ("ann_vecs", "patch_id_to_ann_id", "split"):
        if not isinstance(data[k], dict):
            raise AttrdistError(f"{path}: {k!r} is a {type(data[k]).__name__}, expected a dict keyed by patch id")
        bad = next((p for p in data[k] if not isinstance(p, (int, np.integer, str, bytes)) or isinstance(p, bool)), None)
        if bad is not None:
            raise AttrdistError(f"{path}: {k!r} has the key {bad!r} ({type(bad).__name__}); patch ids are integers "
                                f"(or strings): expected the COCO Attributes ECCV pickle")
    attrs = data["attributes"]
    try:
        if not isinstance(attrs, (list, tuple)) or not all(isinstance(a, dict) for a in attrs):
            raise TypeError("not a list of dicts")
        attrs = sorted(({"id": int(a["id"]), "name": str(a["name"])} for a in attrs), key=lambda a: a["id"])
    except (TypeError, KeyError, ValueError, OverflowError):
        raise AttrdistError(f"{path}: 'attributes' must be a list of {{'id', 'name'}} entries") from None
    if len({a["name"] for a in attrs}) != len(attrs) or len({a["id"] for a in attrs}) != len(attrs):
        raise AttrdistError(f"{path}: duplicate attribute ids or names in 'attributes'")
    data["attributes"] = attrs
    return data


def vote_labels(vec, n: int, threshold: float) -> tuple[list[int], list[int]] | None:
    """(positives, unlabelled) indices, or None if the vector is not n numbers."""
    try:
        v = np.asarray(vec, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    if v.shape[0] != n:
        return None
    unl = np.isnan(v) | (v < 0)
    pos = (v >= threshold) & ~unl
    return [int(i) for i in np.flatnonzero(pos)], [int(i) for i in np.flatnonzero(unl)]


def output_split(value) -> str | None:
    v = value.decode("latin1") if isinstance(value, bytes) else str(value)
    for name in ("train", "val"):
        if v.startswith(name):
            return name
    return None


def _image_candidates(dirs: list[Path], file_name: str, image_id: int, ann_file: Path) -> list[str]:
    names = [file_name, f"{image_id:012d}.jpg", f"COCO_train2014_{image_id:012d}.jpg",
             f"COCO_val2014_{image_id:012d}.jpg"]
    out = []
    for d in dirs:
        for n in dict.fromkeys(names):
            out.append(str(safe_join(d, n, ann_file)))
    return out


class CocottributesFormat(PackFormat):
    """Every COCO Attributes patch as a crop sample, or counted by why not (`pack_cocottributes`)."""

    verify = staticmethod(verify_image)  # the first of the image's candidate paths that exists
    produce = staticmethod(crop_items)

    def __init__(self, pkl: Path, instances: list[str | os.PathLike], image_dirs: list[Path], *, dataset: str,
                 threshold: float, margin: float, min_size: float, max_side: int, quality: int, max_samples: int,
                 limit: int, on_leak: str):
        for d in image_dirs:
            if not d.is_dir():
                raise AttrdistError(f"{d}: image directory not found; check --images")
        if not instances:
            raise AttrdistError("no --instances JSON given; pass the COCO 2014 and/or 2017 instances files")
        if margin < 0 or min_size < 0:
            raise AttrdistError(f"--margin {margin} / --min-size {min_size}: must be >= 0")
        data = load_cocottributes(pkl)
        attrs = data["attributes"]
        dets = [load_detections(p) for p in instances]
        for det in dets:
            if det.format != "instances":
                raise AttrdistError(f"{det.path}: a panoptic JSON has no COCO annotation ids; pass an instances JSON")
        self.dataset, self.attributes, self.splits = dataset, [a["name"] for a in attrs], ["train", "val"]
        self.tally = Tally([*self.splits, "unassigned"], REASONS, _RENAME)  # unassigned: the split is unknown
        self.sources = [source_entry(pkl)] + [source_entry(p) for p in instances]
        self.inputs = [pkl, *instances, *image_dirs]
        self.margin, self.min_size, self.max_side, self.quality = margin, min_size, max_side, quality
        self.options = {"mode": "cocottributes", "threshold": threshold,
                        "unlabelled": "NaN or negative vote -> labels_ignore; no vote vector -> dropped (no_votes)",
                        "margin": margin, "min_size": min_size, "max_side": max_side, "quality": quality,
                        "max_samples": max_samples, "limit": limit, "on_leak": on_leak,
                        "pickle": str(pkl), "instances": [str(p) for p in instances],
                        "images": [str(d) for d in image_dirs]}

        patches = sorted(data["patch_id_to_ann_id"], key=lambda p: (str(type(p)), p))
        self.patches = patches[:limit] if limit else patches
        self.totals: Counter = Counter()
        objs: dict[str, list] = {s: [] for s in self.splits}  # (image_id, ann_id, patch_id, ann, det, pos, ignore)
        for pid in self.patches:
            split = output_split(data["split"].get(pid, ""))
            named = {"file": pkl, "patch_id": _plain(pid)}
            if split is None:
                self.tally.drop("unassigned", "unknown_split", detail=f"split {data['split'].get(pid)!r}", **named)
                continue
            self.totals[split] += 1
            vec = data["ann_vecs"].get(pid)
            if vec is None:
                self.tally.drop(split, "no_votes", **named)
                continue
            lab = vote_labels(vec, len(attrs), threshold)
            if lab is None:
                self.tally.drop(split, "bad_vector", **named)
                continue
            try:
                ann_id = int(data["patch_id_to_ann_id"][pid])
            except (TypeError, ValueError, OverflowError):
                self.tally.drop(split, "no_annotation_id", detail=f"ann id {data['patch_id_to_ann_id'][pid]!r}", **named)
                continue
            named["ann_id"] = ann_id
            det = next((d for d in dets if ann_id in d.anns), None)
            if det is None:
                self.tally.drop(split, "no_annotation_id", detail="in none of the --instances JSONs", **named)
                continue
            ann = det.anns[ann_id]
            if ann.get("image_id") not in det.imgs:  # annotation points at an image the JSON does not list
                self.tally.drop(split, "no_annotation_id", detail=f"its image {ann.get('image_id')!r} is not in "
                                f"{det.path}", **named)
                continue
            if ann.get("iscrowd", 0):
                self.tally.drop(split, "crowd", **{**named, "file": det.path})
                continue
            objs[split].append((ann["image_id"], ann_id, pid, ann, det, lab[0], lab[1]))
        self._images = []
        for split in self.splits:
            by_image: dict[int, list] = {}
            for o in sorted(objs[split], key=lambda o: (o[0], o[1], str(o[2]))):
                by_image.setdefault(o[0], []).append(o)
            for image_id, group in sorted(by_image.items()):
                det = group[0][4]
                paths = _image_candidates(image_dirs, det.imgs[image_id]["file_name"], image_id, det.path)
                self._images.append(ImageItem(split, f"{image_id:012d}", paths, (image_id, group), len(group)))

    def images(self) -> list[ImageItem]:
        return self._images

    def plan(self, image, meta):
        keep = []
        for o in image.info[1]:
            reason, visible, crop = check_box(o[3], meta["width"], meta["height"], self.min_size, self.margin)
            if reason:
                self.tally.drop(image.split, reason, file=meta["path"], ann_id=o[1], patch_id=_plain(o[2]),
                                detail=f"bbox {o[3].get('bbox')!r}")
            else:
                keep.append((o, visible, crop))
        if not keep:
            return None
        return Task((meta["path"], meta["sha1"], [c for _, _, c in keep], self.max_side, self.quality), keep, len(keep))

    def samples(self, image, meta, task, result):
        image_id = image.info[0]
        for (o, visible, crop), (jpg, size) in zip(task.info, result):
            _, ann_id, pid, ann, det, pos, ignore = o
            sample = {"id": image_id, "ann_id": ann_id, "patch_id": _plain(pid),
                      "category_id": ann.get("category_id"), "labels": pos, "labels_ignore": ignore,
                      "box": [float(t) for t in ann["bbox"]], "crop_box": crop,
                      "box_in_crop": box_in_crop(visible, crop, size), "width": size[0], "height": size[1],
                      "file_name": os.path.basename(meta["path"])}
            yield f"{image_id:012d}_{ann_id}_{_plain(pid)}", {"jpg": jpg, "json": sample}, None

    def sample_ids(self, image, task=None):
        objs = [o for o, _, _ in task.info] if task else image.info[1]
        return [{"ann_id": o[1], "patch_id": _plain(o[2])} for o in objs]

    def report(self, verified: dict) -> dict:
        report = {}
        for split in self.splits:
            packed, dropped = self.tally.packed[split], self.tally.dropped(split)
            assert packed + sum(dropped.values()) == self.totals[split], (split, packed, dropped, self.totals[split])
            report[split] = {"objects": self.totals[split], "packed": packed, "dropped": dropped}
        unsplit = Counter(self.tally.dropped("unassigned"))
        report["unassigned"] = {"objects": sum(unsplit.values()),
                                "dropped": {"unknown_split": unsplit["unknown_split"]}}
        report["summary"] = {"matched": sum(report[s]["packed"] for s in self.splits), "objects": len(self.patches),
                             "dropped": dict(sum((Counter(report[s]["dropped"]) for s in self.splits), unsplit))}
        return report


def pack_cocottributes(out_dir: str | os.PathLike, pkl: str | os.PathLike, instances: list[str | os.PathLike],
                       images: list[str | os.PathLike], *, dataset: str = "cocottributes", threshold: float = 0.5,
                       margin: float = 0.1, min_size: float = 16, max_side: int = 0, quality: int = 90,
                       max_samples: int = 1000, limit: int = 0, workers: int | None = None, on_leak: str = "error",
                       progress: bool = True, overwrite: bool = False, max_dropped: float = DEFAULT_MAX_DROPPED) -> dict:
    """Pack every COCO Attributes patch as a crop sample, or count why not. Returns the manifest."""
    fmt = CocottributesFormat(Path(pkl), instances, [Path(d) for d in images], dataset=dataset, threshold=threshold,
                              margin=margin, min_size=min_size, max_side=max_side, quality=quality,
                              max_samples=max_samples, limit=limit, on_leak=on_leak)
    return pack(fmt, out_dir, max_samples=max_samples, workers=workers, on_leak=on_leak, overwrite=overwrite,
                progress=progress, max_dropped=max_dropped)


def _plain(pid):
    if isinstance(pid, (np.integer, np.floating)):
        return pid.item()
    if isinstance(pid, bytes):
        return pid.decode("latin1")
    return pid


def summary_line(manifest: dict) -> str:
    s = manifest["report"]["summary"]
    drops = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items(), key=lambda kv: -kv[1]) if v) or "none"
    return f"matched {s['matched']} of {s['objects']} objects; not matched: {drops}"
