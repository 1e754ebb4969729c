"""fp32 vs bf16 training steps on this CPU, per model, and what run.precision=auto's probe picks (issue 20).

    .venv/bin/python -m bench.precision              # ~4 min on 2 cores
    .venv/bin/python -m bench.precision --quick      # smoke run: 1 round, 1 + 3 steps

Why auto measures (attrdist/train/precision.py): a CPU with AVX512_BF16 runs some models faster in bf16 and
others slower. For ResNet-18 and EfficientNet-B0 (timm, + attrdist's classifier head; batch 32 @ 64 px,
channels_last, the coconut demo data and loss, 2 threads, run.malloc=keep), the bare training loop of
bench/train_step.py (forward, loss, backward, clip, fused AdamW step) in fp32 and under bf16 autocast,
alternated fp32/bf16 per round in one process; figure = median over rounds of each run's per-step median
img/s, and the per-round ratio bf16/fp32 (median, min-max). Then the real Trainer with run.precision=auto and a
fresh ATTRDIST_CACHE: which precision its probe picked, its probe's own medians and how long it took.
Targets: the probe picks the precision that the full-step measurement finds faster (for both models), and
a probe takes <= 30 s. Writes bench/results/precision.csv.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.common import parser, save, target_row


def model_cfg(shards: Path, backbone: str):
    import bench.train_step as ts

    cfg = ts.load_recipe("coconut").demo()
    cfg = replace(cfg, model=replace(cfg.model, name="classifier", backbone=backbone, frozen_stages=0, head_dims=()))
    return ts.with_data(cfg, shards, "cpu")


def main(argv=None) -> list[dict]:
    ap = parser(__doc__, rounds=5)
    args = ap.parse_args(argv)
    import bench.train_step as ts
    from attrdist.malloc import tune_malloc
    from attrdist.train.runtime import available_cores

    tune_malloc("keep")
    warmup, steps = (1, 3) if args.quick else (3, 20)
    rounds = 1 if args.quick else args.rounds
    rows, targets = [], []
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-precision-") as tmp:
        tmp = Path(tmp)
        shards = ts.make_shards(tmp)
        for label, backbone in (("ResNet-18@64", "resnet18"), ("EfficientNet-B0@64", "efficientnet_b0")):
            cfg = model_cfg(shards, backbone)
            batches, names = ts.standalone_batches(cfg)
            threads = cfg.run.threads or available_cores()
            info = {"no": {}, "bf16": {}}
            order = ["no", "bf16"]
            for r in range(rounds):
                for p in (order if r % 2 == 0 else order[::-1]):
                    ts.bare_loop(cfg, batches, names, warmup, steps, precision=p, threads=threads, info=info[p])
            f32, b16 = info["no"]["step_img_s"], info["bf16"]["step_img_s"]
            ratios = [b / f for f, b in zip(f32, b16)]
            faster = "bf16" if statistics.median(ratios) > 1 else "no"
            # the real Trainer's probe, from an empty cache
            os.environ["ATTRDIST_CACHE"] = str(tmp / f"cache-{backbone}")
            ia = {}
            ts.attrdist_inprocess(replace(cfg, run=replace(cfg.run, precision="auto")), batches, 1, 1, tmp,
                                  f"probe-{backbone}", ia)
            rec = json.loads(next((tmp / f"cache-{backbone}" / "precision").glob("*.json")).read_text())
            picked = rec["choice"]
            pf, pb = statistics.median(rec["fp32_ms"]), statistics.median(rec["bf16_ms"])
            common = {"benchmark": "precision", "model": label, "batch": cfg.data.batch_size, "threads": threads,
                      "image_size": cfg.data.image_size, "channels_last": cfg.model.channels_last, "rounds": rounds,
                      "timed_steps": steps}
            for p, v in (("fp32", f32), ("bf16", b16)):
                rows.append({**common, "what": f"{label} {p}: full train step img/s (per-step median per round)",
                             "median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)})
            rows.append({**common, "what": f"{label}: auto's probe", "picked": picked, "probe_fp32_ms": pf,
                         "probe_bf16_ms": pb, "probe_s": rec["probe_s"], "trainer_precision": ia.get("precision")})
            print(f"{label}: fp32 {statistics.median(f32):.1f} img/s, bf16 {statistics.median(b16):.1f} img/s, "
                  f"bf16/fp32 {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}); probe picked "
                  f"{picked} (fwd+bwd fp32 {pf:.1f} ms, bf16 {pb:.1f} ms, {rec['probe_s']:.1f} s)")
            targets.append(target_row("precision", f"{label}: auto picks the faster precision (1 = yes)",
                                      float(picked == faster), float(picked == faster), float(picked == faster), ">=", 1,
                                      unit="", note=f"full step bf16/fp32 img/s {statistics.median(ratios):.3f}x ({min(ratios):.3f}-"
                                           f"{max(ratios):.3f}); probe's fwd+bwd time bf16/fp32 {pb / pf:.2f}"))
            targets.append(target_row("precision", f"{label}: probe duration", rec["probe_s"], rec["probe_s"],
                                      rec["probe_s"], "<=", 30, unit=" s",
                                      note=f"{len(rec['fp32_ms'])}+{len(rec['bf16_ms'])} timed steps + 2 warm-up"))
        os.environ.pop("ATTRDIST_CACHE", None)
    return save("precision", rows, targets, quick=args.quick)


if __name__ == "__main__":
    main()
