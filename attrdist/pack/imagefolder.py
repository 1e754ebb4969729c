"""Image folders (`root/<class>/*.jpg|png...`) -> attrdist shards, with a seeded, group-aware split.

Two layouts:

    root/<class>/<files>                  split here into train/val(/test) by fractions
    root/<split>/<class>/<files>          --split-dirs: the official splits as given (no groups: the split
                                          and group options do not apply, and giving one is an error)

Each image becomes one sample `{"id": path relative to root, "class", "group" (null with --split-dirs),
"labels": [class index], "width", "height"}`; manifest attributes are the sorted class names.

The split (fractions mode) is a pure function of (seed, file list, groups): every member of a
group goes to the same split, and groups are assigned class by class (stratified by each group's
majority class) to the split furthest below its target. Groups come from `--group-by prefix`
(file stem cut at the n-th separator: `A_0012_aug3.jpg` -> `A_0012`), `--group-by csv` (columns
path,group) or `--group-by none` (each file its own group). A group split cannot separate
augmented copies that carry no group id, so the cross-split leakage check (content + perceptual
hash confirmed by pixels, attrdist.pack.leakage) runs on the result: `--on-leak error` (default) fails
(naming the pairs' files and a contact sheet, `<out>.leaks.png`; its advice: give copies one group, or with
--split-dirs, where the folders give the splits, move one of each pair), `drop` removes the leaked copies
from the later split, `warn` only reports.

`ImageFolderFormat` is run by `attrdist.pack.pipeline.pack` (verify, leak check, write). Unreadable or
corrupt files are counted by reason in the manifest report, never fatal.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from attrdist.errors import AttrdistError
from attrdist.pack.leakage import ADVICE_GROUPS
from attrdist.pack.pipeline import (DEFAULT_MAX_DROPPED, ImageItem, ItemFailure, PackFormat, Task, Tally, encode_jpeg, open_image, pack,
                                    read_checked, resize_max_side, verify_bytes)
from attrdist.pack.writer import source_entry


IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class ImageFile:
    rel: str      # path relative to root, '/'-separated (the sample id)
    cls: str
    group: str = ""


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def list_class_dir(root: Path, cls_dir: Path, cls: str, skipped: Counter) -> list[ImageFile]:
    """Image files under one class folder (recursive, sorted, symlinks not followed out of root)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(cls_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if fn.startswith("."):
                continue
            if p.suffix.lower() not in IMAGE_EXTS:
                skipped["not_an_image_extension"] += 1
                continue
            if p.is_symlink():
                try:
                    p.resolve().relative_to(root.resolve())
                except ValueError:
                    skipped["symlink_outside_root"] += 1
                    continue
            out.append(ImageFile(p.relative_to(root).as_posix(), cls))
    return out


def scan_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise AttrdistError(f"{root}: image folder root not found; check --root")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not _is_hidden(d))
    if not classes:
        raise AttrdistError(f"{root}: no class sub-folders; expected {root}/<class>/<images> "
                            f"(or pass --split-dirs for {root}/<split>/<class>/<images>)")
    return classes


# ----------------------------------------------------------------------------------------------
# Groups and the split
# ----------------------------------------------------------------------------------------------


def prefix_group(rel: str, sep: str = "_", parts: int = 2) -> str:
    """`A_0012_aug3.jpg` -> `A_0012` (sep '_', parts 2); a stem with fewer parts is its own group."""
    stem = Path(rel).stem
    return sep.join(stem.split(sep)[:parts]) if sep else stem


