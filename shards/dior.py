"""Pack DIOR (official layout) into attrdist shards with boxes + a COCO instances JSON per split.

    python shards/dior.py --root /data/DIOR --out /data/dior-shards [--splits train val test] \
        [--boxes horizontal|oriented] [--max-side 800] [--workers N] [--on-leak error|warn|drop]

--root holds JPEGImages-trainval/, JPEGImages-test/, Annotations/{Horizontal,Oriented} Bounding
Boxes/ and ImageSets/Main/{train,val,test}.txt. Each split becomes <out>/<split>-*.tar plus
<out>/coco_<split>.json (boxes in pixels of the stored images, categories 1..20), all published
atomically with the manifest. Images listed without their image file are counted, not fatal.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attrdist.pack.dior import VARIANTS, pack_dior  # noqa: E402
from attrdist.errors import AttrdistError, user_errors  # noqa: E402
from attrdist.pack.inspect import finish_lines  # noqa: E402
from attrdist.pack.pipeline import INTERRUPTED, add_pack_args, packer_help  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(**packer_help(__doc__))
    ap.add_argument("--root", required=True, type=Path, help="DIOR root directory (official layout)")
    ap.add_argument("--out", required=True, type=Path, help="output pack folder, published whole once complete (see --overwrite)")
    ap.add_argument("--splits", nargs="+", default=None, help="official splits to pack (default: every "
                    "ImageSets/Main/{train,val,test}.txt present)")
    ap.add_argument("--boxes", choices=sorted(VARIANTS), default="horizontal",
                    help="annotation variant to read (oriented boxes become their axis-aligned hull; "
                         "default: %(default)s)")
    ap.add_argument("--max-side", type=int, default=0, help="shrink images so the longer side is at most N "
                    "pixels (boxes scaled); 0 = store original bytes")
    ap.add_argument("--quality", type=int, default=None, help="JPEG quality of images shrunk by --max-side "
                    "(default: 90)")
    add_pack_args(ap)
    ap.add_argument("--dataset", default="dior", help="dataset name recorded in the manifest (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=0, help="pack only the first N ids of each split (0: all)")
    args = ap.parse_args(argv)
    with user_errors(interrupted=INTERRUPTED):
        if args.quality is not None and not args.max_side:
            raise AttrdistError("--quality: images are stored as they are unless --max-side shrinks them; add "
                                "--max-side N or leave --quality out")
        m = pack_dior(args.root, args.out, splits=args.splits, boxes=args.boxes, max_side=args.max_side,
                      quality=args.quality or 90, workers=args.workers, on_leak=args.on_leak, dataset=args.dataset,
                      max_samples=args.max_samples, limit=args.limit, overwrite=args.overwrite,
                      progress=not args.quiet, max_dropped=args.max_dropped)
        for name in m["options"]["splits"]:
            rep = m["report"][name]
            print(f"{name}: packed {rep['packed']} of {rep['listed']} listed, {rep['boxes']} boxes; "
                  f"dropped images {rep['dropped']}; dropped boxes {rep['boxes_dropped']}, "
                  f"clipped {rep['boxes_clipped']}")
        for name in m["options"].get("empty_split_files_left_out", []):
            print(f"{name}: left out, ImageSets/Main/{name}.txt lists no id")
        for name, f in m["options"]["coco_instances"].items():
            print(f"wrote {args.out / f}")
        for line in finish_lines(m, args.out):
            print(line)


if __name__ == "__main__":
    main()
