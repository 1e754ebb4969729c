"""Pack an image-folder dataset (root/<class>/*.jpg|png...) into attrdist shards, split by group.

    python shards/imagefolder.py --root /data/exp5 --out /data/exp5-shards --val 0.2 --test 0.0 \
        --group-by prefix --group-sep _ --group-parts 2 --seed 0
    python shards/imagefolder.py --root /data/exp5 --out ... --group-by csv --groups groups.csv
    python shards/imagefolder.py --root /data/exp5 --out ... --split-dirs     # root/<split>/<class>/...

The split is seeded, keeps each group in one split and is stratified by class as far as groups
allow. Identical or near-identical images across splits (e.g. augmented copies without group
ids) fail the pack unless --on-leak warn|drop. Corrupt/unreadable files are counted, not fatal.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attrdist.errors import user_errors  # noqa: E402
from attrdist.pack.imagefolder import pack_imagefolder  # noqa: E402
from attrdist.pack.inspect import finish_lines  # noqa: E402
from attrdist.pack.pipeline import INTERRUPTED, add_pack_args, packer_help  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(**packer_help(__doc__))
    ap.add_argument("--root", required=True, type=Path, help="root/<class>/<images> (or root/<split>/<class>/...)")
    ap.add_argument("--out", required=True, type=Path, help="output pack folder, published whole once complete (see --overwrite)")
    # the split options default to None so that giving one with --split-dirs (where none applies) can be refused
    ap.add_argument("--val", type=float, help="fraction of images for val (default 0.2)")
    ap.add_argument("--test", type=float, help="fraction of images for test (default 0.0)")
    ap.add_argument("--seed", type=int, help="split seed (default 0)")
    ap.add_argument("--split-dirs", action="store_true",
                    help="use the official splits root/<split>/<class>/... (then no split or group option applies)")
    ap.add_argument("--group-by", choices=("prefix", "csv", "none"),
                    help="group ids: file-stem prefix (default), a CSV (path,group), or none (each file alone)")
    ap.add_argument("--group-sep", help="prefix: separator in the file stem (default _)")
    ap.add_argument("--group-parts", type=int,
                    help="prefix: number of separated parts forming the group (default 2)")
    ap.add_argument("--groups", type=Path, help="csv: file with columns path,group (paths relative to --root)")
    ap.add_argument("--max-side", type=int, default=0, help="shrink images so the longer side is at most N pixels")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    add_pack_args(ap)
    ap.add_argument("--dataset", default="imagefolder", help="dataset name recorded in the manifest")
    args = ap.parse_args(argv)
    with user_errors(interrupted=INTERRUPTED):
        m = pack_imagefolder(args.root, args.out, val=args.val, test=args.test, seed=args.seed,
                             split_dirs=args.split_dirs, group_by=args.group_by, group_sep=args.group_sep,
                             group_parts=args.group_parts, groups_csv=args.groups, max_side=args.max_side,
                             quality=args.quality, workers=args.workers, on_leak=args.on_leak, dataset=args.dataset,
                             max_samples=args.max_samples, overwrite=args.overwrite, progress=not args.quiet,
                             max_dropped=args.max_dropped)
        print(f"{len(m['attributes'])} classes; skipped files {m['report']['scan']['skipped_files']}")
        for name in m["options"]["splits"]:
            rep = m["report"][name]
            groups = f" in {rep['groups']} groups" if "groups" in rep else ""  # --split-dirs: the folders split
            print(f"{name}: packed {rep['packed']} of {rep['files']} files{groups}; dropped {rep['dropped']}")
        for line in finish_lines(m, args.out):
            print(line)


if __name__ == "__main__":
    main()
