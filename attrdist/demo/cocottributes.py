"""The demo of the `cocottributes` recipe: a COCO Attributes pickle for the demo's objects.

The real `cocottributes_eccv_version.pkl` holds, per object patch, the fraction of annotators
who said "yes" to each of 204 attributes. This writes the same structure for the objects of the
built-in demo dataset (attrdist.demo.scenes), whose true object attributes are known (shape, colour,
size, texture: 14 attributes), so the `cocottributes` recipe runs the real packer
(attrdist.pack.cocottributes) on real-format input:

    ann_vecs            patch_id -> float64 votes [14]: 3 simulated annotators, each right with
                        probability 0.9 (so a few labels are wrong after the >= 0.5 threshold);
                        about 8 % of entries are NaN (not asked: "ignore" in loss and metrics)
    patch_id_to_ann_id  patch_id -> the object's annotation id in instances_<split>.json
    split               'train2014' for demo train objects, 'val2014' for demo val objects
    attributes          [{"id", "name"}], ids 1..14 in vector order

Deterministic: a pure function of (seed, annotation id).

    python -m attrdist.demo.cocottributes --demo-root ~/.cache/attrdist/demo/<hash> --out votes.pkl
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from attrdist import atomic
from attrdist.demo.scenes import COLOURS, SHAPES, SIZES, TEXTURES

OBJECT_ATTRIBUTES: tuple[str, ...] = SHAPES + COLOURS + SIZES + TEXTURES
ANNOTATORS = 3
P_CORRECT = 0.9
P_UNASKED = 0.08
SPLIT_NAMES = {"train": "train2014", "val": "val2014"}


def simulated_votes(true: set[str], seed: int, ann_id: int) -> np.ndarray:
    """Fraction of ANNOTATORS saying yes per attribute; NaN where the attribute was not asked."""
    g = np.random.default_rng([seed, ann_id])
    truth = np.array([a in true for a in OBJECT_ATTRIBUTES])
    correct = g.random((ANNOTATORS, truth.size)) < P_CORRECT
    yes = np.where(correct, truth, ~truth).mean(0)
    yes[g.random(truth.size) < P_UNASKED] = np.nan
    return yes.astype(np.float64)


def build_pickle(demo_root: Path, seed: int = 0) -> dict:
    ann_vecs, to_ann, split = {}, {}, {}
    patch = 0
    for s, name in SPLIT_NAMES.items():
        inst = json.loads((demo_root / "annotations" / f"instances_{s}.json").read_text())
        for a in inst["annotations"]:
            patch += 1
            ann_vecs[patch] = simulated_votes(set(a["attributes"]), seed, a["id"])
            to_ann[patch], split[patch] = a["id"], name
    return {"ann_vecs": ann_vecs, "patch_id_to_ann_id": to_ann, "split": split,
            "attributes": [{"id": i + 1, "name": n} for i, n in enumerate(OBJECT_ATTRIBUTES)]}


def write_pickle(demo_root: Path, out: Path, seed: int = 0) -> Path:
    atomic.write_bytes(out, pickle.dumps(build_pickle(demo_root, seed), protocol=2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-root", type=Path, required=True, help="a generated demo dataset (attrdist.demo.scenes)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_pickle(args.demo_root, args.out, args.seed))


if __name__ == "__main__":
    main()
