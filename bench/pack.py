"""Packing benchmark: copy-through and resize packing against raw read and decode+encode.

    .venv/bin/python -m bench.pack [--n 1200] [--rounds 3]

Data: N COCO-like JPEGs (640x480, quality 90) cut from the real COCO photos in
../shared/data/coco/images when present (else rendered by the demo generator at 640x480), with a
COCO captions JSON and instances JSON, written to a directory on disk (not tmpfs: TMPDIR) and synced.
Measured on the same cores, alternating, median of rounds:
  disk_read       read every file's bytes from the disk: each file's pages are first dropped from the page
                  cache (posix_fadvise DONTNEED, unprivileged), so this is the raw disk read of issue 3's target
  raw_read        read every file's bytes from the page cache (warm)
  raw_copy        read every file's bytes (warm) and write them into one file, fsync'ed (the I/O floor of a copy)
  pack_copy_disk  shards/coco.py --mode captions, in-process, starting from files dropped from the page cache
                  as for disk_read (bytes copied through; pass 1 reads and decodes every image to verify it and
                  fingerprints it for the leakage check; pass 2 re-reads them and writes the shards)
  pack_copy       the same from the page cache (warm)
  pack_folder     shards/imagefolder.py on the same files as an image folder (hard links in 3 class folders, 20 %
                  validation), in-process, warm: the same two passes through that packer
  verify_only     pass 1 alone (warm): one DCT-downscaled decode per image (verifies it) + the leak hash
  decode_encode   decode each JPEG, resize to max side 256, encode q90: a bare multiprocessing.Pool over all
                  cores (imap, 8 images per task), no packing
  pack_resize     shards/coco.py --mode image --max-side 256, in-process (verify pass + decode/resize/encode + write)
Targets (issue 3): pack_copy_disk <= 2x disk_read ("within 2x of raw disk read speed"); pack_resize <=
1.5x decode_encode.
Writes bench/results/pack.csv.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import alternate, parser, ratio_stats, save, summarize, target_row

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco" / "images"
WORDS = ["A person riding a red bicycle on a street", "A dog sitting on a wooden bench outdoors",
         "Two cats sleeping on a sofa indoors", "A plate of food on a table", "A white bus parked in a city"]


def make_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """N 640x480 JPEGs with captions + instances JSON (one whole-image box each)."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sources = sorted(COCO.glob("*.jpg")) if COCO.is_dir() else []
    images, caps, anns = [], [], []
    for i in range(n):
        if sources:
            src = Image.open(sources[i % len(sources)]).convert("RGB")
            w, h = src.size
            s = rng.uniform(0.6, 1.0)
            cw, ch = int(w * s), int(h * s)
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = src.crop((x, y, x + cw, y + ch)).resize((640, 480), Image.BICUBIC)
        else:
            from attrdist.demo.scenes import render_scene

            im = render_scene(np.random.default_rng([seed, i]), 480)[0].resize((640, 480))
        name = f"{i:012d}.jpg"
        im.save(img_dir / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
        caps.append({"id": i + 1, "image_id": i + 1, "caption": WORDS[i % len(WORDS)]})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 3, "bbox": [40, 30, 500, 400],
                     "area": 200000, "iscrowd": 0, "segmentation": []})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))
    cats = [{"id": k, "name": n, "supercategory": "x"} for k, n in ((1, "person"), (2, "dog"), (3, "cat"))]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def raw_read(root: Path) -> None:
    for p in sorted((root / "images").iterdir()):
        p.read_bytes()


def drop_cached(root: Path) -> None:
    """Drop every image's pages from the page cache (clean pages only: make_dataset's files are synced)."""
    for p in (root / "images").iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def from_disk(fn):
    """fn timed after the images were dropped from the page cache (the drop itself is not timed)."""
    def run(root: Path, *args) -> float:
        drop_cached(root)
        t0 = time.perf_counter()
        fn(root, *args)
        return time.perf_counter() - t0
    return run


def raw_copy(root: Path, out: Path) -> None:
    """Read every file and append its bytes to one file, fsync'ed at the end: the I/O floor of any
    copy-through pack (the bytes must be written somewhere; the packer fsyncs every closed shard)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        for p in sorted((root / "images").iterdir()):
            f.write(p.read_bytes())
        f.flush()
        os.fsync(f.fileno())
    out.unlink()


def image_folder(root: Path) -> Path:
    """The same files as an image folder with 3 classes: hard links, so the same bytes and page-cache state."""
    folder = root / "folder"
    for i, p in enumerate(sorted((root / "images").iterdir())):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        os.link(p, folder / f"c{i % 3}" / p.name)
    return folder


def pack_folder(folder: Path, out: Path, workers: int) -> None:
    """What `shards/imagefolder.py --root FOLDER --out OUT --on-leak warn` does, in-process."""
    from attrdist.pack.imagefolder import pack_imagefolder

    shutil.rmtree(out, ignore_errors=True)
    pack_imagefolder(folder, out, val=0.2, workers=workers, on_leak="warn", progress=False)


def verify_only(root: Path, workers: int) -> None:
    """The least work a safe copy-through pack must do per image: one decode to verify + the leak hash."""
    from attrdist.pack.coco import verify_image
    from attrdist.pack.pipeline import parallel_map

    list(parallel_map(verify_image, [str(p) for p in sorted((root / "images").iterdir())], workers))


def decode_encode(root: Path, workers: int) -> None:
    """The work alone, as plainly as Python spreads it over cores: multiprocessing.Pool.imap, 8 per task."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap(_decode_encode_one, sorted((root / "images").iterdir()), chunksize=8):
            pass