def read_group_csv(path: Path) -> dict[str, str]:
    """{relative path: group} from a CSV with header columns path,group."""
    if path.is_dir():
        raise AttrdistError(f"{path}: is a folder, not a groups CSV; pass the CSV file itself to --groups")
    if not path.is_file():
        raise AttrdistError(f"{path}: groups CSV not found; check --groups")
    groups: dict[str, str] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "group"} <= {c.strip() for c in reader.fieldnames}:
                raise AttrdistError(f"{path}: header must have columns path,group (got {reader.fieldnames}); fix the CSV")
            for lineno, row in enumerate(reader, start=2):
                row = {(k or "").strip(): v for k, v in row.items()}
                rel, group = (row.get("path") or "").strip(), (row.get("group") or "").strip()
                if not rel or not group:
                    raise AttrdistError(f"{path}:{lineno}: empty path or group; fix the CSV")
                p = Path(rel)
                if p.is_absolute() or ".." in p.parts or "\\" in rel:
                    raise AttrdistError(f"{path}:{lineno}: path {rel!r} is absolute or contains '..'; paths must be "
                                        f"relative to --root (refusing to read outside it)")
                groups[p.as_posix()] = group
    except (UnicodeDecodeError, csv.Error) as e:
        raise AttrdistError(f"{path}: malformed CSV ({' '.join(str(e).split())[:160]}); fix the file") from None
    except OSError as e:
        raise AttrdistError(f"{path}: cannot read groups CSV ({e.strerror}); check its permissions") from None
    return groups


def assign_groups(files: list[ImageFile], group_by: str, *, sep: str = "_", parts: int = 2,
                  groups_csv: Path | None = None) -> tuple[list[ImageFile], int | None]:
    """Attach a group id to each file. Returns (files, CSV rows matching no file, or None)."""
    if group_by == "none":
        return [ImageFile(f.rel, f.cls, f.rel) for f in files], None
    if group_by == "prefix":
        if parts < 1:
            raise AttrdistError(f"--group-parts {parts}: must be at least 1")
        return [ImageFile(f.rel, f.cls, prefix_group(f.rel, sep, parts)) for f in files], None
    if group_by == "csv":
        if groups_csv is None:
            raise AttrdistError("--group-by csv needs --groups FILE.csv (columns path,group)")
        table = read_group_csv(groups_csv)
        missing = [f.rel for f in files if f.rel not in table]
        if missing:
            raise AttrdistError(f"{groups_csv}: {len(missing)} images have no group row (e.g. {missing[0]!r}); "
                                f"add rows for them (paths relative to --root) or use --group-by prefix/none")
        used = {f.rel for f in files}
        return [ImageFile(f.rel, f.cls, table[f.rel]) for f in files], sum(r not in used for r in table)
    raise AttrdistError(f"--group-by {group_by!r}: expected prefix, csv or none")


def _rank(seed: int, group: str) -> str:
    return hashlib.sha1(f"{seed}\x00{group}".encode()).hexdigest()


