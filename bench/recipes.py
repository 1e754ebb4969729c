"""Every recipe's demo profile, run the way a user runs it, timed; the README's recipe table.

    .venv/bin/python -m bench.recipes                       # all five, one after the other
    .venv/bin/python -m bench.recipes cocottributes         # one

Each recipe runs as `python recipes/<name>.py run.out_dir=<tmp>` (demo data generated and packed
into ATTRDIST_CACHE first, outside the timing, by a throw-away warm-up that stops after 1 step).
Measured: wall time of the whole command (model build, training, evaluations, report) and the
headline metric of report.json beside its trivial baseline. Writes bench/results/recipes.csv and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import save

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["coconut", "coco_attributes", "cocottributes", "characters", "dior_remoteclip"]


def headline(rep: dict) -> tuple[str, float, str, float]:
    """(metric name, value, baseline name, baseline value) from a report.json."""
    val = rep["results"]["val"]["details"]
    if rep["task"] == "detection":
        return "val mAP@50", val["mAP50"], "shuffled labels", val["baseline"]["mAP50"]
    field = rep["config"]["data"]["eval_labels"][0]
    d = val[field]
    if rep["task"] == "multiclass":
        return f"val accuracy ({field})", d["accuracy"], "majority", d["baselines"]["majority"]["accuracy"]
    return f"val mAP ({field})", d["mAP"], "prior", d["baselines"]["prior"]["mAP"]


def run(name: str, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "recipes" / f"{name}.py"), f"run.out_dir={out}"]
    subprocess.run(cmd + ["run.max_steps=1", f"run.out_dir={out / 'warmup'}"], cwd=ROOT, check=True,
                   capture_output=True)  # generates and packs the demo data once
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    rep = json.loads(next(out.glob(f"{name}*/report.json")).read_text())
    metric, value, base_name, base = headline(rep)
    row = {"recipe": name, "wall_s": round(wall, 1), "metric": metric, "value": round(value, 4),
           "baseline": base_name, "baseline_value": round(base, 4)}
    if rep["task"] == "detection":
        d = rep["results"]["val"]["details"]
        row.update(base_mAP50=round(d["base"]["mAP50"], 4), novel_mAP50=round(d["novel"]["mAP50"], 4),
                   novel_baseline=round(d["baseline"]["novel"]["mAP50"], 4))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="*", default=RECIPES, help=f"any of {', '.join(RECIPES)} (default: all)")
    args = ap.parse_args(argv)
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            rows.append(run(name, Path(tmp) / name))
            print(rows[-1], flush=True)
    print("\n| recipe | demo wall time | demo metric | trivial baseline |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        extra = (f"; base {r['base_mAP50']:.3f}, novel {r['novel_mAP50']:.3f} (baseline {r['novel_baseline']:.3f})"
                 if "novel_mAP50" in r else "")
        print(f"| {r['recipe']} | {r['wall_s']:.0f} s | {r['metric']} {r['value']:.3f}{extra} | "
              f"{r['baseline']} {r['baseline_value']:.3f} |")
    return save("recipes" if args.recipes == RECIPES else "recipes-" + "-".join(args.recipes), rows, quick=False)


if __name__ == "__main__":
    main()
