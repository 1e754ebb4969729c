"""Packing benchmark: copy-through and resize packing against raw read and decode+encode.

    .venv/bin/python -m bench.pack [--n 1200] [--rounds 3]

Data: N COCO-like JPEGs (640x480, quality 90) cut from the real COCO photos in
../shared/data/coco/images (or $ATTRDIST_BENCH_COCO) when present (else rendered by the demo generator at
640x480), with a COCO captions JSON and instances JSON, written to a directory on disk (not tmpfs: TMPDIR) and synced.
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
Pass 2 alone (issue 19: shards written whole by worker processes), after one pass 1 of the captions pack,
--pass2-samples samples per shard (default 100: 12 shards for 1,200 images, so 2 workers have shards to share):
  pass2_w1, pass2_w2            pass 2 with 1 and 2 shard workers (`pipeline.write_shards`: read, sha1 check,
                                crc32, tar, sha256, fsync; recorded in order), sources in the page cache
  pass2_disk_w1, pass2_disk_w2  the same, the sources dropped from the page cache first
  each with the CPU seconds the pass took (this process and its workers): MB per CPU-second is the per-core
  figure a many-core node multiplies, until the disk's read or write bandwidth stops it, or the packing
  process, which records every sample in order (its CPU ms per sample: the serial ceiling)
  hash_sha256, hash_sha1, crc32 one core over the same bytes in memory: the per-byte work pass 2 cannot skip
--compare DIR (other code, e.g. `git archive <commit> | tar -x -C DIR`): pack_copy with this code
and with DIR's, each in a fresh interpreter (start-up not timed), alternating with verify_only; the pack less
the verify pass is pass 2 and the rest (leak check, manifest) of each.
--only pass2 runs the pass-2 rows (and --compare) alone. Writes bench/results/pack.csv (pack-pass2.csv with
--only pass2).
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
# $ATTRDIST_BENCH_COCO: another folder of COCO photos (bench/gpu_wheels.sh carries them to a machine without ../shared)
COCO = Path(os.environ.get("ATTRDIST_BENCH_COCO") or ROOT.parent / "shared" / "data" / "coco" / "images")
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


def pass2_job(root: Path, max_samples: int) -> tuple:
    """Pass 1 of the copy-through captions pack, once: what `pass2` writes again and again (a fresh format
    per run, so its counts start at zero)."""
    from attrdist.pack.coco import CaptionsFormat, SplitSource
    from attrdist.pack.pipeline import verify_all
    from attrdist.pack.vocab import load_vocabulary

    vocab = ROOT / "recipes" / "coconut_vocab.json"

    def fresh():
        return CaptionsFormat([SplitSource("train", root / "images", root / "captions.json")], load_vocabulary(vocab),
                              dataset="bench", max_samples=max_samples, limit=0, vocab_path=vocab, on_leak="warn")

    fmt = fresh()
    images = fmt.images()
    verified = verify_all(images, fmt.verify, None, False)
    todo = [(im, verified[(im.split, im.key)], fmt.plan(im, verified[(im.split, im.key)])) for im in images]
    return fresh, todo, verified, max_samples


def pass2(job: tuple, out: Path, workers: int, cpu: list) -> None:
    """Pass 2 alone (`pipeline.write_shards`) into a fresh staging folder, not published; appends the CPU
    seconds it took to `cpu`: (this process, the shard workers)."""
    from attrdist.pack.pipeline import MAX_SHARD_BYTES, plan_shards, write_shards
    from attrdist.pack.writer import PackWriter

    fresh, todo, verified, max_samples = job
    fmt = fresh()
    shutil.rmtree(out.with_name(f".{out.name}.staging"), ignore_errors=True)  # else the next run would resume
    before = _cpu_seconds()
    with PackWriter(out, dataset=fmt.dataset, attributes=fmt.attributes, label_fields=fmt.label_fields,
                    max_samples=max_samples, max_bytes=MAX_SHARD_BYTES, job=fmt.job(verified), inputs=fmt.inputs) as w:
        write_shards(fmt, w, todo, plan_shards(todo, max_samples, MAX_SHARD_BYTES), workers, False)
    after = _cpu_seconds()
    cpu.append((after[0] - before[0], after[1] - before[1]))


def _cpu_seconds() -> tuple[float, float]:
    """User + system seconds of this process, and of the children it waited for (the shard workers)."""
    import resource

    return tuple(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def pack_copy_with(code: Path, root: Path, out: Path, workers: int) -> float:
    """`pack_copy` with the attrdist and bench of the checkout `code`, in a fresh interpreter; its seconds."""
    import subprocess
    import sys

    prog = ("import time\nfrom pathlib import Path\nfrom bench.pack import pack_copy\nt0 = time.perf_counter()\n"
            f"pack_copy(Path({str(root)!r}), Path({str(out)!r}), {workers})\nprint(time.perf_counter() - t0)")
    p = subprocess.run([sys.executable, "-c", prog], cwd=code, env={**os.environ, "PYTHONPATH": str(code)},
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"pack_copy with {code} failed: {p.stderr[-2000:]}")
    return float(p.stdout.split()[-1])


def compare_rows(code: Path, root: Path, tmp: Path, n: int, mbytes: float, rounds: int, workers: int) -> list[dict]:
    """pack_copy with this code and with `code`'s, alternating with verify_only (this code)."""
    t = alternate({"pack_copy_this": lambda: pack_copy_with(ROOT, root, tmp / "this", workers),
                   f"pack_copy_at_{code.name}": lambda: pack_copy_with(code, root, tmp / "other", workers),
                   "verify_only": lambda: verify_only(root, workers)}, rounds)
    rows = [{"benchmark": "pack", "what": k, "n": n, "workers": workers, "code": str(code) if "_at_" in k else "this",
             **summarize(v, n), "mb_per_s": round(mbytes / statistics.median(v), 1)} for k, v in t.items()]
    for k in list(t)[:2]:
        rest = sorted(a - b for a, b in zip(t[k], t["verify_only"]))
        rows.append({"benchmark": "pack", "what": f"{k} - verify_only (pass 2 and the rest)", "n": n,
                     "median_s": round(rest[len(rest) // 2], 4), "min_s": round(rest[0], 4), "max_s": round(rest[-1], 4),
                     "mb_per_s": round(mbytes / rest[len(rest) // 2], 1)})
    for r in rows:
        print(f"| {r['what']} | {r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['mb_per_s']:,.0f} MB/s |")
    return rows


def hash_rates(root: Path, rounds: int) -> dict[str, list[float]]:
    """Seconds for one core to sha256, sha1 and crc32 every image's bytes (in memory)."""
    import hashlib
    import zlib

    data = [p.read_bytes() for p in sorted((root / "images").iterdir())]
    fns = {"hash_sha256": lambda: [hashlib.sha256(d).digest() for d in data],
           "hash_sha1": lambda: [hashlib.sha1(d).digest() for d in data],
           "crc32": lambda: [zlib.crc32(d) for d in data]}
    return alternate(fns, rounds)


def pass2_rows(root: Path, tmp: Path, n: int, mbytes: float, rounds: int, samples: int) -> list[dict]:
    """Pass 2 with 1 and 2 shard workers, warm and from disk, alternating; MB/s, samples/s, MB per CPU-second."""
    job = pass2_job(root, samples)
    cpu: dict[str, list[float]] = {}

    def run(name: str, workers: int, disk: bool):
        def go() -> float:
            if disk:
                drop_cached(root)
            t0 = time.perf_counter()
            pass2(job, tmp / name, workers, cpu.setdefault(name, []))
            return time.perf_counter() - t0
        return go

    t = alternate({"pass2_w1": run("pass2_w1", 1, False), "pass2_w2": run("pass2_w2", 2, False),
                   "pass2_disk_w1": run("pass2_disk_w1", 1, True), "pass2_disk_w2": run("pass2_disk_w2", 2, True)},
                  rounds)
    rows = []
    for k, v in t.items():
        per_cpu = sorted(mbytes / (a + b) for a, b in cpu[k])
        main = statistics.median(a for a, _ in cpu[k])
        rows.append({"benchmark": "pack", "what": k, "n": n, "workers": int(k[-1]), "samples_per_shard": samples,
                     **summarize(v, n), "mb_per_s": round(mbytes / statistics.median(v), 1),
                     "mb_per_s_min": round(mbytes / max(v), 1), "mb_per_s_max": round(mbytes / min(v), 1),
                     "cpu_s_median": round(statistics.median(a + b for a, b in cpu[k]), 4),
                     "cpu_s_main": round(main, 4), "cpu_s_workers": round(statistics.median(b for _, b in cpu[k]), 4),
                     "main_ms_per_sample": round(1000 * main / n, 4),
                     "mb_per_cpu_s": round(statistics.median(per_cpu), 1),
                     "mb_per_cpu_s_spread": f"{per_cpu[0]:.0f}-{per_cpu[-1]:.0f}"})
    for k, v in hash_rates(root, rounds).items():
        rows.append({"benchmark": "pack", "what": k, "n": n, "workers": 1, **summarize(v, n),
                     "mb_per_s": round(mbytes / statistics.median(v), 1)})
    return rows


def main(argv=None) -> list[dict]:
    ap = parser(__doc__, quick="smoke run: 120 images, 1 round")
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--only", choices=["pass2"], help="run only these rows")
    ap.add_argument("--pass2-samples", type=int, default=100, help="samples per shard in the pass-2 rows")
    ap.add_argument("--compare", type=Path, metavar="DIR", help="a checkout of other code to compare pack_copy with")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds = 120, 1
    from attrdist.pack.pipeline import default_workers

    workers = default_workers()
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-") as tmp:
        root = make_dataset(Path(tmp) / "data", args.n)
        os.sync()  # written back: their pages are clean, so drop_cached can drop them
        mbytes = sum(p.stat().st_size for p in (root / "images").iterdir()) / 1e6
        p2 = pass2_rows(root, Path(tmp), args.n, mbytes, args.rounds, args.pass2_samples)
        print_pass2(p2, args.n, mbytes)
        if args.compare:
            p2 += compare_rows(args.compare.resolve(), root, Path(tmp), args.n, mbytes, args.rounds, workers)
        if args.only == "pass2":
            return save("pack-pass2", p2, quick=args.quick)
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
    print_pass2(p2, args.n, mbytes)
    return save("pack", rows + ctx_rows + p2, targets, quick=args.quick)


def print_pass2(rows: list[dict], n: int, mbytes: float) -> None:
    print(f"pass 2 alone, {n} images, {mbytes:.1f} MB")
    print("| what | median (min-max) | MB/s (min-max) | samples/s | CPU s: all (packing process) | MB per CPU-s "
          "(spread) |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        spread = f" ({r['mb_per_s_min']:,.0f}-{r['mb_per_s_max']:,.0f})" if "mb_per_s_min" in r else ""
        cpu = (f"{r['cpu_s_median']:.3f} ({r['cpu_s_main']:.3f}) | {r['mb_per_cpu_s']:,.0f} ({r['mb_per_cpu_s_spread']})"
               if "cpu_s_median" in r else "(one core) | ")
        print(f"| {r['what']} | {r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['mb_per_s']:,.0f}{spread} | "
              f"{r['items_per_s']:,.0f} | {cpu} |")


if __name__ == "__main__":
    main()