def group_split(files: list[ImageFile], fractions: dict[str, float], seed: int) -> dict[str, list[ImageFile]]:
    """Seeded, group-aware, class-stratified split. Deterministic in (seed, file list, groups): the
    order of `files` does not matter. Groups are taken class by class (each group counts for its
    majority class), largest first with a seeded hash order among equals, each to the split whose
    count is furthest below its target share of that class."""
    names = [s for s in fractions if fractions[s] > 0 or s == "train"]
    members: dict[str, list[ImageFile]] = defaultdict(list)
    for f in files:
        members[f.group].append(f)
    by_class: dict[str, list[str]] = defaultdict(list)
    for g, fs in members.items():
        major = sorted(Counter(f.cls for f in fs).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        by_class[major].append(g)
    out: dict[str, list[ImageFile]] = {s: [] for s in names}
    for cls in sorted(by_class):
        gs = sorted(by_class[cls], key=lambda g: (-len(members[g]), _rank(seed, g)))
        total = sum(len(members[g]) for g in gs)
        target = {s: fractions[s] * total for s in names}
        have = dict.fromkeys(names, 0)
        for g in gs:
            # furthest below target (relative deficit), ties -> split order
            s = max(names, key=lambda s: (target[s] - have[s], -names.index(s)))
            have[s] += len(members[g])
            out[s].extend(members[g])
    for s in out:
        out[s].sort(key=lambda f: f.rel)
    return out


# ----------------------------------------------------------------------------------------------
# Per-item work (module level: run in worker processes)
# ----------------------------------------------------------------------------------------------


def _probe(path: str) -> dict:
    """Pass 1: read, decode once to verify, fingerprint (`pipeline.verify_bytes`). Returns {"path", "bytes",
    "width", "height", "format", "sha1", "phash"}."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ItemFailure("unreadable_file", str(e), path) from None
    return {"path": path, "bytes": len(data), **verify_bytes(data, path)}


def _encode(item: tuple[str, str, int, int]) -> tuple[bytes, str, int, int, int]:
    """Pass 2: stored bytes (and their crc32). JPEG/PNG pass through, not decoded again, unless --max-side
    shrinks them; other formats (BMP, GIF, WebP, TIFF) are re-encoded as JPEG."""
    path, sha1, max_side, quality = item
    data = read_checked(path, sha1)
    if max_side:
        data, _, _ = resize_max_side(data, max_side, quality)
    with Image.open(io.BytesIO(data)) as im:
        fmt, (w, h) = im.format, im.size
    if fmt not in ("JPEG", "PNG"):
        data, fmt = encode_jpeg(open_image(data), quality), "JPEG"
    return data, ("png" if fmt == "PNG" else "jpg"), w, h, zlib.crc32(data)


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


def collect(root: Path, *, split_dirs: bool, group_by: str, sep: str, parts: int, groups_csv: Path | None,
            fractions: dict[str, float], seed: int) -> tuple[list[str], dict[str, list[ImageFile]], dict]:
    """(classes, split -> files with groups, scan report). Paths (and CSV paths) are relative to root. With
    split_dirs the files have no group (""): the folders give the split, and the group options are unused."""
    skipped: Counter = Counter()
    if split_dirs:
        split_names = scan_classes(root)
        unknown = [s for s in split_names if s not in SPLIT_ORDER]
        if unknown:
            raise AttrdistError(f"{root}: --split-dirs expects {root}/<train|val|test>/<class>/...; found "
                                f"{unknown[:3]}; rename them or drop --split-dirs")
        split_names.sort(key=SPLIT_ORDER.index)
        classes = sorted({c for s in split_names for c in scan_classes(root / s)})
        per_split: dict[str, list[ImageFile]] = {s: [] for s in split_names}
        for s in split_names:  # no groups: they would only shape a split made here
            per_split[s] = [f for c in scan_classes(root / s) for f in list_class_dir(root, root / s / c, c, skipped)]
        csv_unused = None
    else:
        classes = scan_classes(root)
        files = [f for c in classes for f in list_class_dir(root, root / c, c, skipped)]
        files, csv_unused = assign_groups(files, group_by, sep=sep, parts=parts, groups_csv=groups_csv)
        per_split = group_split(files, fractions, seed)
    if not any(per_split.values()):
        raise AttrdistError(f"{root}: no image files found (extensions {', '.join(sorted(IMAGE_EXTS))})")
    scan = {"skipped_files": dict(skipped)}
    if csv_unused is not None:
        scan["csv_rows_without_image"] = csv_unused
    return classes, per_split, scan


class ImageFolderFormat(PackFormat):
    """An image-folder dataset, split here or by its folders (`pack_imagefolder`)."""

    verify = staticmethod(_probe)
    produce = staticmethod(_encode)

    def __init__(self, root: Path, *, val: float | None = None, test: float | None = None, seed: int | None = None,
                 split_dirs: bool, group_by: str | None = None, group_sep: str | None = None,
                 group_parts: int | None = None, groups_csv: Path | None = None, max_side: int, quality: int,
                 on_leak: str, dataset: str):
        if on_leak not in ("error", "warn", "drop"):
            raise AttrdistError(f"--on-leak {on_leak!r}: expected error, warn or drop")
        split_options = {"--val": val, "--test": test, "--seed": seed, "--group-by": group_by,
                         "--group-sep": group_sep, "--group-parts": group_parts, "--groups": groups_csv}
        if split_dirs:
            given = [k for k, v in split_options.items() if v is not None]
            if given:
                raise AttrdistError(f"{root}: --split-dirs takes the splits from the folders {root}/<split>/, so "
                                    f"{', '.join(given)} (which only shape a split made here) cannot be honoured; "
                                    f"drop {'it' if len(given) == 1 else 'them'}, or drop --split-dirs")
        else:
            val, test, seed = 0.2 if val is None else val, 0.0 if test is None else test, seed or 0
            group_by, group_sep = group_by or "prefix", "_" if group_sep is None else group_sep
            group_parts = 2 if group_parts is None else group_parts
        if not split_dirs and not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
            raise AttrdistError(f"--val {val} --test {test}: fractions must be in [0, 1) and sum to less than 1")
        fractions = None if split_dirs else {"train": 1.0 - val - test, "val": val, "test": test}
        classes, self.per_split, self.scan = collect(root, split_dirs=split_dirs, group_by=group_by, sep=group_sep,
                                                     parts=group_parts, groups_csv=groups_csv, fractions=fractions,
                                                     seed=seed)
        self.dataset, self.attributes, self.splits, self.where = dataset, classes, list(self.per_split), str(root)
        self.root, self.max_side, self.quality = root, max_side, quality
        self.cindex = {c: i for i, c in enumerate(classes)}
        self.tally = Tally(self.splits)
        self.class_counts = {s: dict.fromkeys(classes, 0) for s in self.splits}
        self.sources = [source_entry(groups_csv)] if groups_csv else []
        self.inputs = [root] + ([groups_csv] if groups_csv else [])
        self.leak_advice = None if split_dirs else ADVICE_GROUPS  # folder splits: the default (given splits)
        self.options = {"root": str(root), "split_dirs": split_dirs, "fractions": fractions,
                        "seed": seed, "group_by": group_by, "group_sep": group_sep, "group_parts": group_parts,
                        "groups": str(groups_csv) if groups_csv else None, "max_side": max_side, "quality": quality,
                        "on_leak": on_leak, "splits": self.splits}
        self.planned = 0  # sample keys number the images planned for pass 2, across splits

    def images(self) -> list[ImageItem]:
        return [ImageItem(s, f.rel, str(self.root / f.rel), f) for s in self.splits for f in self.per_split[s]]

    def plan(self, image, meta):
        self.planned += 1
        return Task((meta["path"], meta["sha1"], self.max_side, self.quality), f"{self.planned - 1:08d}")

    def samples(self, image, meta, task, result):
        data, ext, w, h, crc = result
        f = image.info
        self.class_counts[image.split][f.cls] += 1
        sample = {"id": f.rel, "class": f.cls, "group": f.group or None, "labels": [self.cindex[f.cls]], "width": w,
                  "height": h}
        yield task.info, {ext: data, "json": sample}, {ext: crc}

    def report(self, verified: dict) -> dict:
        """{"scan", split: {"files", "groups" (only where groups made the split), "packed", "dropped",
        "class_counts"}}."""
        grouped = not self.options["split_dirs"]
        return {"scan": self.scan,
                **{s: {"files": len(fs), **({"groups": len({f.group for f in fs})} if grouped else {}),
                       "packed": self.tally.packed[s], "dropped": self.tally.dropped(s),
                       "class_counts": self.class_counts[s]} for s, fs in self.per_split.items()}}


def pack_imagefolder(root: str | os.PathLike, out_dir: str | os.PathLike, *, val: float | None = None,
                     test: float | None = None, seed: int | None = None, split_dirs: bool = False,
                     group_by: str | None = None, group_sep: str | None = None, group_parts: int | None = None,
                     groups_csv: str | os.PathLike | None = None, max_side: int = 0, quality: int = 90,
                     workers: int | None = None, on_leak: str = "error", dataset: str = "imagefolder",
                     max_samples: int = 1000, overwrite: bool = False, progress: bool = True,
                     max_dropped: float = DEFAULT_MAX_DROPPED) -> dict:
    """Pack an image-folder dataset. Returns the manifest.

    Split here (default): val 0.2, test 0.0, seed 0, group_by "prefix", group_sep "_", group_parts 2 unless
    given. With split_dirs the folders give the splits: giving any of those (or groups_csv) is an error."""
    fmt = ImageFolderFormat(Path(root), val=val, test=test, seed=seed, split_dirs=split_dirs, group_by=group_by,
                            group_sep=group_sep, group_parts=group_parts,
                            groups_csv=Path(groups_csv) if groups_csv else None, max_side=max_side, quality=quality,
                            on_leak=on_leak, dataset=dataset)
    return pack(fmt, out_dir, max_samples=max_samples, workers=workers, on_leak=on_leak, overwrite=overwrite,
                progress=progress, max_dropped=max_dropped)
