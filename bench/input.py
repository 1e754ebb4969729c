"""Input pipeline benchmark at 224 px: attrdist's shard loader vs the loose-file loader vs decode-only.

    .venv/bin/python -m bench.input [--n 2000] [--rounds 3] [--max-side 256]   # ~3-4 min on 2 cores
    .venv/bin/python -m bench.input --quick      # smoke run: 200 images, 1 round (proves it runs, measures nothing)

Data: N COCO-like JPEGs (640x480, q90, cut from the real COCO photos in ../shared/data/coco/images;
`bench.pack.make_dataset`) with a captions and an instances JSON, packed twice, untimed:
  source shards   `shards/coco.py --mode captions` (the coconut recipe's packer): bytes copied through
  resized shards  `shards/coco.py --mode image --max-side 256` (--max-side): re-encoded q90, 256x192

Every variant is a torch DataLoader with as many worker processes as there are cores, batches of
32 at 224 px, over the same N images in a shuffled order, last incomplete batch dropped
(floor(N/32)*32 images per pass), a fresh loader per pass (worker start-up included: the trainer
builds a new loader every epoch, persistent_workers=False). Each pass checks it delivered every
image (no blank "corrupt" samples). Alternating, median of rounds:
  loose             (a) the experiments' loader: torchvision.datasets.CocoCaptions (per-item pycocotools
                    lookup of file name + captions; PIL.Image.open(path).convert('RGB')), labels from the
                    captions through the vocabulary, torchvision.transforms RandomResizedCrop(224) +
                    RandomHorizontalFlip + ToTensor + Normalize, default collate
  loose_recipe_aug  (a') the same loader with the coconut recipe's augmentation in torchvision.transforms
                    (crop scale 0.5-1, flip, ColorJitter(.2, .2, .2, .02), RandomErasing(.25)): context,
                    the same augmentation work as (b)
  shards_source     (b) attrdist: ShardReader + SampleDataset(train) + BatchPlan + make_loader, exactly as
                    the trainer builds them, on the source shards, coconut full() DataConfig (224 px, its
                    augment config) with batch 32 and workers = cores. Per image: indexed tar read,
                    decode_image with min_side = ceil(224 / sqrt(crop_scale_min)) = 317 (PIL draft: on
                    640x480 that is a FULL decode, 1/2 scale would give 240 < 317), crc32 check,
                    train_geometry (resized crop, flip on uint8; colour/erase parameters drawn) and, as
                    the trainer builds it for a CPU device, the pixel-wise stage in the worker too
                    (photometric: colour map, normalise, erase), collated in the dtype the trainer asks for
                    (data.worker_dtype=auto: bfloat16 when the recipe's precision resolves to bf16, as on
                    CPUs with AVX512_BF16; else float32)
  shards_source_loader  (b-) (b) as the trainer builds it for an accelerator: uint8 batches plus each
                    sample's colour/erase parameters (the pixel-wise stage then runs on the device)
  shards_source_crop_flip  (b') (b) with the augmentation cut to (a)'s (crop scale 0.08-1, flip): context
  shards_resized    (c) (b) on the resized shards (decode of 256x192, crops upsampled to 224)
  decode_attrdist   (d0) decode-only with attrdist's own decode: the same shard reads and bytes, the same
                    BatchPlan and workers, `decode_image(bytes, 317)`, nothing else (no labels, no
                    augmentation, nothing sent back but a count): the baseline of the overhead target
  decode_pil        decode-only through PIL (`transforms.decode_with_pil`: attrdist's decode for every image
                    before it decoded JPEGs with simplejpeg; the same pixels): context
  decode_ceiling    (d) decode-only ceiling: simplejpeg (the fastest decoder here; bit-identical output
                    to PIL's at full scale on these files) at the DCT scale attrdist's decode picks (PIL
                    draft's power-of-two rule for min_side 317: full scale for 640x480). This is the fair
                    ceiling: the least decode work that yields the pixels (b)'s augmentation uses.
  decode_ceiling_224  simplejpeg DCT-downscaled to short side >= 224 (1/2 scale: 320x240), the ceiling if
                    crops could be upsampled (context; attrdist's quality rule does not allow it here)
  decode_full       simplejpeg full decode, no downscale (context; = decode_ceiling on 640x480 sources)
Targets (input-pipeline issue), all on per-round ratios (rounds alternate, so pairs are neighbours), against
(a'), the loader the experiments used (experiment 1 augments with crop, flip, colour jitter and erasing):
  images/s (b) / images/s (a') >= 1.5          (= time a' / time b)
  images/s (c) / images/s (a') >= 3
  time (b) / time (d0) <= 1.25: augmentation + collation overhead <= 25 % over decode-only with the same
  decoder at the same scale on the same bytes and cores. "Augmentation + collation" is everything (b)
  does beyond reading and decoding: label JSON, crc32, crop/flip/jitter/normalise/erase, stacking the
  batch and its trip to the main process. (b-) / (d0), the loader an accelerator gets, and (b) against
  (d) (the faster decoder) are printed as context.
Writes bench/results/input.csv (input-quick.csv with --quick).
"""

