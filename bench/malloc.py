"""run.malloc: a bare PyTorch training step with glibc's default malloc vs attrdist's `tune_malloc("keep")`.

    .venv/bin/python -m bench.malloc              # ~3 min on 2 cores
    .venv/bin/python -m bench.malloc --quick      # smoke run: 2 steps of ResNet-18@64, 1 round

Each run is a fresh process (malloc settings are per process and cannot be undone), alternating system and
keep, median of rounds: torchvision ResNet-18@64 and ResNet-50@224 (every stage trainable), batch 32, bf16
autocast, channels_last, fused AdamW, 2 threads, random data held in memory. Reported per step: images/s,
minor page faults and system CPU time (getrusage) over the timed steps after 3 warm-up steps. This is what
`run.malloc=keep` (the default) buys in the training process; in data workers see bench/input.py.
Writes bench/results/malloc.csv.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import parser, ratio_stats, save

ROOT = Path(__file__).resolve().parents[1]


def worker(model: str, size: int, steps: int, mode: str) -> None:
    import resource
    import time

    import torch
    import torchvision

    from attrdist.malloc import tune_malloc

    applied = tune_malloc(mode)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    m = getattr(torchvision.models, model)(num_classes=80).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    x = torch.randn(32, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.rand(32, 80)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"applied": applied, "seconds": t1 - t0, "img_s": 32 * steps / (t1 - t0),
                      "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
                      "sys_ms_per_step": 1000 * (r1.ru_stime - r0.ru_stime) / steps}))


def run(model: str, size: int, steps: int, mode: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "bench.malloc", "--worker", f"{model},{size},{steps},{mode}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise RuntimeError(f"bench.malloc worker {model}@{size} {mode} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    ap = parser(__doc__)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        model, size, steps, mode = args.worker.split(",")
        worker(model, int(size), int(steps), mode)
        return []
    cases = [("resnet18", 64, 2)] if args.quick else [("resnet18", 64, 30), ("resnet50", 224, 5)]
    rounds = 1 if args.quick else args.rounds
    rows = []
    for model, size, steps in cases:
        got = {"system": [], "keep": []}
        for _ in range(rounds):
            for mode in got:
                got[mode].append(run(model, size, steps, mode))
        m, lo, hi = ratio_stats([r["seconds"] for r in got["system"]], [r["seconds"] for r in got["keep"]])
        med = {mode: {k: statistics.median(r[k] for r in rs) for k in ("img_s", "faults_per_step", "sys_ms_per_step")}
               for mode, rs in got.items()}
        assert all(r["applied"] for r in got["keep"]), "tune_malloc did not apply (not glibc?)"
        rows.append({"benchmark": "malloc", "what": f"{model}@{size} bf16 channels_last batch 32, 2 threads",
                     "system_img_s": round(med["system"]["img_s"], 1), "keep_img_s": round(med["keep"]["img_s"], 1),
                     "keep_over_system": round(m, 3), "spread": f"{lo:.3f}-{hi:.3f}",
                     "system_faults_per_step": round(med["system"]["faults_per_step"]),
                     "keep_faults_per_step": round(med["keep"]["faults_per_step"]),
                     "system_sys_ms_per_step": round(med["system"]["sys_ms_per_step"], 1),
                     "keep_sys_ms_per_step": round(med["keep"]["sys_ms_per_step"], 1), "rounds": rounds})
    print("\n| model | system img/s | keep img/s | keep / system (spread) | page faults per step (system; keep) | "
          "system CPU ms per step (system; keep) |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['what']} | {r['system_img_s']} | {r['keep_img_s']} | {r['keep_over_system']}x ({r['spread']}) | "
              f"{r['system_faults_per_step']:,}; {r['keep_faults_per_step']:,} | {r['system_sys_ms_per_step']}; "
              f"{r['keep_sys_ms_per_step']} |")
    return save("malloc", rows, quick=args.quick)


if __name__ == "__main__":
    main()
