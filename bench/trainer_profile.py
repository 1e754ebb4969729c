"""What the trainer does per step beyond a bare loop, profiled (context for item 2 of bench/train_step.py).

    .venv/bin/python -m bench.trainer_profile            # ~1 min on 2 cores
    .venv/bin/python -m bench.trainer_profile --quick    # smoke run: 10 steps

The coconut demo model through the real `Trainer.train()` on in-memory batches, exactly as bench/train_step.py's
overhead item runs it (run.malloc=keep), under cProfile for 60 steps after a warm-up run. Reported: ms per
step of the whole loop and of the trainer's own bookkeeping (the metrics record, `.item()` reads, the
NaN/Inf check, the BatchNorm buffer copy, seeding the dropout generator). cProfile inflates small calls, so
these are upper bounds. Also timed without the profiler: `seed_rng` against `torch.manual_seed` (10,000
calls each). Writes bench/results/trainer_profile.csv.
"""

from __future__ import annotations

import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from bench.common import parser, save

# (label, file suffix, function name) as cProfile names them
PARTS = [
    ("whole train() loop", "attrdist/train/trainer.py", "train"),
    ("metrics record (Tracker.log)", "attrdist/train/tracking.py", "log"),
    ("tensor .item() reads", "~", "<method 'item' of 'torch._C.TensorBase' objects>"),
    ("NaN/Inf check (step_is_finite)", "attrdist/train/trainer.py", "step_is_finite"),
    ("BatchNorm buffer copy (_copy)", "attrdist/train/trainer.py", "_copy"),
    ("dropout seed (seed_rng)", "attrdist/train/trainer.py", "seed_rng"),
]


def main(argv=None) -> list[dict]:
    ap = parser(__doc__, rounds=None)
    args = ap.parse_args(argv)
    import torch

    import bench.train_step as ts
    from attrdist.malloc import tune_malloc
    from attrdist.train.trainer import seed_rng

    tune_malloc("keep")
    steps = 10 if args.quick else 60
    rows = []
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-trainer-profile-") as tmp:
        tmp = Path(tmp)
        cfg = ts.coconut_demo(ts.make_shards(tmp), "cpu")
        batches, _ = ts.standalone_batches(cfg)
        ts.attrdist_inprocess(cfg, batches, 3, 10, tmp, "warm", {})
        prof = cProfile.Profile()
        prof.enable()
        ts.attrdist_inprocess(cfg, batches, 3, steps, tmp, "profiled", {})
        prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    n = steps + 3
    for label, suffix, name in PARTS:
        cum = sum(v[3] for (f, _, fn), v in stats.items() if fn == name and f.endswith(suffix))
        rows.append({"benchmark": "trainer_profile", "what": label, "ms_per_step": round(1000 * cum / n, 3),
                     "steps": n})
    whole = rows[0]["ms_per_step"]
    for r in rows:
        r["share_of_step"] = round(r["ms_per_step"] / whole, 4)
    cpu = torch.device("cpu")
    for label, fn in (("seed_rng, per call", lambda i: seed_rng(i, cpu)),
                      ("torch.manual_seed, per call", lambda i: torch.manual_seed(i))):
        t0 = time.perf_counter()
        for i in range(10_000):
            fn(i)
        rows.append({"benchmark": "trainer_profile", "what": label,
                     "ms_per_call": round((time.perf_counter() - t0) / 10_000 * 1000, 4)})
    print("\n| what | ms per step (cProfile) | share of the step |\n| --- | ---: | ---: |")
    for r in rows:
        if "ms_per_step" in r:
            print(f"| {r['what']} | {r['ms_per_step']:.3f} | {100 * r['share_of_step']:.1f} % |")
    for r in rows:
        if "ms_per_call" in r:
            print(f"{r['what']}: {r['ms_per_call']:.4f} ms (no profiler)")
    return save("trainer_profile", rows, quick=args.quick)


if __name__ == "__main__":
    main()
