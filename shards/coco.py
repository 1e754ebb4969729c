"""Pack COCO-format data into attrdist shards: captions (weak labels), image categories, or object crops.

    # captions (default mode): caption-derived attribute labels through a vocabulary
    python shards/coco.py --out /data/coconut-shards --vocab recipes/coconut_vocab.json \
        --split train /data/coco/val2017 /data/coco/annotations/captions_val2017.json \
        --split val   /data/coco/val2017 /data/coco/annotations/captions_val2017_holdout.json

    # image: image-level multi-hot over the categories of an instances or panoptic (COCONut) JSON
    python shards/coco.py --mode image --out /data/coconut-img --max-side 512 \
        --split val /data/coco/val2017 /data/coconut/relabeled_coco_val.json

    # objects: one sample per object, its box crop with context (JPEG, --quality)
    python shards/coco.py --mode objects --out /data/coco-obj --margin 0.1 --min-size 16 \
        --split train /data/coco/train2017 /data/coco/annotations/instances_train2017.json \
        --split val   /data/coco/val2017   /data/coco/annotations/instances_val2017.json

In captions mode each --split is NAME IMAGE_DIR CAPTIONS_JSON [INSTANCES_JSON] (an instances JSON
whose images/annotations carry `attributes` lists adds `true_labels`: the demo's ground truth);
in image/objects mode it is NAME IMAGE_DIR ANNOTATIONS_JSON (instances 2014/2017 or panoptic,
detected). Images are verified (full decode) and fingerprinted first; images shared between
splits are handled by --on-leak (error: stop; warn: keep and report; drop: leave them out).
Every image/object not packed is counted by reason in the manifest report. The pack is written
to a staging directory and moved into place only when complete.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attrdist.pack.coco import (AnnSource, SplitSource, pack_coco_captions, pack_coco_images,  # noqa: E402
                           pack_coco_objects, summary_lines)
from attrdist.pack.inspect import finish_lines  # noqa: E402
from attrdist.pack.pipeline import INTERRUPTED, add_pack_args, packer_help  # noqa: E402
from attrdist.errors import AttrdistError, user_errors  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(**packer_help(__doc__))
    ap.add_argument("--mode", choices=("captions", "image", "objects"), default="captions",
                    help="captions (default): labels from captions via --vocab; image: image-level categories; "
                         "objects: one box crop per object")
    ap.add_argument("--out", required=True, type=Path, help="output pack folder, published whole once complete (see --overwrite)")
    ap.add_argument("--vocab", type=Path, help="attribute vocabulary JSON (captions mode, required there)")
    ap.add_argument("--split", nargs="+", action="append", required=True, metavar="ARG",
                    help="one split: NAME IMAGE_DIR JSON (captions mode: NAME IMAGE_DIR CAPTIONS_JSON "
                         "[INSTANCES_JSON]); repeat for each split")
    ap.add_argument("--dataset", help="dataset name recorded in the manifest (default: coco-<mode>)")
    add_pack_args(ap)
    ap.add_argument("--limit", type=int, default=0, help="pack only the first N images of each split (0: all)")
    ap.add_argument("--max-side", type=int, default=None,
                    help="image/objects: downscale so the longer side is <= N (default: image mode copies the bytes "
                         "through, objects mode keeps the crop's size)")
    ap.add_argument("--quality", type=int, default=None,
                    help="JPEG quality of what is re-encoded: objects' crops, and images shrunk by --max-side "
                         "(default: 90)")
    ap.add_argument("--margin", type=float, default=None, help="objects: context added on each side, x box size "
                                                               "(default: 0.1)")
    ap.add_argument("--min-size", type=float, default=None,
                    help="objects: boxes narrower or shorter than this (px) are dropped as too_small (default: 16)")
    args = ap.parse_args(argv)
    with user_errors(interrupted=INTERRUPTED):
        check_mode_options(args)
        args.max_side, args.quality = args.max_side or 0, args.quality or 90
        args.margin = 0.1 if args.margin is None else args.margin
        args.min_size = 16 if args.min_size is None else args.min_size
        common = dict(max_samples=args.max_samples, limit=args.limit, workers=args.workers, on_leak=args.on_leak,
                      progress=not args.quiet, overwrite=args.overwrite, max_dropped=args.max_dropped)
        if args.mode == "captions":
            if args.vocab is None:
                raise AttrdistError("--mode captions needs --vocab VOCAB.json (e.g. recipes/coconut_vocab.json)")
            from attrdist.pack.vocab import load_vocabulary

            splits = []
            for s in args.split:
                if len(s) not in (3, 4):
                    raise AttrdistError(f"--split {' '.join(s)}: expected NAME IMAGE_DIR CAPTIONS_JSON [INSTANCES_JSON]")
                splits.append(SplitSource(s[0], Path(s[1]), Path(s[2]), Path(s[3]) if len(s) == 4 else None))
            vocab = load_vocabulary(args.vocab)
            m = pack_coco_captions(args.out, splits, vocab, dataset=args.dataset or "coco-captions",
                                   vocab_path=args.vocab, **common)
            for name in (s.name for s in splits):
                rep = m["report"][name]
                print(f"{name}: packed {rep['packed']} of {rep['images']} images, dropped "
                      f"{ {k: v for k, v in rep['dropped'].items() if v} }, "
                      f"{rep['images_without_caption_hit']} images with no caption hit (no positive labels)")
        else:
            if args.vocab is not None:
                raise AttrdistError(f"--vocab is for --mode captions; --mode {args.mode} labels are the JSON's categories")
            splits = []
            for s in args.split:
                if len(s) != 3:
                    raise AttrdistError(f"--split {' '.join(s)}: expected NAME IMAGE_DIR ANNOTATIONS_JSON in --mode {args.mode}")
                splits.append(AnnSource(s[0], Path(s[1]), Path(s[2])))
            if args.mode == "image":
                m = pack_coco_images(args.out, splits, dataset=args.dataset or "coco-images",
                                     max_side=args.max_side, quality=args.quality, **common)
            else:
                m = pack_coco_objects(args.out, splits, dataset=args.dataset or "coco-objects", margin=args.margin,
                                      min_size=args.min_size, max_side=args.max_side, quality=args.quality, **common)
            for line in summary_lines(m, "objects" if args.mode == "objects" else "images"):
                print(line)
        leak = m["report"].get("leakage") or {}
        print(f"leakage across splits: {leak.get('exact', 0)} exact, {leak.get('near', 0)} near duplicates "
              f"(--on-leak {args.on_leak}; details under report.leakage in the manifest)")
        for line in finish_lines(m, args.out):
            print(line)


def check_mode_options(args) -> None:
    """An option the chosen --mode does not use stops the run: it would otherwise be ignored in silence."""
    unused = {"captions": ("max_side", "quality", "margin", "min_size"), "image": ("margin", "min_size"),
              "objects": ()}[args.mode]
    given = [f"--{k.replace('_', '-')}" for k in unused if getattr(args, k) is not None]
    if given:
        raise AttrdistError(f"{' '.join(given)}: not used by --mode {args.mode} (captions copies images through; "
                            f"--margin and --min-size shape object crops); leave them out or choose the mode that uses them")
    if args.mode == "image" and args.quality is not None and not args.max_side:
        raise AttrdistError("--quality: --mode image copies the image bytes through unless --max-side shrinks them; "
                            "add --max-side N or leave --quality out")


if __name__ == "__main__":
    main()
