"""The pack pipeline, once for every source format, and the pieces it is made of.

`pack(fmt, out_dir, ...)` is the whole pack of any dataset:

  refuse  before any image is read: an --out that may not be replaced (`writer.check_out_dir`: never an
          input, a folder holding or inside one, or anything but an attrdist pack or an empty folder;
          a pack only by a re-run of the same inputs and options, or with --overwrite), a split
          listing no image.
  pass 1  every image the format lists (`PackFormat.images`) is read and decoded once in worker
          processes (`fmt.verify`, by default `verify_image`: `verify_bytes`) and fingerprinted; only
          small metadata comes back to this process. A failure drops the image, named (`Tally`).
  stop    a split none of whose images can be read, or losing more than `max_dropped` of its
          samples to problems with the input (`check_drops`), stops the pack (exit 2) before anything
          is published; the whole list of drops goes to `.<out>.staging/drops.jsonl`.
  check   `attrdist.pack.leakage.find_leaks` over all splits, hash candidates confirmed on their pixels;
          `--on-leak error|warn|drop` (`apply_policy`); its report goes to the manifest's
          report["leakage"], a contact sheet of the pairs beside --out.
  pass 2  for each image still in (`fmt.reject`, the leak drops), `fmt.plan` says what to make of it.
          The shards are planned here (`plan_shards`: which samples go to which shard, in order, fixed
          by --max-samples and the source files' sizes), then each is written whole by a worker process
          (`write_shards`: `fmt.produce` makes each image's result, `fmt.samples` its samples, and
          `attrdist.pack.writer.write_shard` the tar, fsync'ed) and recorded in order here by
          `attrdist.pack.writer.PackWriter`, so the pack is the same bytes whatever the worker count.
          The writer `commit`s the pack whole, with drops.jsonl, once no split is empty and the drops
          are within `max_dropped`.

A source format (coco, cocottributes, dior, imagefolder) is a `PackFormat`: it lists its images
(`ImageItem`: split, key, path, its own data) and its inputs (`inputs`), and turns one image's pass-2
result into samples; the pipeline does the rest. Every image, sample or box not packed is recorded in
one place, the format's `Tally`: counted by reason per split in the manifest (`report[split]["dropped"]`)
and named, one line each, in drops.jsonl.

`parallel_map(fn, items, workers)` runs `fn` over items in worker processes (a few items per task)
and yields results in input order with a bounded number in flight, so packing uses every core
while memory stays flat in dataset size. `fn` must be a module-level function (it is pickled) and should return
bytes/JSON-able data, or raise; exceptions come back as `ItemError` results to be counted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import signal
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from attrdist.atomic import sha256_file
from attrdist.errors import AttrdistError
from attrdist.pack.writer import PackWriter, check_out_dir, pack_identity, pack_job, write_record, write_shard

log = logging.getLogger("attrdist")

LEAK_POLICIES = ("error", "warn", "drop")
DEFAULT_MAX_DROPPED = 0.05
MAX_SHARD_BYTES = 256 << 20  # a shard is closed at this size even before --max-samples


@dataclass(frozen=True)
class ItemError:
    """A per-item failure (corrupt image, bad box...): counted by the packer, never fatal."""

    reason: str
    detail: str
    file: str | None = None  # the file at fault, where the failure names one


def add_pack_args(ap) -> None:
    """The options every packer entry point (shards/*.py) shares."""
    ap.add_argument("--max-samples", type=int, default=1000, metavar="N",
                    help=f"samples per shard: a shard is closed at N samples or {MAX_SHARD_BYTES >> 20} MiB, whichever "
                         f"comes first (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    ap.add_argument("--on-leak", choices=LEAK_POLICIES, default="error",
                    help="identical or near-identical images in two splits: stop with the pairs (error, the default), "
                         "keep and report them (warn), or leave them out of the later split (drop)")
    ap.add_argument("--max-dropped", type=float, default=DEFAULT_MAX_DROPPED, metavar="FRACTION",
                    help="stop when a split loses more than this fraction of its samples to missing, unreadable or "
                         "malformed input (default: %(default)s; 1 packs whatever can be read). Every dropped "
                         "sample is listed in drops.jsonl beside the manifest")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace --out when it holds an attrdist pack of other data (only ever a pack or an empty "
                         "folder, never one holding or inside an input); without it a pack is replaced only by a "
                         "re-run of the same inputs and options")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


INTERRUPTED = "run the same command again: the pack resumes from its finished shards"


def packer_help(doc: str) -> dict:
    """argparse keywords for a packer entry point: its whole docstring as the description, shown as written."""
    import argparse

    return {"description": doc, "formatter_class": argparse.RawDescriptionHelpFormatter}


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _call(fn, item):
    try:
        return fn(item)
    except AttrdistError:
        raise
    except Exception as e:  # noqa: BLE001 - any per-item failure is data to count, not a crash
        return ItemError(getattr(e, "reason", type(e).__name__), str(e)[:300], getattr(e, "file", None))


def _call_chunk(fn, items: list) -> list:
    return [_call(fn, it) for it in items]


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk: list = []
    for it in items:
        chunk.append(it)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def parallel_map(fn: Callable, items: Iterable, workers: int | None = None, *, chunk: int = 8,
                 threads: bool = False) -> Iterator:
    """Ordered map over `items` in `workers` processes (0 or 1 = in this process), `chunk` items per task.

    One task per item made this process pickle, send and collect every item on its own, competing with the
    workers for the same cores; `chunk` items per task divide that work. With `threads=True`
    the workers are threads: for work that is mostly I/O and hashing (both release the GIL), such as
    copying bytes through, where sending each result back from a process would cost more than the work.
    At most 4 tasks per worker are in flight, so memory stays flat in the number of items. Worker processes
    ignore SIGINT: Ctrl-C (sent to the whole process group) interrupts this process alone, which cancels what
    is queued, so the user sees one line (`attrdist.errors.user_errors`), not a traceback per worker
    (`init_worker`, which also ends a worker whose packer was killed).
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1:
        for it in items:
            yield _call(fn, it)
        return
    chunk = 1 if threads else max(1, chunk)
    pool = ThreadPoolExecutor(workers) if threads else ProcessPoolExecutor(workers, initializer=init_worker)
    try:
        pending: deque = deque()
        for part in _chunks(items, chunk):
            pending.append(pool.submit(_call_chunk, fn, part))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BaseException:  # Ctrl-C above all: what is queued is dropped, the tasks running finish (a few items)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def init_worker() -> None:
    """The start of every packing worker process: SIGINT ignored (Ctrl-C is for the packing process, which
    cancels the work), and a thread that ends the worker once its packing process is gone (killed: SIGKILL
    cannot be passed on), where it would otherwise wait for work forever (seen: both workers of a pass 2 left
    running after a kill -9). The standard library's pools have no such option; Linux's PR_SET_PDEATHSIG is
    per thread and Linux only, so the parent's pid is polled, twice a second."""
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # a shard being written stays a .partial file, discarded by the next run

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def read_ahead(items: Iterable, path_of: Callable = lambda item: item) -> Iterator:
    """Yield `items` unchanged, first asking the kernel to start reading each one's file in the background
    (`posix_fadvise(WILLNEED)`; a no-op where there is none). Fed to `parallel_map`, which takes items ~4
    tasks per worker ahead of the work, the reads of a cold disk or a network file system overlap the
    decoding instead of stalling each worker on each file (bench/pack.py, the pack from disk)."""
    advise = getattr(os, "posix_fadvise", None)
    for item in items:
        if advise is not None:
            try:
                fd = os.open(path_of(item), os.O_RDONLY)
                try:
                    advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except (OSError, TypeError, ValueError):  # missing or odd: the worker reports it
                pass
        yield item


class ItemFailure(Exception):
    """Raise inside a per-item function with a short reason (e.g. 'box_outside_image')."""

    def __init__(self, reason: str, detail: str = "", file: str | os.PathLike | None = None):
        super().__init__(detail or reason)
        self.reason, self.file = reason, (str(file) if file is not None else None)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def open_image(data: bytes, max_side: int = 0) -> Image.Image:
    """Decode fully (so corrupt/truncated files fail here), DCT-downscaling when a small result is wanted."""
    im = Image.open(io.BytesIO(data))
    if max_side and im.format == "JPEG" and max(im.size) > 2 * max_side:
        im.draft("RGB", (max_side, max_side))
    im.load()
    return im


def resize_max_side(data: bytes, max_side: int, quality: int = 90) -> tuple[bytes, tuple[int, int], float]:
    """(bytes, (w, h), scale): bytes unchanged when the image already fits within max_side."""
    im = open_image(data, max_side)
    w, h = im.size
    orig = Image.open(io.BytesIO(data)).size
    if max(w, h) <= max_side and (w, h) == orig:
        return data, (w, h), 1.0
    s = min(1.0, max_side / max(w, h))
    if s < 1.0:
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    return encode_jpeg(im, quality), im.size, im.size[0] / orig[0]


def verify_bytes(data: bytes, where: str) -> dict:
    """Pass 1 of every packer: prove the image is whole with one decode, and fingerprint it.

    Returns {"format", "width", "height", "sha1", "phash"} (the leak check's two hashes); raises ItemFailure
    with reason not_an_image, corrupt_image or decompression_bomb. A JPEG is decoded with DCT-domain
    downscaling, in grey: all of its entropy-coded data is still decoded (a truncated or damaged file fails
    here) at a fraction of a full decode's cost, and the small grey image is what the perceptual hash reads.
    JPEGs in YCbCr or grey are decoded by libjpeg-turbo through simplejpeg (`_gray_draft`: PIL's
    `draft("L", ...)` pixels, bit for bit); anything else, and anything simplejpeg refuses, through PIL,
    which decides what fails as before. Other formats are decoded fully. One decode per image: imagefolder
    and dior used to decode each image fully, then again for the hash (and imagefolder a third time in
    pass 2); bench/pack.py's imagefolder pack took 3.2x as long that way.
    """
    from attrdist.pack.leakage import DRAFT_SIZE, hash_image

    try:
        im = Image.open(io.BytesIO(data))
        fmt, size = im.format, im.size
    except Image.DecompressionBombError as e:
        raise ItemFailure("decompression_bomb", f"{where}: {e}", where) from None
    except UnidentifiedImageError as e:  # no image format recognises these bytes
        raise ItemFailure("not_an_image", f"{where}: {e}", where) from None
    except Exception as e:  # noqa: BLE001 - a recognised format whose header is broken or cut short
        raise ItemFailure("corrupt_image", f"{where}: {type(e).__name__}: {e}", where) from None
    try:
        grey = _gray_draft(data, DRAFT_SIZE) if fmt == "JPEG" else None
        if grey is not None:
            im = Image.fromarray(grey)
        else:
            if fmt == "JPEG":
                im.draft("L", DRAFT_SIZE)
            im.load()
        phash = hash_image(im)
    except Image.DecompressionBombError as e:
        raise ItemFailure("decompression_bomb", f"{where}: {e}", where) from None
    except Exception as e:  # noqa: BLE001
        raise ItemFailure("corrupt_image", f"{where}: {type(e).__name__}: {e}", where) from None
    return {"format": fmt, "width": size[0], "height": size[1], "sha1": content_hash(data), "phash": int(phash)}


def _gray_draft(data: bytes, size: tuple[int, int]):
    """The grey image PIL's `draft("L", size)` + `load()` gives for a YCbCr or grey JPEG, decoded by
    libjpeg-turbo through simplejpeg (uint8 [H, W]), or None where PIL must decide: another colour space,
    more pixels than PIL allows, or anything libjpeg warns about (simplejpeg is strict; PIL decodes what
    it can, or fails). PIL's scale rule: the largest of 1/8, 1/4, 1/2 that keeps both sides >= size.
    The same pixels (tests/test_packing.py); ~0.70 against ~0.86 ms per 640x480 q90 image through PIL in
    one process, but within noise in bench/pack.py's verify pass, where the entropy decoding that both do
    dominates (BENCHMARKS.md, item 6)."""
    import simplejpeg

    try:
        h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colourspace not in ("YCbCr", "Gray") or w * h > Image.MAX_IMAGE_PIXELS:
        return None
    fits = min(w // size[0], h // size[1])
    scale = next((s for s in (8, 4, 2) if fits >= s), 1)
    try:  # simplejpeg picks the smallest scale M/8 whose sides are >= these: exactly 1/scale
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_width=-(-w // scale), min_height=-(-h // scale))
    except ValueError:
        return None
    return arr[:, :, 0]


def read_checked(path: str, sha1: str) -> bytes:
    """Pass 2: the file's bytes, which must still be those pass 1 verified (else ItemFailure changed_during_pack)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ItemFailure("changed_during_pack", f"{path}: {e}", path) from None
    if content_hash(data) != sha1:
        raise ItemFailure("changed_during_pack", f"{path}: content changed between the two passes", path)
    return data


def content_hash(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def job_identity(verified: dict, **options) -> dict:
    """What a resumable pack must match: the options and a digest of every verified input item.

    `verified` maps (split, key) -> metadata with "sha1" (or an ItemError). Any changed image,
    added or removed item, or changed option gives another identity, so an interrupted pack is
    resumed only when it would produce exactly the same shards.
    """
    h = hashlib.sha1()
    for (split, key), r in sorted(verified.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        tag = r.get("sha1") if isinstance(r, dict) else f"error:{getattr(r, 'reason', '?')}"
        h.update(f"{split}\0{key}\0{tag}\n".encode())
    return {"options": {k: str(v) for k, v in sorted(options.items())}, "items": h.hexdigest()}


def verify_image(paths: str | os.PathLike | list) -> dict:
    """Pass 1 for one image file: read + decode it once (`verify_bytes`), fingerprint it. Given several
    candidate paths, the first that exists is used.

    Returns {"path", "bytes", "width", "height", "format", "sha1", "phash"}; raises ItemFailure with
    reason missing_image / not_an_image / corrupt_image / decompression_bomb.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    path = next((str(p) for p in paths if os.path.isfile(p)), None)
    if path is None:
        looked = f" (nor {', '.join(str(p) for p in paths[1:4])})" if len(paths) > 1 else ""
        raise ItemFailure("missing_image", f"{paths[0]}: no such file{looked}", paths[0])
    with open(path, "rb") as f:
        data = f.read()
    return {"path": path, "bytes": len(data), **verify_bytes(data, path)}


def load_image_item(item: tuple) -> tuple[bytes, str, tuple[int, int], int]:
    """Pass 2 for one image: (path, sha1, format, max_side, quality) -> (bytes, ext, (w, h), crc32 of the bytes).

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


# ------------------------------------------------------------------------------------------
# The pipeline: what a source format supplies, and `pack`
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageItem:
    """One input image, as a format lists it (`PackFormat.images`)."""

    split: str
    key: str           # unique in its split: what leak reports and the resume identity name
    path: Any          # what the format's `verify` is given: a path, candidate paths, ...
    info: Any = None   # the format's own data for this image (labels, annotations...), handed back to it
    samples: int = 1   # the samples it stands for: dropping the image counts them all


@dataclass(frozen=True)
class Task:
    """Pass 2 for one image (`PackFormat.plan`): `arg` goes to the format's `produce`, in a worker."""

    arg: Any
    info: Any = None   # handed back to `PackFormat.samples` with the result
    samples: int = 1   # the samples a failed `produce` drops


# Drop reasons that are the user's own choice (an option asked for them), not a problem with the input: they
# are named in drops.jsonl like every drop, but do not count against --max-dropped.
CHOSEN = frozenset({"leak", "crowd", "too_small", "box_too_small", "duplicate_id"})


class Tally:
    """Samples packed, and dropped by reason, per split: the one place a drop is recorded.

    Every drop is named: `drop(split, reason, n, file=..., ann_id=..., **ids)` keeps a record (split, reason,
    the file at fault, the annotation id or other ids, a detail) that the pack publishes as drops.jsonl
    (`jsonl`); a drop without a file or an id is a bug (TypeError). `drop_box` records a box left out of a
    sample that is packed (counted apart: `boxes_dropped`). `reasons` are listed (as 0) in every split's
    report even when nothing was dropped for them; `rename` maps a reason to the name this format's report
    gives it."""

    def __init__(self, splits: Iterable[str], reasons: Iterable[str] = (), rename: dict[str, str] | None = None):
        self.reasons, self.rename = tuple(reasons), dict(rename or {})
        self.packed: Counter = Counter({s: 0 for s in splits})
        self._dropped = {s: Counter(dict.fromkeys(self.reasons, 0)) for s in self.packed}
        self._boxes: dict[str, Counter] = {}
        self.records: list[dict] = []

    def drop(self, split: str, reason: str, n: int = 1, *, file: str | os.PathLike | None = None,
             detail: str = "", **ids) -> None:
        if file is None and not ids:
            raise TypeError(f"Tally.drop({split!r}, {reason!r}): name the file or the annotation dropped")
        reason = self.rename.get(reason, reason)
        counts = self._dropped.setdefault(split, Counter(dict.fromkeys(self.reasons, 0)))
        counts[reason] += n
        self.records.append(_record("sample", split, reason, n, file, detail, ids))

    def drop_box(self, split: str, reason: str, *, file: str | os.PathLike, detail: str = "", **ids) -> None:
        self._boxes.setdefault(split, Counter())[reason] += 1
        self.records.append(_record("box", split, reason, 1, file, detail, ids))

    def dropped(self, split: str) -> dict:
        return dict(self._dropped.get(split, {}))

    def boxes_dropped(self, split: str) -> dict:
        return dict(self._boxes.get(split, {}))

    def failed(self, split: str) -> int:
        """Samples of `split` dropped for a problem with the input (not by choice: CHOSEN)."""
        return sum(v for k, v in self._dropped.get(split, {}).items() if k not in CHOSEN)

    def named(self, split: str, what: str = "sample", chosen: bool | None = None) -> list[dict]:
        return [r for r in self.records if r["split"] == split and r["what"] == what
                and (chosen is None or (r["reason"] in CHOSEN) == chosen)]

    def jsonl(self) -> bytes:
        return b"".join(json.dumps(r, default=str).encode() + b"\n" for r in self.records)


def _record(what: str, split: str, reason: str, n: int, file, detail: str, ids: dict) -> dict:
    r = {"split": split, "what": what, "reason": reason}
    if file is not None:
        r["file"] = str(file)
    r.update(ids)
    if n != 1:
        r["n"] = n
    if detail:
        r["detail"] = " ".join(str(detail).split())[:300]
    return r


def describe_drops(records: list[dict], n: int = 3) -> str:
    """'missing_image 3 (a.jpg, b.jpg, c.jpg), corrupt_image 1 (d.jpg)': counts and the first names by reason."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["reason"], []).append(r)
    parts = []
    for reason, rs in sorted(by.items(), key=lambda kv: -sum(r.get("n", 1) for r in kv[1])):
        names = ", ".join(_name(r) for r in rs[:n]) + (", ..." if len(rs) > n else "")
        parts.append(f"{reason} {sum(r.get('n', 1) for r in rs)} ({names})")
    return "; ".join(parts)


def _name(r: dict) -> str:
    ids = " ".join(f"{k} {v}" for k, v in r.items() if k not in ("split", "what", "reason", "file", "n", "detail"))
    return " ".join(x for x in (r.get("file", ""), ids) if x)


class PackFormat:
    """What a source format supplies to `pack`. A subclass lists the images (`images`) and turns one
    image's pass-2 result into samples (`samples`); the defaults verify each image file (`verify_image`),
    copy its bytes through (`load_image_item`) and report packed/dropped per split.

    Its constructor reads the annotations (bad input fails there, before any image is read); it sets
    `dataset`, `attributes`, `splits` and `tally`, and where they differ from the defaults
    `label_fields`, `sources`, `options` and `where`.
    """

    dataset: str
    attributes: list[str]       # the label vocabulary, in label-index order
    splits: list[str]           # in pack order
    tally: Tally
    label_fields: tuple[str, ...] = ("labels",)  # sample JSON fields holding label indices (counted in the manifest)
    sources: list[dict] | tuple = ()  # `attrdist.pack.writer.source_entry` of the annotation files read
    options: dict = {}          # the manifest's options (what the pack was asked to do)
    where: str | None = None    # what a leak error names (default: the output directory)
    verify = staticmethod(verify_image)       # pass 1, in workers: ImageItem.path -> metadata with sha1, phash
    produce = staticmethod(load_image_item)   # pass 2, in workers: Task.arg -> what `samples` turns into samples
    leak_advice: str | None = None  # how to fix a leak error; None: the splits are given by the input
    inputs: list | tuple = ()   # every input path (folders and files): --out may not be, hold or lie in one

    def sample_ids(self, image: ImageItem, task: Task | None = None) -> list[dict] | None:
        """The ids of the samples an image (or one of its pass-2 tasks) stands for, one dict per sample
        (e.g. [{"ann_id": 7}, ...]), to name each of them when the image is dropped; None: the image is the
        one sample (its key names it)."""
        return None

    def file_of(self, image: ImageItem) -> str:
        """The file a drop of this image names when the failure itself names none."""
        p = image.path
        return str(p if isinstance(p, (str, os.PathLike)) else p[0])

    def images(self) -> list[ImageItem]:
        """Every input image, split by split, in the order the samples are to be written."""
        raise NotImplementedError

    def reject(self, image: ImageItem, meta: dict) -> str | None:
        """A reason to drop a verified image before the leak check (default: none)."""
        return None

    def plan(self, image: ImageItem, meta: dict) -> Task | None:
        """Pass 2 for an image that is in (verified, not leaked): a Task, or None after recording in the
        tally why nothing of it is packed. Default: its bytes, copied through."""
        return Task((meta["path"], meta["sha1"], meta["format"], 0, 90))

    def samples(self, image: ImageItem, meta: dict, task: Task, result) -> Iterable[tuple[str, dict, dict | None]]:
        """The samples made of one image: (key, {ext: bytes, "json": sample JSON}, crc32 {ext: crc} or None),
        exactly `task.samples` of them.

        Called twice per image: in the shard's worker process (a copy of this object as it was after every
        `plan`), whose samples are written; then in the packing process, in pack order, with the result's
        bytes emptied (`light`), for what it records (tally, counts, report). So the samples may depend only
        on (image, meta, task, result) and on what `plan` set, never on earlier `samples` calls."""
        raise NotImplementedError

    def job(self, verified: dict) -> dict:
        """What an interrupted pack must match to be resumed, and a finished one to be replaced without
        --overwrite (`PackWriter`'s `job`): the options, the annotation files read and every input image."""
        return job_identity(verified, options=self.options, sources=self.sources)

    def report(self, verified: dict) -> dict:
        """The manifest's report besides "leakage": by default {split: {"packed", "dropped"}}."""
        return {s: {"packed": self.tally.packed[s], "dropped": self.tally.dropped(s)} for s in self.splits}

    def files(self) -> dict[str, bytes]:
        """Files published beside the shards (name -> bytes), written once every sample is."""
        return {}


def pack(fmt: PackFormat, out_dir: str | os.PathLike, *, max_samples: int = 1000, workers: int | None = None,
         on_leak: str = "error", overwrite: bool = False, progress: bool = True,
         max_dropped: float = DEFAULT_MAX_DROPPED) -> dict:
    """Pack a source format's images into shards in `out_dir` (module docstring). Returns the manifest.

    Refused before any image is read: an --out that `check_out_dir` may not replace, a split listing no image.
    Stopped before anything is published: a split none of whose images can be read or that ends with no
    sample, and a split losing more than `max_dropped` of its samples to problems with the input
    (`Tally.failed`). Every drop is named in drops.jsonl, published with the pack."""
    check_leak_policy(on_leak)
    if not 0 <= max_dropped <= 1:
        raise AttrdistError(f"--max-dropped {max_dropped}: a fraction of a split's samples, in [0, 1]")
    out_dir = Path(out_dir)
    images = fmt.images()
    totals = _refuse_before_reading(fmt, images, out_dir, overwrite, max_samples)
    verified = verify_all(images, fmt.verify, workers, progress)  # pass 1
    readable = _readable(fmt, images, verified, out_dir)
    check_drops(fmt, out_dir, totals, max_dropped)
    leakage, leaked = check_leakage(verified, fmt.splits, on_leak, fmt.where or str(out_dir), out_dir=out_dir,
                                    advice=fmt.leak_advice, workers=workers)
    with PackWriter(out_dir, dataset=fmt.dataset, attributes=fmt.attributes, label_fields=fmt.label_fields,
                    max_samples=max_samples, max_bytes=MAX_SHARD_BYTES, overwrite=overwrite, job=fmt.job(verified),
                    inputs=fmt.inputs) as writer:
        todo = []
        for im, meta in readable:
            reason = fmt.reject(im, meta)
            if reason is None and im.key in leaked.get(im.split, ()):
                reason = "leak"
            if reason is not None:
                _drop_image(fmt, im, reason, meta["path"])
            elif (task := fmt.plan(im, meta)) is not None:
                todo.append((im, meta, task))
        write_shards(fmt, writer, todo, plan_shards(todo, max_samples, MAX_SHARD_BYTES), workers, progress)  # pass 2
        for s in fmt.splits:
            if not fmt.tally.packed[s]:
                _stop(fmt, out_dir, f"split {s!r}: no sample left to pack ({describe_drops(fmt.tally.named(s))})")
        check_drops(fmt, out_dir, totals, max_dropped)
        writer.write_file(DROPS, fmt.tally.jsonl())
        for name, data in fmt.files().items():
            writer.write_file(name, data)
        named = Counter(r["what"] for r in fmt.tally.records)
        return writer.commit(sources=fmt.sources, options=fmt.options,
                             report={"leakage": leakage, **fmt.report(verified),
                                     "drops": {"file": DROPS, "samples": named["sample"], "boxes": named["box"],
                                               "max_dropped": max_dropped}})


DROPS = "drops.jsonl"


# ------------------------------------------------------------------------------------------
# Pass 2: shards planned here, written whole by workers, recorded in order
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """One shard of pass 2, fixed before any is written (`plan_shards`)."""

    split: str
    number: int    # its file: <split>-<number:06d>.tar
    start: int     # the split index of its first sample, as planned (less what pass 2 drops before it)
    parts: tuple   # (todo index, first, end): samples [first, end) of that image's task, in order

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}.tar"

    @property
    def samples(self) -> int:
        return sum(end - first for _, first, end in self.parts)


def _source_bytes(meta: dict) -> int:
    """The size of an image's source file: pass 1's "bytes" (`verify_image`), else the file's size now."""
    if "bytes" in meta:
        return meta["bytes"]
    try:
        return os.stat(meta["path"]).st_size
    except OSError:  # gone since pass 1: pass 2 drops it, named
        return 0


def plan_shards(todo: list[tuple], max_samples: int, max_bytes: int) -> list[ShardPlan]:
    """Cut pass 2's (image, meta, task) list into shards, in order: a split's shard is closed at `max_samples`
    samples or once its samples' planned bytes reach `max_bytes`. Planned bytes: the source file's size,
    shared evenly among its task's samples (crops), known from pass 1; so a shard whose samples are re-encoded
    larger than their sources can pass `max_bytes`. An image's samples may span two shards (both workers
    make that image; only its samples in each are written). A sample dropped in pass 2 leaves its shard one
    sample short; a shard that loses all of them is not written (its number is skipped)."""
    plans: list[ShardPlan] = []
    open_: dict[str, list] = {}  # split -> [number, start, parts, samples, bytes]
    counts: Counter = Counter()  # split -> shards planned
    index: Counter = Counter()   # split -> samples planned

    def close(split: str) -> None:
        number, start, parts, _, _ = open_.pop(split)
        plans.append(ShardPlan(split, number, start, tuple(parts)))

    for i, (im, meta, task) in enumerate(todo):
        n = max(0, task.samples)
        size = _source_bytes(meta) / max(1, n)
        first = 0
        while first < n:
            cur = open_.get(im.split)
            if cur is None:
                cur = open_[im.split] = [counts[im.split], index[im.split], [], 0, 0.0]
                counts[im.split] += 1
            room = max_samples - cur[3]
            if size > 0:
                room = min(room, max(1, math.ceil((max_bytes - cur[4]) / size)))
            take = min(n - first, room)
            cur[2].append((i, first, first + take))
            cur[3] += take
            cur[4] += take * size
            index[im.split] += take
            first += take
            if cur[3] >= max_samples or cur[4] >= max_bytes:
                close(im.split)
    for split in list(open_):
        close(split)
    return plans


def _plan_digest(plan: ShardPlan, start: int, todo: list[tuple]) -> str:
    """What a finished shard was made of (its split, number, first index, and each part's key, sha1, task
    argument and sample range): a resumed pack reuses the shard only when this is unchanged."""
    h = hashlib.sha1(json.dumps([plan.split, plan.number, start]).encode())
    for i, first, end in plan.parts:
        im, meta, task = todo[i]
        h.update(json.dumps([im.key, meta["sha1"], task.arg, first, end], default=str).encode())
    return h.hexdigest()


def light(x):
    """A pass-2 result as JSON keeps it, every bytes object emptied: what the packing process calls
    `PackFormat.samples` with (`unlight`), and what a shard's `.record` keeps for a resume."""
    if isinstance(x, ItemError):
        return {"\0error": [x.reason, x.detail, x.file]}
    if isinstance(x, (bytes, bytearray, memoryview)):
        return {"\0bytes": len(x)}
    if isinstance(x, (list, tuple)):
        return [light(v) for v in x]
    if isinstance(x, dict):
        return {str(k): light(v) for k, v in x.items()}
    return x.item() if hasattr(x, "item") and callable(x.item) else x  # numpy scalars


def unlight(x):
    """`light`'s result back as a pass-2 result, with empty bytes (lists as tuples) or an ItemError."""
    if isinstance(x, dict):
        if "\0error" in x:
            return ItemError(*x["\0error"])
        if "\0bytes" in x:
            return b""
        return {k: unlight(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(unlight(v) for v in x)
    return x


_SHARD_JOB: tuple | None = None  # (fmt, todo, staging, where, label_fields, n attributes) in a shard worker


def _init_shard_worker(job: tuple) -> None:
    """A shard worker's start (`init_worker`) with its job, inherited under fork (pickled once per worker
    elsewhere)."""
    global _SHARD_JOB
    init_worker()
    _SHARD_JOB = job


def _write_planned_shard(spec: tuple) -> dict:
    """In a worker: write one planned shard whole (`write_shard`) as `<name>.partial` in the staging folder, and
    its resume record (`write_record`: plan digest, label counts, results) as `<name>.record.partial`; or,
    given the sha256 of a finished shard of an interrupted pack with this plan, check that the file still has
    it and reuse it ({"reused": True}). Returns the shard's nsamples, bytes, sha256, label counts and every
    part's `light` result (an ItemError where `fmt.produce` failed: its samples are left out)."""
    plan, start, digest, reuse = spec
    fmt, todo, staging, where, label_fields, nattrs = _SHARD_JOB
    path = staging / plan.name
    if reuse is not None and path.is_file() and sha256_file(path) == reuse:
        return {"reused": True}
    for _ in read_ahead(todo[i][1]["path"] for i, _, _ in plan.parts):
        pass  # every file of the shard asked for at once: a cold disk reads ahead of the work
    results = []

    def samples():
        for i, first, end in plan.parts:
            im, meta, task = todo[i]
            r = _call(fmt.produce, task.arg)
            results.append(light(r))
            if isinstance(r, ItemError):
                continue
            made = list(fmt.samples(im, meta, task, r))
            if len(made) != task.samples:
                raise AttrdistError(f"{meta['path']}: the {type(fmt).__name__} packer made {len(made)} samples of "
                                    f"it where it planned {task.samples}; this is a bug in attrdist, please report it")
            yield from made[first:end]

    shard = write_shard(path.with_name(f"{plan.name}.partial"), plan.split, samples(), start=start,
                        label_fields=label_fields, nattrs=nattrs, where=where)
    if shard["nsamples"]:  # what a resume needs to reuse it (`PackWriter.take_finished`)
        write_record(path.with_name(f"{plan.name}.record.partial"),
                     {"plan": digest, "label_counts": shard["label_counts"], "results": results})
    return {**shard, "results": results}


def write_shards(fmt: PackFormat, writer: PackWriter, todo: list[tuple], plans: list[ShardPlan],
                 workers: int | None, progress: bool) -> None:
    """Pass 2: every planned shard written whole by a worker process (`_write_planned_shard`; at least one,
    even for `workers` 0 or 1: the worker's `fmt` is a copy, whose `samples` calls record nothing here), then
    recorded in plan order (`PackWriter.record_shard`): each image's result replayed
    through `fmt.samples` (bytes emptied) for the tally and the format's counts, or its failure dropped, named.

    A shard's first index is its planned one less the samples pass 2 dropped before it in its split, as
    known when it is sent; one sent before an earlier drop was known is written again with the right index
    (only shards in flight: at most 2 per worker per drop), so the output does not depend on the worker
    count. A finished shard of an interrupted pack is reused when its plan digest (`_plan_digest`) and
    sha256 still match (checked in the workers), else written again. Ctrl-C cancels the shards not started;
    those being written finish as `.partial` files, discarded by the next run."""
    workers = max(1, default_workers() if workers is None else workers)
    finished = writer.take_finished()
    job = (fmt, todo, writer.staging, writer.out_dir, writer.label_fields, len(writer.attributes))
    shift: Counter = Counter()        # split -> samples planned in recorded shards but dropped
    replayed: dict[str, int] = {}     # split -> the last todo index replayed
    reused = 0

    def spec(plan: ShardPlan) -> tuple:
        start = plan.start - shift[plan.split]
        digest = _plan_digest(plan, start, todo)
        entry, record = finished.get(plan.name, (None, {}))
        return plan, start, digest, entry["sha256"] if entry and record.get("plan") == digest else None

    pool = ProcessPoolExecutor(workers, initializer=_init_shard_worker, initargs=(job,))
    plan_iter = iter(plans)
    pending: deque = deque()
    bar = tqdm(total=len(todo), desc="write", unit="img", disable=not progress)
    try:
        with writer.write_errors():
            while True:
                while len(pending) < 2 * workers and (plan := next(plan_iter, None)) is not None:
                    s = spec(plan)
                    pending.append((s, pool.submit(_write_planned_shard, s)))
                if not pending:
                    break
                s, fut = pending.popleft()
                plan, start, _, _ = s
                r = fut.result()
                if start != plan.start - shift[plan.split]:  # an earlier shard lost samples after this one was sent
                    s = spec(plan)
                    pending.appendleft((s, pool.submit(_write_planned_shard, s)))
                    continue
                if r.get("reused"):
                    entry, record = finished[plan.name]
                    r = {**entry, "label_counts": record["label_counts"], "results": record["results"], "reused": True}
                    reused += 1
                bar.update(_replay(fmt, todo, plan, r["results"], replayed))
                shift[plan.split] += plan.samples - r["nsamples"]
                if r["nsamples"]:
                    writer.record_shard(plan.split, plan.name, r)
    except BaseException:  # Ctrl-C above all: what is queued is dropped, the shards being written finish
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    if finished:
        log.info("%s: %d of the %d finished shards of the interrupted pack reused (plan and sha256 unchanged)",
                 writer.out_dir, reused, len(finished))


def _replay(fmt: PackFormat, todo: list[tuple], plan: ShardPlan, results: list, replayed: dict[str, int]) -> int:
    """Record, in pack order, the images of a written shard not yet recorded (one spanning two shards is
    recorded with the first): its samples counted through `fmt.samples` on the `light` result, or its failure
    dropped, named. Returns the number of images recorded."""
    n = 0
    for (i, _, _), r in zip(plan.parts, results):
        if i <= replayed.get(plan.split, -1):
            continue
        replayed[plan.split] = i
        n += 1
        im, meta, task = todo[i]
        r = unlight(r)
        if isinstance(r, ItemError):
            _drop_image(fmt, im, r.reason, r.file or meta["path"], r.detail, task)
            continue
        for _ in fmt.samples(im, meta, task, r):
            fmt.tally.packed[im.split] += 1
    return n


def _refuse_before_reading(fmt: PackFormat, images: list[ImageItem], out_dir: Path, overwrite: bool,
                           max_samples: int) -> dict[str, int]:
    """The refusals that need no image read: an --out that may not be replaced (its options compared; the
    inputs are compared once read, by `PackWriter`), a split that lists no image. Returns the samples each
    split stands for (listed, and dropped before listing), `check_drops`' denominators."""
    early = pack_identity(pack_job(dataset=fmt.dataset, attributes=fmt.attributes, label_fields=fmt.label_fields,
                                   max_samples=max_samples, max_bytes=MAX_SHARD_BYTES, job=fmt.job({})))
    check_out_dir(out_dir, inputs=fmt.inputs, overwrite=overwrite,
                  identity={"dataset": early["dataset"], "options": early["options"]})
    totals = {s: sum(fmt.tally.dropped(s).values()) for s in fmt.splits}
    for im in images:
        totals[im.split] = totals.get(im.split, 0) + im.samples
    listed = Counter(im.split for im in images)
    for s in fmt.splits:
        if not listed[s]:
            named = fmt.tally.named(s)
            raise AttrdistError(f"{out_dir}: split {s!r} lists no image to pack"
                                + (f" ({describe_drops(named)})" if named else "")
                                + "; check its inputs, or leave the split out")
    return totals


def _readable(fmt: PackFormat, images: list[ImageItem], verified: dict, out_dir: Path) -> list[tuple]:
    """Pass 1's verdicts: the images that failed are dropped (named), a split left with none stops the pack;
    returns the (image, metadata) pairs that go on."""
    readable = []
    for im in images:
        meta = verified[(im.split, im.key)]
        if isinstance(meta, ItemError):
            _drop_image(fmt, im, meta.reason, meta.file, meta.detail)
        else:
            readable.append((im, meta))
    alive = Counter(im.split for im, _ in readable)
    listed = Counter(im.split for im in images)
    for s in fmt.splits:
        if not alive[s]:
            _stop(fmt, out_dir, f"split {s!r}: none of its {listed[s]} images can be read "
                                f"({describe_drops(fmt.tally.named(s))}); check that the image folders exist and "
                                f"hold them")
    return readable


def _drop_image(fmt: PackFormat, im: ImageItem, reason: str, file: str | None, detail: str = "",
                task: Task | None = None) -> None:
    """Record the drop of an image (or of one pass-2 task's samples), each of its samples named."""
    file = file or fmt.file_of(im)
    ids = fmt.sample_ids(im, task)
    if ids is None:
        fmt.tally.drop(im.split, reason, task.samples if task else im.samples, file=file, detail=detail, key=im.key)
    else:
        for i in ids:
            fmt.tally.drop(im.split, reason, file=file, detail=detail, **i)


def _stop(fmt: PackFormat, out_dir: Path, message: str) -> None:
    """Stop before publishing: the whole list of drops goes to the staging folder, the message names it."""
    path = _write_drops(fmt, out_dir)
    raise AttrdistError(f"{out_dir}: {message}; nothing was published (every drop: {path})")


def _write_drops(fmt: PackFormat, out_dir: Path) -> Path:
    from attrdist import atomic

    staging = out_dir.with_name(f".{out_dir.name}.staging")
    staging.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(staging / DROPS, fmt.tally.jsonl())
    return staging / DROPS


def check_drops(fmt: PackFormat, out_dir: Path, totals: dict[str, int], max_dropped: float) -> None:
    """More than `max_dropped` of a split's samples dropped for problems with the input: stop (exit 2)."""
    for s in fmt.splits:
        failed, total = fmt.tally.failed(s), max(1, totals.get(s, 0))
        if failed > max_dropped * total:
            needed = math.ceil(1000 * failed / total) / 1000
            _stop(fmt, out_dir, f"split {s!r}: {failed} of {total} samples ({failed / total:.1%}) dropped for problems "
                                f"with the input ({describe_drops(fmt.tally.named(s, chosen=False))}), more than "
                                f"--max-dropped {max_dropped:g} allows; fix the inputs, or pass --max-dropped "
                                f"{needed:g} to pack without them")


def verify_all(images: list[ImageItem], verify: Callable, workers: int | None, progress: bool) -> dict:
    """Pass 1 over the images -> {(split, key): `verify`'s metadata | ItemError}."""
    paths = read_ahead((im.path for im in images),
                       path_of=lambda p: p if isinstance(p, (str, os.PathLike)) else p[0])
    results = parallel_map(verify, paths, workers)
    return {(im.split, im.key): r for im, r in zip(images, tqdm(results, total=len(images), desc="verify",
                                                                 unit="img", disable=not progress))}


def check_leak_policy(policy: str) -> None:
    if policy not in LEAK_POLICIES:
        raise AttrdistError(f"--on-leak {policy!r}: expected one of {', '.join(LEAK_POLICIES)}")


def check_leakage(verified: dict, split_names: list[str], policy: str, where: str, *,
                  out_dir: str | os.PathLike | None = None, advice: str | None = None,
                  workers: int | None = None) -> tuple[dict, dict[str, set]]:
    """Leak report over all verified images + the keys to drop per split (policy error|warn|drop).

    `attrdist.pack.leakage.find_leaks` over every verified image's (sha1, phash), named by its metadata's
    "path"; its near candidates (hash matches that are not byte copies) are confirmed by pixels: only the
    candidates' files are read again (`read_checked`, in `workers` threads) and compared
    (`leakage.similarity`); a candidate whose file cannot be read again, or whose metadata has no "path",
    counts as a duplicate. Where any duplicate is found and `out_dir` is given, a contact sheet of the first
    pairs is written beside it, `<out_dir>.leaks.png` (`leakage.sheet_path`; atomically; a stale one from an
    earlier pack is removed when none is found), and named in the message and in report["contact_sheet"].
    `advice` (a format's `leak_advice`) ends an error's message."""
    from attrdist.atomic import write_bytes
    from attrdist.pack.leakage import apply_policy, find_leaks, is_leak_sheet, leak_sheet, sheet_path

    check_leak_policy(policy)
    items: dict[str, list] = {s: [] for s in split_names}
    for (split, key), r in verified.items():
        if not isinstance(r, ItemError):
            items[split].append((key, r["sha1"], r["phash"], r.get("path")))
    report = find_leaks(items, confirm=lambda pairs: _pixel_similarities(verified, pairs, workers))
    report["policy"] = policy
    sheet = sheet_path(out_dir) if out_dir is not None else None
    if sheet is not None and (sheet.is_symlink() or (sheet.exists() and not is_leak_sheet(sheet))):
        sheet = None  # a file of the user's by that name: never replaced or removed (the message names the pairs)
    if sheet is not None:
        if report["exact"] + report["near"]:
            known = {str(r["path"]) for r in verified.values() if isinstance(r, dict) and r.get("path")}
            try:
                write_bytes(sheet, leak_sheet(report, lambda name: Path(name).read_bytes() if name in known else None))
                report["contact_sheet"] = str(sheet)
            except OSError:  # an unwritable place: the message names the pairs all the same
                sheet = None
        else:
            try:
                sheet.unlink(missing_ok=True)  # from an earlier pack of this output: no longer true
            except OSError:
                pass
            sheet = None
    drop = apply_policy(report, policy, where, advice=advice, sheet=str(sheet) if sheet else None) or {}
    return jsonable(report), {s: set(v) for s, v in drop.items()}


def _leak_views(item: tuple) -> Any:
    """The pixels `leakage.similarity` compares, of one image file that pass 1 verified: (path, sha1) -> views."""
    from attrdist.pack.leakage import image_views

    path, sha1 = item
    if path is None:
        raise ItemFailure("no_path", "the format's metadata names no file")
    return image_views(read_checked(path, sha1))


def _pixel_similarities(verified: dict, pairs: list, workers: int | None) -> list[float | None]:
    """`leakage.similarity` of each ((split, key), (split, key)) pair; None where a file could not be read again.
    Each image is read and decoded once, however many pairs it is in."""
    from attrdist.pack.leakage import similarity

    ids = sorted({i for pair in pairs for i in pair})
    views = dict(zip(ids, parallel_map(_leak_views, [(verified[i].get("path"), verified[i]["sha1"]) for i in ids],
                                       workers, threads=True)))
    return [None if isinstance(views[a], ItemError) or isinstance(views[b], ItemError)
            else similarity(views[a], views[b]) for a, b in pairs]


def jsonable(x):
    """`x` with sets sorted into lists, tuples as lists, keys as strings and numpy scalars as numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted((jsonable(v) for v in x), key=str)
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return x.item()
    return x


def check_split_names(names: list[str]) -> None:
    """Split names become shard file names and manifest keys: unique, not "leakage", not a path."""
    if len(set(names)) != len(names):
        raise AttrdistError(f"splits {names}: a split name is given twice; give each --split a unique name")
    for n in names:
        if n == "leakage" or not n or "/" in n or n.startswith("."):
            raise AttrdistError(f"split name {n!r} is not allowed (reserved, empty, or a path); choose another name")
