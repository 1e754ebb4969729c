"""Shared machinery of the packers: parallel per-item work, image re-encoding, content hashes.

`parallel_map(fn, items, workers)` runs `fn` over items in worker processes (a few items per task)
and yields results in input order with a bounded number in flight, so packing uses every core
while memory stays flat in dataset size. `fn` must be a module-level function (it is pickled) and should return
bytes/JSON-able data, or raise; exceptions come back as `ItemError` results to be counted.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from attrdist.errors import AttrdistError


@dataclass(frozen=True)
class ItemError:
    """A per-item failure (corrupt image, bad box...): counted by the packer, never fatal."""

    reason: str
    detail: str


def add_pack_args(ap) -> None:
    """The options every packer entry point (shards/*.py) shares."""
    ap.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    ap.add_argument("--on-leak", choices=("error", "warn", "drop"), default="error",
                    help="identical/near-identical images across splits: fail (default), warn, or drop them "
                         "from the later split")
    ap.add_argument("--overwrite", action="store_true", help="replace --out even if it holds another dataset")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


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
        return ItemError(getattr(e, "reason", type(e).__name__), str(e)[:300])


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
    At most 4 tasks per worker are in flight, so memory stays flat in the number of items.
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1:
        for it in items:
            yield _call(fn, it)
        return
    chunk = 1 if threads else max(1, chunk)
    with (ThreadPoolExecutor(workers) if threads else ProcessPoolExecutor(workers)) as pool:
        pending: deque = deque()
        for part in _chunks(items, chunk):
            pending.append(pool.submit(_call_chunk, fn, part))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


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

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


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
        raise ItemFailure("decompression_bomb", f"{where}: {e}") from None
    except UnidentifiedImageError as e:  # no image format recognises these bytes
        raise ItemFailure("not_an_image", f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a recognised format whose header is broken or cut short
        raise ItemFailure("corrupt_image", f"{where}: {type(e).__name__}: {e}") from None
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
        raise ItemFailure("decompression_bomb", f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ItemFailure("corrupt_image", f"{where}: {type(e).__name__}: {e}") from None
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
        raise ItemFailure("changed_during_pack", f"{path}: {e}") from None
    if content_hash(data) != sha1:
        raise ItemFailure("changed_during_pack", f"{path}: content changed between the two passes")
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
