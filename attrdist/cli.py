"""The `attrdist` command (installed by `pip install -e .`). Imports are lazy: --help is fast.

    attrdist predict CHECKPOINT IMAGE [IMAGE ...] [--top K]   top attributes with probabilities
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
    sub.add_parser("version", help="print the version")
    args = ap.parse_args(argv)

    from attrdist.errors import user_errors

    with user_errors():
        if args.cmd == "version":
            from attrdist import __version__

            print(__version__)
        elif args.cmd == "predict":
            from attrdist.predict import load_for_inference, predict_images

            model, cfg, attributes, ckpt = load_for_inference(args.checkpoint)
            print(f"# checkpoint {ckpt} ({len(attributes)} attributes)")
            for path, top in zip(args.images, predict_images(model, cfg, attributes, args.images, args.top)):
                print(f"{path}: " + ", ".join(f"{name} ({p:.3f})" for name, p in top))


if __name__ == "__main__":
    sys.exit(main())