def _decode_encode_one(path: Path) -> int:
    from attrdist.pack.pipeline import resize_max_side

    return len(resize_max_side(path.read_bytes(), 256)[0])


def pack_copy(root: Path, out: Path, workers: int) -> None:
    """What `shards/coco.py --mode captions` does, in-process (no interpreter start-up in the timing)."""
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.pack.vocab import load_vocabulary

    shutil.rmtree(out, ignore_errors=True)
    vocab = ROOT / "recipes" / "coconut_vocab.json"
    pack_coco_captions(out, [SplitSource("train", root / "images", root / "captions.json")], load_vocabulary(vocab),
                       vocab_path=vocab, workers=workers, progress=False, on_leak="warn")


def pack_resize(root: Path, out: Path, workers: int) -> None:
    """What `shards/coco.py --mode image --max-side 256` does, in-process."""
    from attrdist.pack.coco import AnnSource, pack_coco_images

    shutil.rmtree(out, ignore_errors=True)
    pack_coco_images(out, [AnnSource("train", root / "images", root / "instances.json")], max_side=256,
                     workers=workers, progress=False, on_leak="warn")


def main(argv=None) -> list[dict]:
    ap = parser(__doc__, quick="smoke run: 120 images, 1 round")
    ap.add_argument("--n", type=int, default=1200)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds = 120, 1
    from attrdist.pack.pipeline import default_workers

    workers = default_workers()
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-") as tmp:
        root = make_dataset(Path(tmp) / "data", args.n)
        os.sync()  # written back: their pages are clean, so drop_cached can drop them
        mbytes = sum(p.stat().st_size for p in (root / "images").iterdir()) / 1e6
        folder = image_folder(root)
        t = alternate({
            "disk_read": lambda: from_disk(raw_read)(root),
            "pack_copy_disk": lambda: from_disk(pack_copy)(root, Path(tmp) / "copy", workers),
            "raw_read": lambda: raw_read(root),
            "raw_copy": lambda: raw_copy(root, Path(tmp) / "rawcopy" / "all.bin"),
            "pack_copy": lambda: pack_copy(root, Path(tmp) / "copy", workers),
            "pack_folder": lambda: pack_folder(folder, Path(tmp) / "folder-shards", workers),
            "verify_only": lambda: verify_only(root, workers),
        }, args.rounds)
        t.update(alternate({
            "decode_encode": lambda: decode_encode(root, workers),
            "pack_resize": lambda: pack_resize(root, Path(tmp) / "resize", workers),
        }, args.rounds))
    rows = [{"benchmark": "pack", "what": k, "n": args.n, "workers": workers, **summarize(v, args.n),
             "mb_per_s": round(mbytes / statistics.median(v), 1)} for k, v in t.items()]
    targets = [
        target_row("pack", "copy-through pack / raw disk read (both from disk, page cache dropped)",
                   *ratio_stats(t["pack_copy_disk"], t["disk_read"]), "<=", 2),
        target_row("pack", "resize pack / decode+resize+encode", *ratio_stats(t["pack_resize"], t["decode_encode"]),
                   "<=", 1.5),
    ]
    context = [("disk read / page-cache read: what dropping the cache took away", t["disk_read"], t["raw_read"]),
               ("copy-through pack / raw read, both from the page cache", t["pack_copy"], t["raw_read"]),
               ("copy-through pack / verify pass alone", t["pack_copy"], t["verify_only"]),
               ("imagefolder copy-through pack / COCO copy-through pack", t["pack_folder"], t["pack_copy"]),
               ("copy-through pack / raw copy (read + write + fsync, the I/O floor)", t["pack_copy"], t["raw_copy"]),
               ("raw copy / raw read: what writing the bytes costs", t["raw_copy"], t["raw_read"]),
               ("(copy-through pack - verify pass) / raw copy: packing's cost beyond verification", None, None)]
    ctx_rows = []
    for name, a, b in context:
        if a is None:  # per round: (pack - verify) / raw copy
            r = sorted((p - v) / c for p, v, c in zip(t["pack_copy"], t["verify_only"], t["raw_copy"]))
            m, lo, hi = r[len(r) // 2], r[0], r[-1]
        else:
            m, lo, hi = ratio_stats(a, b)
        ctx_rows.append({"benchmark": "pack", "what": name, "median": round(m, 3), "spread": f"{lo:.3f}-{hi:.3f}"})
    if statistics.median(t["disk_read"]) < 1.5 * statistics.median(t["raw_read"]):
        print("WARNING: dropping the page cache took almost nothing away (is TMPDIR on tmpfs?): disk_read and "
              "pack_copy_disk are then reads from memory, not from a disk")
    print(f"{args.n} images, {mbytes:.1f} MB")
    print("| what | median | images/s | MB/s |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        if "median_s" in r:
            print(f"| {r['what']} | {r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['items_per_s']:,.0f} | "
                  f"{r['mb_per_s']:,.0f} |")
    for r in ctx_rows:
        print(f"context: {r['what']}: {r['median']:.2f}x ({r['spread']})")
    return save("pack", rows + ctx_rows, targets, quick=args.quick)


if __name__ == "__main__":
    main()
