"""Pack COCO-format images + captions into attrdist shards (caption-derived attribute labels).

    python shards/coco.py --out /data/coconut-shards --vocab recipes/coconut_vocab.json \
        --split train /data/coco/val2017 /data/coco/annotations/captions_val2017.json \
        --split val   /data/coco/val2017 /data/coco/annotations/captions_val2017_holdout.json

Each --split is NAME IMAGE_DIR CAPTIONS_JSON [INSTANCES_JSON]; an instances JSON whose images and
annotations carry `attributes` lists adds a `true_labels` field (the demo's ground truth).
The pack is written to a staging directory and moved into place only when complete.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attrdist.coco import SplitSource, pack_coco_captions  # noqa: E402
from attrdist.errors import AttrdistError, user_errors  # noqa: E402
from attrdist.vocab import load_vocabulary  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output shard directory (replaced atomically)")
    ap.add_argument("--vocab", required=True, type=Path, help="attribute vocabulary JSON (attribute -> keywords)")
    ap.add_argument("--split", nargs="+", action="append", required=True,
                    metavar="NAME IMAGES CAPTIONS [INSTANCES]", help="one split; repeat for each")
    ap.add_argument("--dataset", default="coco-captions", help="dataset name recorded in the manifest")
    ap.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    ap.add_argument("--limit", type=int, default=0, help="pack only the first N images of each split")
    args = ap.parse_args(argv)
    with user_errors():
        splits = []
        for s in args.split:
            if len(s) not in (3, 4):
                raise AttrdistError(f"--split {' '.join(s)}: expected NAME IMAGE_DIR CAPTIONS_JSON [INSTANCES_JSON]")
            splits.append(SplitSource(s[0], Path(s[1]), Path(s[2]), Path(s[3]) if len(s) == 4 else None))
        vocab = load_vocabulary(args.vocab)
        m = pack_coco_captions(args.out, splits, vocab, dataset=args.dataset, max_samples=args.max_samples,
                               limit=args.limit, vocab_path=args.vocab)
        for name, rep in m["report"].items():
            print(f"{name}: packed {rep['packed']}, dropped {rep['dropped']}, "
                  f"{rep['images_without_caption_hit']} images with no caption hit (no positive labels)")
        print(f"wrote {args.out}/manifest.json")


if __name__ == "__main__":
    main()
