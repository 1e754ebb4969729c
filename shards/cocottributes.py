"""Pack COCO Attributes (204 attributes per COCO object, ECCV 2016) as object crops into attrdist shards.

    python shards/cocottributes.py --out /data/cocottributes-shards \
        --pkl /data/cocottributes/cocottributes_eccv_version.pkl \
        --instances /data/coco/annotations/instances_train2017.json /data/coco/annotations/instances_val2017.json \
        --images /data/coco/train2017 /data/coco/val2017

Objects are found through their COCO annotation id in any of the --instances JSONs (2014 or
2017: ids are the same, images moved between splits) and their image under any of the --images
directories. Output split = the pickle's split (train2014 -> train, val2014 -> val). Votes >=
--threshold are positives; NaN/negative votes are unlabelled (labels_ignore). Every object that
is not packed is counted by reason (no_annotation_id, image_missing, box_too_small, crowd,
corrupt_image, ...) in the manifest and in the summary line "matched X of Y objects". The pickle
is read with a restricted unpickler (builtin containers + numpy arrays only).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attrdist.pack.cocottributes import pack_cocottributes, summary_line  # noqa: E402
from attrdist.pack.inspect import finish_lines  # noqa: E402
from attrdist.pack.pipeline import INTERRUPTED, add_pack_args, packer_help  # noqa: E402
from attrdist.errors import user_errors  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(**packer_help(__doc__))
    ap.add_argument("--out", required=True, type=Path, help="output pack folder, published whole once complete (see --overwrite)")
    ap.add_argument("--pkl", required=True, type=Path, help="cocottributes_eccv_version.pkl")
    ap.add_argument("--instances", required=True, nargs="+", type=Path, help="COCO instances JSON(s), 2014 and/or 2017")
    ap.add_argument("--images", required=True, nargs="+", type=Path, help="COCO image directories")
    ap.add_argument("--threshold", type=float, default=0.5, help="vote >= threshold -> positive (default: %(default)s)")
    ap.add_argument("--margin", type=float, default=0.1, help="context added on each side, x box size (default: %(default)s)")
    ap.add_argument("--min-size", type=float, default=16, help="smaller boxes (px) are counted box_too_small (default: %(default)s)")
    ap.add_argument("--max-side", type=int, default=0, help="downscale crops so the longer side is <= N (0: no)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the crops (default: %(default)s)")
    ap.add_argument("--dataset", default="cocottributes", help="dataset name recorded in the manifest (default: %(default)s)")
    add_pack_args(ap)
    ap.add_argument("--limit", type=int, default=0, help="pack only the first N patches (by patch id; 0: all)")
    args = ap.parse_args(argv)
    with user_errors(interrupted=INTERRUPTED):
        m = pack_cocottributes(args.out, args.pkl, args.instances, args.images, dataset=args.dataset,
                               threshold=args.threshold, margin=args.margin, min_size=args.min_size,
                               max_side=args.max_side, quality=args.quality, max_samples=args.max_samples,
                               limit=args.limit, workers=args.workers, on_leak=args.on_leak,
                               progress=not args.quiet, overwrite=args.overwrite, max_dropped=args.max_dropped)
        for split in ("train", "val"):
            rep = m["report"][split]
            drops = ", ".join(f"{k} {v}" for k, v in rep["dropped"].items() if v) or "none"
            print(f"{split}: matched {rep['packed']} of {rep['objects']} objects; not matched: {drops}")
        print(summary_line(m))
        leak = m["report"].get("leakage") or {}
        print(f"leakage across splits: {leak.get('exact', 0)} exact, {leak.get('near', 0)} near duplicates "
              f"(--on-leak {args.on_leak}; details under report.leakage in the manifest)")
        for line in finish_lines(m, args.out):
            print(line)


if __name__ == "__main__":
    main()