from __future__ import annotations

import contextlib
import io
import math
import runpy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from bench.common import alternate, parser, ratio_stats, save, summarize, target_row
from bench.pack import make_dataset

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ROOT / "recipes" / "coconut_vocab.json"
BATCH = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------
# (a) the loose-file loader of the experiments
# ------------------------------------------------------------------------------------------


class VocabTarget:
    """COCO captions -> float multi-hot through the attribute vocabulary (per item, as the experiments did)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.vocab.labels(captions).astype(np.float32))


def loose_dataset(root: Path, vocab, recipe_aug=None):
    """torchvision's CocoCaptions: per-item COCO lookup + PIL open/convert + torchvision transforms."""
    import torchvision.transforms as T
    from torchvision.datasets import CocoCaptions

    if recipe_aug is None:  # what the brief / experiments' loader did
        tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    else:  # the recipe's augmentation, in torchvision.transforms
        a = recipe_aug
        tf = T.Compose([T.RandomResizedCrop(224, scale=a.crop_scale, ratio=a.crop_ratio),
                        T.RandomHorizontalFlip(a.hflip), T.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue),
                        T.ToTensor(), T.Normalize(MEAN, STD),
                        T.RandomErasing(p=a.erase, scale=a.erase_scale, value=0)])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "loading annotations..."
        return CocoCaptions(str(root / "images"), str(root / "captions.json"), transform=tf,
                            target_transform=VocabTarget(vocab))


def loose_pass(ds, workers: int, epoch: int) -> int:
    loader = DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(epoch), prefetch_factor=2 if workers else None)
    n = 0
    for images, labels in loader:
        n += images.shape[0]
    return n


# ------------------------------------------------------------------------------------------
# (b), (c) attrdist's shard loader, as the trainer builds it
# ------------------------------------------------------------------------------------------


def shard_dataset(shards: Path, data_cfg, seed: int, pixels_in_workers: bool = True, precision: str = "auto"):
    """SampleDataset as the trainer builds it on this CPU: `precision` is the run's (run.precision), which
    decides the dtype of the finished images (data.worker_dtype=auto: bfloat16 for a bf16 run)."""
    from attrdist.data.samples import SampleDataset, worker_image_dtype
    from attrdist.train.runtime import resolve_precision
    from attrdist.data.reader import ShardReader, load_manifest

    manifest = load_manifest(shards)
    fields = [data_cfg.labels, *[f for f in data_cfg.eval_labels if f != data_cfg.labels]]  # as Trainer does
    reader = ShardReader(manifest, data_cfg.train_split)
    return SampleDataset(reader, len(manifest.attributes), fields, data_cfg, seed, train=True,
                         pixels_in_workers=pixels_in_workers,
                         image_dtype=worker_image_dtype(data_cfg.worker_dtype, resolve_precision(precision, "cpu")))


