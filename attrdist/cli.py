"""The `attrdist` command (installed by `pip install -e .`). Imports are lazy: --help is fast.

    attrdist predict CHECKPOINT IMAGE [IMAGE ...] [--top K]   top attributes with probabilities
    attrdist predict DETECTOR_RUN IMAGE ... [--out DIR] [--classes a,b] [--threshold T]   boxes drawn (PNG)
    attrdist inspect SHARDS [--sheet out.png] [--n 32] [--split train] [--seed 0]
    attrdist index DIR_OR_URL --labels cls|json:FIELD [--split NAME=GLOB ...] [--classes FILE] [--out DIR]
                                              a manifest for existing WebDataset shards (no re-pack)
    attrdist version
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="attrdist", description="attrdist: attribute models from laptop to SLURM")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict", help="print the top attributes of images with a trained checkpoint")
    p.add_argument("checkpoint", help="run directory, checkpoints dir, or a checkpoints/step-* directory")
    p.add_argument("images", nargs="+")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--out", default="predictions", help="detectors: directory for <image>-detections.png")
    p.add_argument("--threshold", type=float, default=0.3, help="detectors: lowest score drawn and listed")
    p.add_argument("--classes", default="", help="detectors: comma-separated class names to detect instead of "
                                                 "the training classes (open vocabulary)")
    p = sub.add_parser("inspect", help="summarise a packed dataset; --sheet writes a contact sheet PNG")
    p.add_argument("shards", help="packed dataset directory (holds manifest.json)")
    p.add_argument("--sheet", default=None, help="write a contact sheet PNG of random samples here")
    p.add_argument("--n", type=int, default=32, help="samples on the sheet")
    p.add_argument("--split", default=None, help="split to sample for the sheet (default: train, else the first)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("index", help="make existing WebDataset shards (img2dataset, your own) trainable: writes a "
                                     "manifest and wids descriptors, never touches the shards")
    p.add_argument("dir", metavar="DIR_OR_URL", help="folder holding the .tar shards, or its URL (https://, http://, "
                   "s3://; listed by the server, or name them with a brace pattern: .../data-{000000..000099}.tar; "
                   "needs --out)")
    p.add_argument("--labels", required=True, help="where each sample's labels are: cls (an integer class in "
                                                   "<key>.cls) or json:FIELD (a class index or list of them in "
                                                   "<key>.json)")
    p.add_argument("--split", action="append", default=[], metavar="NAME=GLOB",
                   help="shards of a split, by file name glob in DIR (repeat; default: train=*.tar)")
    p.add_argument("--classes", default=None, help="class names, one a line in index order (default: class_<k>)")
    p.add_argument("--out", default=None, help="write the index here (the manifest names the shards' folder); "
                                               "default: beside local shards, if no manifest.json is there")
    p.add_argument("--dataset", default=None, help="dataset name in the manifest (default: the folder's name)")
    p.add_argument("--workers", type=int, default=None, help="shards scanned at once (default: the cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("version", help="print the version")
    args = ap.parse_args(argv)

    from attrdist.errors import user_errors

    with user_errors():
        if args.cmd == "version":
            from attrdist import __version__

            print(__version__)
        elif args.cmd == "inspect":
            from attrdist.pack.inspect import contact_sheet, summary

            from attrdist.data.reader import load_manifest
            from attrdist.pack.inspect import default_split

            print(summary(args.shards))
            if args.sheet:
                split = args.split or default_split(load_manifest(args.shards))
                w, h = contact_sheet(args.shards, args.sheet, n=args.n, split=split, seed=args.seed)
                print(f"contact sheet: {args.sheet} ({w}x{h}, split {split})")
        elif args.cmd == "index":
            from attrdist.pack.index import index_shards

            _, lines = index_shards(args.dir, labels=args.labels, splits=args.split, classes=args.classes,
                                    out=args.out, dataset=args.dataset, workers=args.workers,
                                    progress=not args.quiet)
            print("\n".join(lines))
        elif args.cmd == "predict":
            from attrdist.predict import load_for_inference, predict_images

            model, cfg, attributes, ckpt = load_for_inference(args.checkpoint)
            if cfg.data.task == "detection":
                from attrdist.predict import detect_images

                classes = [c.strip() for c in args.classes.split(",") if c.strip()] or None
                print(f"# checkpoint {ckpt} ({len(classes or attributes)} classes)")
                for png, found in detect_images(model, attributes, args.images, args.out, threshold=args.threshold,
                                                classes=classes, novel=cfg.data.novel_classes):
                    print(f"{png}: " + (", ".join(f"{n} {s:.2f} {b}" for n, s, b in found) or "nothing above threshold"))
                return
            print(f"# checkpoint {ckpt} ({len(attributes)} attributes)")
            for path, top in zip(args.images, predict_images(model, cfg, attributes, args.images, args.top)):
                print(f"{path}: " + ", ".join(f"{name} ({p:.3f})" for name, p in top))


if __name__ == "__main__":
    sys.exit(main())
