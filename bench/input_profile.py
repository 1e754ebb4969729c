"""Where a data worker's time goes, per image: the profile behind bench/input.py's (c) loader.

    .venv/bin/python -m bench.input_profile            # ~1.5 min on 2 cores
    .venv/bin/python -m bench.input_profile --quick    # smoke run: 200 images, 1 round

Data as bench/input.py's (c): N COCO-like 640x480 JPEGs packed with `shards/coco.py --mode image
--max-side 256`; SampleDataset as the trainer builds it on this CPU for recipes/coconut.py full() (224 px,
its augmentation, pixel-wise stage in the workers, bfloat16 images for its bf16 run). This process itself
keeps glibc's default malloc; the loaders' workers get `run.malloc` through make_loader.
  worker   1 worker, every sample timed inside it: wall ms per image in SampleDataset.__getitem__, minor
           page faults and system CPU ms per image (getrusage), with run.malloc=system and =keep
  in-process  the same __getitem__ calls in this process (1 thread, glibc default malloc), for comparison
  loader   2 workers, batches of 32, a fresh loader per pass: images/s when the batch is collated and
           shipped to this process (attrdist's collate) and when the worker ships a count only; each
           with run.malloc=system and =keep
  stages   bench/input.py's (b) work on the 640x480 sources, stage by stage, in this process (1 thread, 300
           images, run.malloc=keep): decode_image at (b)'s scale, train_geometry (resized crop, flip;
           parameters), photometric per sample (colour map + normalise + erase, as the workers run it for
           a CPU device), the cast to bfloat16. (decode + the rest) / decode is what (b) / (d0) would be
           with nothing else: no batching, no trip, no second process on the cores
Alternating over rounds, medians. Writes bench/results/input_profile.csv.
"""

from __future__ import annotations

import resource
import runpy
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from bench.common import parser, save

ROOT = Path(__file__).resolve().parents[1]


class Timed(Dataset):
    """Wraps a SampleDataset: each sample also carries this worker's running totals (images, seconds in
    __getitem__, minor faults, system seconds) since its first sample."""

    def __init__(self, ds):
        self.ds, self.start = ds, None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        if self.start is None:
            r = resource.getrusage(resource.RUSAGE_SELF)
            self.start, self.n, self.t = (r.ru_minflt, r.ru_stime), 0, 0.0
        t0 = time.perf_counter()
        x = self.ds[item]
        self.t += time.perf_counter() - t0
        self.n += 1
        r = resource.getrusage(resource.RUSAGE_SELF)
        x["totals"] = torch.tensor([self.n, self.t, r.ru_minflt - self.start[0], r.ru_stime - self.start[1]],
                                   dtype=torch.float64)
        return x


def last_totals(samples: list[dict]) -> dict:
    return {"totals": samples[-1]["totals"]}


def count(samples: list[dict]) -> int:
    return len(samples)