def shard_pass(ds, data_cfg, seed: int, epoch: int) -> int:
    from attrdist.core.order import BatchPlan
    from attrdist.data.loader import make_loader

    plan = BatchPlan(len(ds), data_cfg.batch_size, 1, 0, seed, epoch, shuffle=True, drop_last=True)
    n = 0
    for batch in make_loader(ds, plan, data_cfg.num_workers):
        # (b)/(c): float images finished in the workers (CPU device); (b-): uint8 + parameters for the device.
        # Nothing else happens here, as in the other loaders' passes.
        assert batch["image"].dtype == (torch.uint8 if "colour" in batch else ds.image_dtype)
        n += int(batch["valid"].sum())  # a corrupt sample would be a blank (fast) image: count only real ones
    return n


# ------------------------------------------------------------------------------------------
# (d) decode-only: same shard reads, same BatchPlan and workers, only the decode
# ------------------------------------------------------------------------------------------


class DecodeOnly(Dataset):
    """(index, epoch) -> read the sample's bytes from the shards and decode them; returns the height only."""

    def __init__(self, reader, how: str, min_side: int, sizes: list[tuple[int, int]]):
        self.reader, self.how, self.min_side, self.sizes = reader, how, min_side, sizes

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, item):
        import simplejpeg

        from attrdist.data.samples import IMAGE_KEYS
        from attrdist.core.transforms import decode_image, decode_with_pil

        index, _ = item
        raw = self.reader[index]
        data = bytes(next(raw[k] for k in IMAGE_KEYS if k in raw))
        if self.how == "attrdist":  # exactly SampleDataset's call
            return decode_image(data, self.min_side).shape[1]
        if self.how == "pil":
            return decode_with_pil(data, self.min_side).shape[1]
        if self.how == "same_scale":  # the scale PIL draft picks, by the fastest decoder
            w, h = self.sizes[index]
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=w, min_height=h).shape[0]
        if self.how == "short224":
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=224, min_height=224).shape[0]
        return simplejpeg.decode_jpeg(data, colorspace="RGB").shape[0]  # full


def _count(batch: list) -> int:
    return len(batch)


def decode_pass(ds: DecodeOnly, seed: int, epoch: int, workers: int) -> int:
    from attrdist.core.order import BatchPlan
    from attrdist.data.loader import tuned_workers

    plan = BatchPlan(len(ds), BATCH, 1, 0, seed, epoch, shuffle=True, drop_last=True)
    # the same workers as attrdist's loader: run.malloc=keep (tune_malloc) in each
    loader = DataLoader(ds, batch_sampler=plan, num_workers=workers, collate_fn=_count,
                        worker_init_fn=tuned_workers("keep"), prefetch_factor=2 if workers else None)
    return sum(loader)


def draft_sizes(reader, min_side: int) -> list[tuple[int, int]]:
    """Per sample, the (w, h) PIL draft gives for min_side (header only, untimed)."""
    from attrdist.data.samples import IMAGE_KEYS

    out = []
    for i in range(len(reader)):
        raw = reader[i]
        im = Image.open(io.BytesIO(bytes(next(raw[k] for k in IMAGE_KEYS if k in raw))))
        if im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))
        out.append(im.size)
    return out


# ------------------------------------------------------------------------------------------


