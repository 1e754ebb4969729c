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
from attrdist.errors import user_errors  # noqa: E402
from attrdist.pack.pipeline import add_pack_args  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, type=Path, help="DIOR root directory (official layout)")
    ap.add_argument("--out", required=True, type=Path, help="output shard directory (replaced atomically)")
    ap.add_argument("--splits", nargs="+", default=None, help="official splits to pack (default: every "
                    "ImageSets/Main/{train,val,test}.txt present)")
    ap.add_argument("--boxes", choices=sorted(VARIANTS), default="horizontal",
                    help="annotation variant to read (oriented boxes become their axis-aligned hull)")
    ap.add_argument("--max-side", type=int, default=0, help="shrink images so the longer side is at most N "
                    "pixels (boxes scaled); 0 = store original bytes")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding (--max-side)")
    add_pack_args(ap)
    ap.add_argument("--dataset", default="dior", help="dataset name recorded in the manifest")
    ap.add_argument("--limit", type=int, default=0, help="pack only the first N ids of each split")
    args = ap.parse_args(argv)
    with user_errors():
        m = pack_dior(args.root, args.out, splits=args.splits, boxes=args.boxes, max_side=args.max_side,
                      quality=args.quality, workers=args.workers, on_leak=args.on_leak, dataset=args.dataset,
                      max_samples=args.max_samples, limit=args.limit, overwrite=args.overwrite,
                      progress=not args.quiet)
        for name in m["options"]["splits"]:
            rep = m["report"][name]
            print(f"{name}: packed {rep['packed']} of {rep['listed']} listed, {rep['boxes']} boxes; "
                  f"dropped images {rep['dropped']}; dropped boxes {rep['boxes_dropped']}, "
                  f"clipped {rep['boxes_clipped']}")
        for name, f in m["options"]["coco_instances"].items():
            print(f"wrote {args.out / f}")
        print(f"wrote {args.out}/manifest.json")


if __name__ == "__main__":
    main()
