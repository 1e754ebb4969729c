"""Where 2-process DDP on 2 CPU cores loses against 1 process with 2 threads (context for item 4 of bench/train_step.py).

    .venv/bin/python -m bench.ddp            # ~1 min on 2 cores
    .venv/bin/python -m bench.ddp --quick    # smoke run: 1 round, 4 steps

A bare PyTorch loop: torchvision ResNet-18@64, global batch 32, bf16 autocast, channels_last, fused AdamW,
run.malloc=keep (as attrdist's processes), random data held in memory, 3 warm-up + 20 timed steps per
variant, 3 rounds, medians:
  single    1 process x 2 threads, batch 32
  ddp       2 gloo ranks x 1 thread, 16 each, torch's DistributedDataParallel (buckets all-reduced during
            the backward), gloo's all-reduce: attrdist with run.shm_allreduce=off
  ddp_shm   the same with attrdist's shared-memory all-reduce (attrdist/train/shm_allreduce.py, run.shm_allreduce=auto,
            the default for CPU ranks on one host): DeepSpeed's shm kernel as DDP's comm hook, gradients as
            bucket views
  no_comm   the same 2 ranks with every step under `no_sync()`: no gradient traffic at all. This is the
            ceiling of any DDP here: the compute alone, split over 2 single-threaded ranks
  allreduce the same 2 ranks without DDP, all gradients flattened (one copy) and, after a barrier, all-reduced
            in one call after the backward: the time of gloo's all-reduce on its own (not overlapped, no wait)
  allreduce_shm  the same with the shm kernel
Per variant and rank 0: img/s and the mean ms per step in forward+backward (with DDP that includes the
overlapped all-reduce and the wait for the other rank), the flattening copy + barrier (the wait for the
slower rank), the explicit all-reduce, and the optimizer step. Writes bench/results/ddp.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import parser, save

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("ddp", "ddp_shm", "no_comm", "allreduce", "allreduce_shm")


def worker(rounds: int, steps: int) -> None:
    import torch
    import torch.distributed as dist
    import torchvision

    from attrdist.malloc import tune_malloc

    tune_malloc("keep")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(2 // world)
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    if world > 1:
        from attrdist.train import shm_allreduce

        assert shm_allreduce.setup("on", device="cpu", deepspeed="", timeout_s=600)[0] == "shm"
    batch = 32 // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, 64, 64, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.rand(batch, 80, generator=g)
    out: dict[str, list] = {}
    for _ in range(rounds):
        for kind in (VARIANTS if world > 1 else ("single",)):
            torch.manual_seed(0)
            model = torchvision.models.resnet18(num_classes=80).to(memory_format=torch.channels_last)
            if kind in ("ddp", "no_comm"):
                model = torch.nn.parallel.DistributedDataParallel(model)
            if kind == "ddp_shm":
                model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
                shm_allreduce.register(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
            parts = [0.0, 0.0, 0.0, 0.0]
            for i in range(3 + steps):
                if i == 3:
                    if world > 1:
                        dist.barrier()
                    t_start, parts = time.perf_counter(), [0.0, 0.0, 0.0, 0.0]
                t0 = time.perf_counter()
                with model.no_sync() if kind == "no_comm" else contextlib.nullcontext():
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
                    loss.backward()
                t1 = time.perf_counter()
                if kind.startswith("allreduce"):
                    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                    dist.barrier()  # both ranks arrive: what follows is the reduction alone, no waiting
                t15 = time.perf_counter()
                if kind == "allreduce":
                    dist.all_reduce(flat)
                elif kind == "allreduce_shm":
                    torch.ops.deepspeed.inference_all_reduce_(flat)
                t2 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                parts = [parts[0] + t1 - t0, parts[1] + t15 - t1, parts[2] + t2 - t15, parts[3] + t3 - t2]
            if world > 1:
                dist.barrier()
            seconds = time.perf_counter() - t_start
            out.setdefault(kind, []).append({"img_s": 32 * steps / seconds, "fwd_bwd_ms": 1000 * parts[0] / steps,
                                             "flatten_wait_ms": 1000 * parts[1] / steps,
                                             "allreduce_ms": 1000 * parts[2] / steps, "opt_ms": 1000 * parts[3] / steps})
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    if world > 1:
        dist.destroy_process_group()


def launch(nproc: int, rounds: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "bench.ddp", "--worker", str(rounds), str(steps)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "bench.ddp", "--worker", str(rounds), str(steps)]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}, capture_output=True,
                       text=True, timeout=900)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"bench.ddp with {nproc} process(es) failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> list[dict]:
    ap = parser(__doc__)
    ap.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return []
    rounds, steps = (1, 4) if args.quick else (args.rounds, 20)
    got = {**launch(1, rounds, steps), **launch(2, rounds, steps)}
    single = statistics.median(r["img_s"] for r in got["single"])
    rows = []
    for kind, recs in got.items():
        med = {k: statistics.median(r[k] for r in recs) for k in recs[0]}
        rows.append({"benchmark": "ddp", "what": kind, "img_s": round(med["img_s"], 1),
                     "vs_single": round(med["img_s"] / single, 3), "fwd_bwd_ms": round(med["fwd_bwd_ms"], 1),
                     "flatten_wait_ms": round(med["flatten_wait_ms"], 1),
                     "allreduce_ms": round(med["allreduce_ms"], 1), "opt_ms": round(med["opt_ms"], 1),
                     "spread_img_s": f"{min(r['img_s'] for r in recs):.1f}-{max(r['img_s'] for r in recs):.1f}",
                     "rounds": rounds})
    print("\n| variant | img/s (spread) | / single | fwd+bwd ms | flatten + barrier ms | explicit all-reduce ms | "
          "optimizer ms |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['what']} | {r['img_s']} ({r['spread_img_s']}) | {r['vs_single']}x | {r['fwd_bwd_ms']} | "
              f"{r['flatten_wait_ms']} | {r['allreduce_ms']} | {r['opt_ms']} |")
    return save("ddp", rows, quick=args.quick)


if __name__ == "__main__":
    main()
