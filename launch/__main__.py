"""python -m launch local recipes/coconut.py --nproc 2 [--deepspeed zero1|zero2|zero3] [--dry-run] [key=value ...]"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import local  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch", description=__doc__)
    sub = ap.add_subparsers(dest="where", required=True)
    lo = sub.add_parser("local", help="N processes on this machine (CUDA GPUs, else CPU ranks with gloo)")
    lo.add_argument("script")
    lo.add_argument("--nproc", type=int, default=1)
    lo.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    lo.add_argument("--deepspeed", choices=("zero1", "zero2", "zero3"), default="",
                    help="DeepSpeed ZeRO stage (sets run.deepspeed; started with torchrun)")
    lo.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    # everything after the script that is not a launcher option goes to the recipe (key=value, --resume, ...)
    args, recipe_args = ap.parse_known_args(argv)
    return local.run(args.script, args.nproc, recipe_args, dry_run=args.dry_run, device=args.device,
                     deepspeed=args.deepspeed)


if __name__ == "__main__":
    sys.exit(main())