def main(argv=None) -> list[dict]:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds = 200, 1
    from attrdist.pack.coco import AnnSource, pack_coco_images
    from attrdist.core.order import BatchPlan
    from attrdist.data.loader import make_loader, tuned_workers
    from bench.input import shard_dataset
    from bench.pack import make_dataset

    cfg = runpy.run_path(str(ROOT / "recipes" / "coconut.py"), run_name="coconut_recipe")["full"]()
    data_cfg = replace(cfg.data, batch_size=32, num_workers=2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-input-profile-") as tmp:
        root = make_dataset(Path(tmp) / "data", args.n)
        small = Path(tmp) / "resized"
        pack_coco_images(small, [AnnSource("train", root / "images", root / "instances.json")], max_side=256,
                         workers=2, progress=False, on_leak="warn")
        ds = shard_dataset(small, data_cfg, cfg.run.seed, precision=cfg.run.precision)
        n_pass = (len(ds) // 32) * 32

        def worker_pass(malloc: str, epoch: int) -> dict:
            plan = BatchPlan(len(ds), 32, 1, 0, cfg.run.seed, epoch, shuffle=True, drop_last=True)
            loader = torch.utils.data.DataLoader(Timed(ds), batch_sampler=plan, num_workers=1, collate_fn=last_totals,
                                                 worker_init_fn=tuned_workers(malloc),
                                                 prefetch_factor=2)
            totals = [b["totals"] for b in loader][-1].tolist()
            n = totals[0]
            return {"ms_per_image": 1000 * totals[1] / n, "faults_per_image": totals[2] / n,
                    "sys_ms_per_image": 1000 * totals[3] / n}

        def in_process() -> dict:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in a worker
            t = Timed(ds)
            for i in range(min(len(ds), 600)):
                x = t[(i, 0)]
            torch.set_num_threads(threads)
            n, secs, faults, sys_s = x["totals"].tolist()
            return {"ms_per_image": 1000 * secs / n, "faults_per_image": faults / n, "sys_ms_per_image": 1000 * sys_s / n}

        def stages(n: int = 300) -> dict:
            import math

            from attrdist.core import rng as rnglib
            from attrdist.core.transforms import decode_image, photometric, train_geometry

            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in a worker
            aug, size = data_cfg.augment, data_cfg.image_size
            min_side = int(math.ceil(size / math.sqrt(aug.crop_scale[0])))  # as SampleDataset
            t = dict.fromkeys(("decode", "geometry", "photometric", "cast"), 0.0)
            files = sorted((root / "images").iterdir())[:n]
            for i, p in enumerate(files):
                data = p.read_bytes()
                t0 = time.perf_counter()
                img = decode_image(data, min_side)
                t1 = time.perf_counter()
                g = train_geometry(img, rnglib.fold(cfg.run.seed, rnglib.AUGMENT, 0, i), size, aug)
                t2 = time.perf_counter()
                x = photometric(g["image"][None], g["colour"][None], g["erase"][None])[0]
                t3 = time.perf_counter()
                x = x.to(ds.image_dtype)
                t4 = time.perf_counter()
                for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    t[k] += dt
            torch.set_num_threads(threads)
            return {k: 1000 * v / len(files) for k, v in t.items()}

        def loader_pass(malloc: str, ship: bool, epoch: int) -> float:
            plan = BatchPlan(len(ds), 32, 1, 0, cfg.run.seed, epoch, shuffle=True, drop_last=True)
            loader = make_loader(ds, plan, 2, malloc=malloc) if ship else torch.utils.data.DataLoader(
                ds, batch_sampler=plan, num_workers=2, collate_fn=count, worker_init_fn=tuned_workers(malloc),
                prefetch_factor=2)
            t0 = time.perf_counter()
            got = sum(len(b["index"]) if isinstance(b, dict) else b for b in loader)
            assert got == n_pass, (got, n_pass)
            return n_pass / (time.perf_counter() - t0)

        res: dict[str, list] = {}
        for r in range(args.rounds):
            for malloc in ("system", "keep"):
                res.setdefault(f"worker {malloc}", []).append(worker_pass(malloc, r))
            res.setdefault("in-process", []).append(in_process())
            res.setdefault("stages", []).append(stages())
            for malloc in ("system", "keep"):
                for ship in (True, False):
                    res.setdefault(f"loader {malloc} {'collate+ship' if ship else 'count only'}", []).append(
                        loader_pass(malloc, ship, r))
    st = res.pop("stages")
    st = {k: statistics.median(v[k] for v in st) for k in st[0]}
    for name, ms in st.items():
        rows.append({"benchmark": "input_profile", "what": f"(b) stage: {name}", "ms_per_image": round(ms, 3),
                     "rounds": args.rounds})
    floor = sum(st.values()) / st["decode"]
    rows.append({"benchmark": "input_profile", "what": "(b) stages: (decode + the rest) / decode", "ratio": round(floor, 3),
                 "rounds": args.rounds})
    for name, vals in res.items():
        if isinstance(vals[0], dict):
            med = {k: statistics.median(v[k] for v in vals) for k in vals[0]}
            rows.append({"benchmark": "input_profile", "what": name, **{k: round(v, 3) for k, v in med.items()},
                         "rounds": args.rounds})
        else:
            rows.append({"benchmark": "input_profile", "what": name, "images_per_s": round(statistics.median(vals)),
                         "spread": f"{min(vals):.0f}-{max(vals):.0f}", "rounds": args.rounds})
    print("\n| (b) per image, this process, 1 thread | ms |\n| --- | ---: |")
    for name, ms in st.items():
        print(f"| {name} | {ms:.3f} |")
    print(f"| (decode + the rest) / decode | {floor:.2f}x |")
    print("\n| (c) per image | ms in __getitem__ | minor page faults | system CPU ms |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        if "faults_per_image" in r:
            print(f"| {r['what']} | {r['ms_per_image']:.3f} | {r['faults_per_image']:.0f} | {r['sys_ms_per_image']:.3f} |")
    print("\n| (c) loader, 2 workers | images/s (spread) |\n| --- | ---: |")
    for r in rows:
        if "images_per_s" in r:
            print(f"| {r['what']} | {r['images_per_s']:,} ({r['spread']}) |")
    return save("input_profile", rows, quick=args.quick)


if __name__ == "__main__":
    main()
