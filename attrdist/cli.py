"""The `attrdist` command (installed by `pip install -e .`). Imports are lazy: --help is fast.

    attrdist predict CHECKPOINT IMAGE [IMAGE ...] [--top K] [--thresholds val] [--jsonl FILE]
                     [--device auto|cpu|cuda|mps] [--batch-size N]   top attributes with probabilities
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
    p.add_argument("--top", type=int, default=5, help="attributes/classes listed per image, most probable first")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="where the model runs; auto = CUDA > MPS > CPU, as training's run.device=auto")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass; results are printed (and "
                                                              "written to --jsonl) as each batch finishes")
    p.add_argument("--thresholds", default="", metavar="val[:FIELD]",
                   help="multilabel runs: also list the attributes at or above the per-attribute thresholds the run "
                        "tuned on validation (report.json; label field data.eval_labels[0] unless :FIELD). Refused "
                        "for multiclass runs (one softmax class, no thresholds) and detectors (--threshold)")
    p.add_argument("--jsonl", default=None, metavar="FILE", help="also write one JSON object per image to FILE "
                   "(path, top [[name, prob], ...], predicted [[name, prob], ...] with --thresholds; detectors: "
                   "png, detections); FILE appears complete or not at all")
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
            _predict(args)


def _predict(args) -> None:
    import contextlib
    import json

    from attrdist import atomic
    from attrdist.errors import AttrdistError
    from attrdist.predict import iter_predictions, load_for_inference, val_thresholds
    from attrdist.train.runtime import choose_device

    if args.batch_size < 1:
        raise AttrdistError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.top < 1:
        raise AttrdistError(f"--top {args.top}: must be >= 1")
    which, _, field = args.thresholds.partition(":")
    if which not in ("", "val"):
        raise AttrdistError(f"--thresholds {args.thresholds}: the thresholds a run has are those tuned on val: "
                            f"--thresholds val (or val:FIELD)")
    device = choose_device(args.device, key="--device")
    model, cfg, attributes, ckpt = load_for_inference(args.checkpoint, device)
    with contextlib.ExitStack() as stack:
        out = None
        if args.jsonl:
            out = stack.enter_context(open(stack.enter_context(atomic.atomic_path(args.jsonl)), "w"))

        def emit(obj: dict) -> None:
            if out is not None:
                out.write(json.dumps(obj) + "\n")

        if cfg.data.task == "detection":
            from attrdist.predict import detect_images

            if which:
                val_thresholds(ckpt, cfg, attributes, field)  # refuses, saying why
            classes = [c.strip() for c in args.classes.split(",") if c.strip()] or None
            print(f"# checkpoint {ckpt} ({len(classes or attributes)} classes) on {device}", flush=True)
            for path, (png, found) in zip(args.images, detect_images(model, attributes, args.images, args.out,
                                                                   threshold=args.threshold, classes=classes,
                                                                   novel=cfg.data.novel_classes, device=device)):
                print(f"{png}: " + (", ".join(f"{n} {s:.2f} {b}" for n, s, b in found) or "nothing above threshold"),
                      flush=True)
                emit({"path": path, "png": str(png), "detections": [[n, s, b] for n, s, b in found]})
            return
        thresholds, about = val_thresholds(ckpt, cfg, attributes, field) if which else (None, "")
        from attrdist.core.transforms import Preprocess

        pre = Preprocess.of(cfg.data)
        print(f"# checkpoint {ckpt} ({len(attributes)} attributes) on {device}; preprocessing {pre.image_size} px, "
              f"eval resize {pre.eval_resize:.4g}, {pre.interpolation}, mean {list(pre.mean)}, std {list(pre.std)}"
              + (f"; thresholds {about}" if about else ""), flush=True)
        for path, top, above in iter_predictions(model, cfg, attributes, args.images, args.top, device,
                                                 args.batch_size, thresholds):
            line = f"{path}: " + ", ".join(f"{name} ({p:.3f})" for name, p in top)
            if above is not None:
                line += " | above thresholds: " + (", ".join(f"{n} ({p:.3f})" for n, p in above) or "none")
            print(line, flush=True)
            emit({"path": path, "top": [[n, p] for n, p in top],
                  **({"predicted": [[n, p] for n, p in above]} if above is not None else {})})

if __name__ == "__main__":
    sys.exit(main())