def main(argv=None) -> list[dict]:
    ap = parser(__doc__, quick="smoke run: 200 images, 1 round")
    ap.add_argument("--n", type=int, default=2000, help="images (default: 2000)")
    ap.add_argument("--max-side", type=int, default=256, help="pack-time resize of (c) (default: 256)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds = 200, 1
    from attrdist.pack.coco import AnnSource, SplitSource, pack_coco_captions, pack_coco_images
    from attrdist.pack.pipeline import default_workers
    from attrdist.pack.vocab import load_vocabulary

    workers = default_workers()
    cfg = runpy.run_path(str(ROOT / "recipes" / "coconut.py"), run_name="coconut_recipe")["full"]()
    data_cfg = replace(cfg.data, batch_size=BATCH, num_workers=workers)
    if data_cfg.image_size != 224:
        raise SystemExit(f"recipes/coconut.py full(): image_size {data_cfg.image_size}, expected 224")
    aug = data_cfg.augment
    crop_flip = replace(aug, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), vflip=0.0, rotate=0.0, brightness=0.0,
                        contrast=0.0, saturation=0.0, hue=0.0, blur=0.0, erase=0.0)
    seed = cfg.run.seed
    min_side = int(math.ceil(data_cfg.image_size / math.sqrt(aug.crop_scale[0])))  # as SampleDataset computes it
    vocab = load_vocabulary(VOCAB)
    expect = (args.n // BATCH) * BATCH
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-input-") as tmp:
        t0 = time.perf_counter()
        root = make_dataset(Path(tmp) / "data", args.n)
        t1 = time.perf_counter()
        src, small = Path(tmp) / "source", Path(tmp) / "resized"
        pack_coco_captions(src, [SplitSource("train", root / "images", root / "captions.json")], vocab,
                           vocab_path=VOCAB, workers=workers, progress=False, on_leak="warn")
        pack_coco_images(small, [AnnSource("train", root / "images", root / "instances.json")], max_side=args.max_side,
                         workers=workers, progress=False, on_leak="warn")
        t2 = time.perf_counter()
        print(f"setup: {args.n} images in {t1 - t0:.1f} s, both packs in {t2 - t1:.1f} s; {workers} workers, "
              f"batch {BATCH}, 224 px, {expect} images per pass, {args.rounds} round{'s' if args.rounds != 1 else ''}",
              flush=True)

        loose = loose_dataset(root, vocab)
        loose_aug = loose_dataset(root, vocab, aug)
        prec = cfg.run.precision  # the recipe's: auto -> bf16 on CPUs with AVX512_BF16 (bfloat16 batches)
        ds_src = shard_dataset(src, data_cfg, seed, precision=prec)
        cf_cfg = replace(data_cfg, augment=crop_flip)
        ds_cf = shard_dataset(src, cf_cfg, seed, precision=prec)
        ds_small = shard_dataset(small, data_cfg, seed, precision=prec)
        ds_dev = shard_dataset(src, data_cfg, seed, pixels_in_workers=False)  # as the trainer builds it for a GPU
        sizes = draft_sizes(ds_src.reader, min_side)
        dec = {how: DecodeOnly(ds_src.reader, how, min_side, sizes)
               for how in ("attrdist", "pil", "same_scale", "short224", "full")}
        shapes = sorted(set(sizes))
        print(f"attrdist's decode (min_side {min_side}) gives {shapes[:3]}{' ...' if len(shapes) > 3 else ''} "
              f"from the source shards", flush=True)

        epochs: dict[str, int] = {}

        def run(name: str, fn) -> None:
            e = epochs[name] = epochs.get(name, -1) + 1  # a new epoch (order) per pass, as in training
            got = fn(e)
            if got != expect:
                raise RuntimeError(f"{name}: delivered {got} images, expected {expect}")

        fns = {
            "loose": lambda e: loose_pass(loose, workers, e),
            "loose_recipe_aug": lambda e: loose_pass(loose_aug, workers, e),
            "shards_source": lambda e: shard_pass(ds_src, data_cfg, seed, e),
            "shards_source_loader": lambda e: shard_pass(ds_dev, data_cfg, seed, e),
            "shards_source_crop_flip": lambda e: shard_pass(ds_cf, cf_cfg, seed, e),
            "shards_resized": lambda e: shard_pass(ds_small, data_cfg, seed, e),
            "decode_attrdist": lambda e: decode_pass(dec["attrdist"], seed, e, workers),
            "decode_pil": lambda e: decode_pass(dec["pil"], seed, e, workers),
            "decode_ceiling": lambda e: decode_pass(dec["same_scale"], seed, e, workers),
            "decode_ceiling_224": lambda e: decode_pass(dec["short224"], seed, e, workers),
            "decode_full": lambda e: decode_pass(dec["full"], seed, e, workers),
        }
        t = alternate({k: (lambda k=k, f=f: run(k, f)) for k, f in fns.items()}, args.rounds)
        print(f"timed rounds: {time.perf_counter() - t2:.1f} s", flush=True)

    what = {
        "loose": "(a) loose files: CocoCaptions + PIL + torchvision RRC/flip/ToTensor/Normalize",
        "loose_recipe_aug": "(a') loose files with the recipe's augmentation (jitter + erase)",
        "shards_source": "(b) attrdist loader, source-size shards (copy-through)",
        "shards_source_loader": "(b-) (b) as built for an accelerator: uint8 batches + colour/erase parameters",
        "shards_source_crop_flip": "(b') attrdist loader, source shards, (a)'s augmentation only",
        "shards_resized": f"(c) attrdist loader, shards resized at pack time (max side {args.max_side})",
        "decode_attrdist": f"(d0) decode-only, attrdist decode_image(min_side {min_side}), source shards",
        "decode_pil": f"decode-only through PIL (decode_with_pil, min_side {min_side}): attrdist's decode before simplejpeg",
        "decode_ceiling": "(d) decode-only ceiling: simplejpeg at attrdist's decode scale",
        "decode_ceiling_224": "decode-only, simplejpeg DCT-downscaled to short side >= 224",
        "decode_full": "decode-only, simplejpeg full decode (no downscale)",
    }
    common = {"n": args.n, "images_per_pass": expect, "workers": workers, "batch": BATCH, "image_size": 224,
              "max_side": args.max_side}
    rows = [{"benchmark": "input", "what": k, "description": what[k], **common, **summarize(v, expect)}
            for k, v in t.items()]
    # The experiments' loader (a') does the recipe's augmentation (experiment 1: crop, flip, colour jitter,
    # erasing): it is the baseline of the targets; (a), crop + flip only, is context.
    targets = [
        target_row("input", "(b) shard loader, source-size shards / (a') the experiments' loose-file loader, "
                   "same augmentation, images/s", *ratio_stats(t["loose_recipe_aug"], t["shards_source"]), ">=", 1.5),
        target_row("input", f"(c) shard loader, pack-time-resized shards (max side {args.max_side}) / (a'), images/s",
                   *ratio_stats(t["loose_recipe_aug"], t["shards_resized"]), ">=", 3),
        target_row("input", "(b) time / decode-only time (attrdist's decode, same bytes, scale, workers) = 1 + "
                   "augmentation+collation overhead", *ratio_stats(t["shards_source"], t["decode_attrdist"]),
                   "<=", 1.25),
    ]
    context = [
        ("(b-) time / decode-only time: the loader as built for an accelerator (uint8 out; colour map, normalise "
         "and erase then run on the device)", t["shards_source_loader"], t["decode_attrdist"]),
        ("(b) / (a) loose loader with crop + flip only, images/s", t["loose"], t["shards_source"]),
        ("(c) / (a), images/s", t["loose"], t["shards_resized"]),
        ("(b) time / decode-only ceiling time (simplejpeg, same scale)", t["shards_source"], t["decode_ceiling"]),
        ("decode-only: attrdist decode_image time / simplejpeg time (same scale)", t["decode_attrdist"],
         t["decode_ceiling"]),
        ("decode-only: PIL's path (decode_with_pil) time / attrdist decode_image time", t["decode_pil"],
         t["decode_attrdist"]),
        ("(b') shard loader with (a)'s augmentation / (a), images/s", t["loose"], t["shards_source_crop_flip"]),
        ("(c) / (b): what pack-time resize buys, images/s", t["shards_source"], t["shards_resized"]),
    ]
    ctx_rows = []
    for name, a, b in context:
        m, lo, hi = ratio_stats(a, b)
        ctx_rows.append({"benchmark": "input", "what": name, "median": round(m, 3), "spread": f"{lo:.3f}-{hi:.3f}"})
    print("\n| variant | what | median time per pass | images/s |\n| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['what']} | {r['description']} | {r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f}) | "
              f"{r['items_per_s']:,.0f} |")
    for r in ctx_rows:
        print(f"context: {r['what']}: {r['median']:.2f}x ({r['spread']})")
    if args.quick:
        print("(--quick: 1 round of 200 images; proves the benchmark runs, measures nothing)")
    return save("input", rows + ctx_rows, targets, quick=args.quick)


if __name__ == "__main__":
    main()
