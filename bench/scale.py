"""Data at cluster scale: the windowed order against the full permutation, for 100M samples in 100k shards.

    .venv/bin/python -m bench.scale                 # ~5 min here: all three parts
    .venv/bin/python -m bench.scale --quick         # smoke run (1M samples, small I/O pack)
    .venv/bin/python -m bench.scale --parts sim     # one part: sim, quality, io

sim (simulated, no image bytes): a split of N samples in N/1000 shards of ~110 MB (1000 samples of 110 kB,
  11 TB in all), global batch 4096, 8 ranks per node, at 8, 64 and 512 ranks. Per rank, for rank 0:
  the time from nothing to the first batch's sample indices plus the tar index of the shards that batch
  needs (real tar files holding only headers, sparse, made for just those shards), the order's peak memory
  (tracemalloc: numpy's allocations included), the shards it touches in an epoch; per node (node 0): the
  bytes it must fetch per epoch as whole shards, and the cache it needs (windowed: the windows its streams
  hold at once, plus the next ones prefetched; permutation: every shard it touches). The windowed order
  runs with data.streams=64 (the default; up to 64 ranks) and 512 (needed for 512 ranks).
quality: how much a global batch mixes, windowed (several windows) vs permutation, on 1M samples in 1000
  shards of 1000 and 1000 classes laid out two ways: "sorted" (each shard one class, as a pack made from a
  class-sorted folder would be: the worst case for any shard-local order) and "random". Distinct shards
  and classes per batch of 256, averaged over an epoch's first 400 batches.
demo (loss curves): the coconut recipe's demo profile (12 epochs, batch 32) on its demo data packed into
  shards of 25 samples (so that windows and streams mean something), seeds 0 and 1, data.order=windowed
  (shuffle_window 1 and 4) vs permutation: mean training loss of the first, middle and last epoch, and the
  best val mAP. Not in the default parts (~10 min here); `--parts demo` writes bench/results/scale-demo.csv.
io (beyond the page cache): a pack of random bytes (samples of 100 kB) on the local disk; rank 0 of 4
  reads its samples of one epoch in order with attrdist's ShardReader after every shard's pages were
  dropped (posix_fadvise DONTNEED), windowed vs permutation, alternating rounds: MB/s from disk.
http: the same pack served by nginx on 127.0.0.1 (tests/test_remote.py's server; Debian's nginx-light),
  read by rank 0 of 4 through the node cache (attrdist.data.remote: whole shards, sha256-checked) from an
  empty cache each round: windowed (with the loader's prefetching) vs permutation. Time, bytes
  downloaded and GETs per epoch; then the same epoch again from the warm cache.

Targets (issue 19): per-rank order memory at 100M samples < 50 MB; time to the first batch at 512 ranks < 5 s;
bytes fetched per node per epoch ~ dataset / nodes (target: <= 1.1x).
Writes bench/results/scale.csv.
"""

from __future__ import annotations

import os
import statistics
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench.common import alternate, parser, save, target_row

from attrdist.core.order import BatchPlan, StreamPlan, epoch_order

PER_SHARD, SAMPLE_BYTES, BATCH, GPUS_PER_NODE = 1000, 110_000, 4096, 8


def sparse_shard(path: Path, nsamples: int, sample_bytes: int) -> None:
    """A real tar of `nsamples` samples (<key>.jpg of `sample_bytes` + <key>.json of 200 bytes) whose data are
    holes: headers only on disk, the sizes of a real shard."""
    with open(path, "wb") as f:
        for i in range(nsamples):
            for ext, size in (("jpg", sample_bytes), ("json", 200)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = size
                f.write(info.tobuf(tarfile.USTAR_FORMAT))
                f.seek((size + 511) // 512 * 512, os.SEEK_CUR)
        f.write(bytes(1024))


def first_batch(make_plan, lengths: np.ndarray, tmp: Path) -> tuple[float, float, list[int]]:
    """(seconds, peak MB of the order) to the first batch of a plan, its shards indexed from real tar headers."""
    from attrdist.data.reader import index_shard

    starts = np.concatenate([[0], np.cumsum(lengths)])
    tracemalloc.start()
    t0 = time.perf_counter()
    plan = make_plan()
    batch = [i for i, _ in next(iter(plan))]
    t_order = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    shards = sorted({int(np.searchsorted(starts, i, side="right") - 1) for i in batch})
    for s in shards:  # made outside the timing: they stand for shards already on the file system
        if not (tmp / f"{s}.tar").exists():
            sparse_shard(tmp / f"{s}.tar", int(lengths[s]), SAMPLE_BYTES)
    t1 = time.perf_counter()
    for s in shards:
        index_shard(tmp / f"{s}.tar", int(lengths[s]))
    return t_order + time.perf_counter() - t1, peak, shards


def windowed_shards(lengths, ranks: list[int], world: int, streams: int, window: int) -> set[int]:
    out: set[int] = set()
    for r in ranks:
        plan = StreamPlan(lengths, BATCH, world, r, 0, 0, streams=streams, window=window)
        seq = plan.shard_sequence()
        ends = np.cumsum(lengths[seq])
        for s in plan.owned_streams():
            out.update(p[0] for p in plan.pieces(s, seq, ends))
    return out


def permutation_shards(order: np.ndarray, starts: np.ndarray, ranks: list[int], world: int) -> set[int]:
    """The shards ranks `ranks` read in an epoch of the full permutation (rank r: columns r*B/W.. of each batch)."""
    batches = order[:len(order) // BATCH * BATCH].reshape(-1, BATCH)
    local = BATCH // world
    mine = np.concatenate([batches[:, r * local:(r + 1) * local].ravel() for r in ranks])
    return set(np.unique(np.searchsorted(starts, mine, side="right") - 1).tolist())


def sim(n: int, tmp: Path, window: int = 4) -> list[dict]:
    lengths = np.full(n // PER_SHARD, PER_SHARD, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    shard_bytes = PER_SHARD * (SAMPLE_BYTES + 200 + 1024)
    dataset = len(lengths) * shard_bytes
    rows = []
    order = epoch_order(n, 0, 0)  # the full permutation, once (for the shards touched)
    for world in (8, 64, 512):
        nodes = max(1, world // GPUS_PER_NODE)
        node0 = list(range(min(world, GPUS_PER_NODE)))
        configs = [("permutation", 0)] + [("windowed", s) for s in (64, 512) if s % world == 0 and BATCH % world == 0]
        for name, streams in configs:
            if name == "permutation":
                make = lambda: BatchPlan(n, BATCH, world, 0, 0, 0, shuffle=True, drop_last=True)  # noqa: E731
                touched0 = permutation_shards(order, starts, [0], world)
                node_shards = permutation_shards(order, starts, node0, world)
                cache = len(node_shards) * shard_bytes  # any later batch may need any of them again
            else:
                make = lambda: StreamPlan(lengths, BATCH, world, 0, 0, 0, streams=streams, window=window)  # noqa: E731
                touched0 = windowed_shards(lengths, [0], world, streams, window)
                node_shards = windowed_shards(lengths, node0, world, streams, window)
                per_node_streams = streams // world * len(node0)
                cache = 2 * per_node_streams * window * shard_bytes  # open windows + the next ones prefetched
            secs, peak, first = first_batch(make, lengths, tmp)
            fetched = len(node_shards) * shard_bytes
            rows.append({"benchmark": "scale", "part": "sim", "order": name, "streams": streams or "",
                         "window": window if streams else "", "samples": n, "shards": len(lengths), "ranks": world,
                         "nodes": nodes, "first_batch_s": round(secs, 3), "order_peak_mb": round(peak, 1),
                         "first_batch_shards": len(first), "shards_per_rank_epoch": len(touched0),
                         "node_fetch_tb": round(fetched / 1e12, 3), "dataset_over_nodes_tb": round(dataset / nodes / 1e12, 3),
                         "fetch_over_share": round(fetched / (dataset / nodes), 2),
                         "node_cache_gb": round(cache / 1e9, 1)})
            print(" | ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in ("benchmark", "part")), flush=True)
    return rows


def quality(n: int, batches: int = 400, B: int = 256) -> list[dict]:
    shards = n // PER_SHARD
    lengths = np.full(shards, PER_SHARD, dtype=np.int64)
    shard_of = np.repeat(np.arange(shards), PER_SHARD)
    layouts = {"sorted": shard_of % 1000,
               "random": np.random.default_rng(0).integers(0, 1000, n)}
    plans = {"permutation": lambda: BatchPlan(n, B, 1, 0, 0, 0, True, True)}
    for w in (1, 4, 16):
        plans[f"windowed w={w}"] = lambda w=w: StreamPlan(lengths, B, 1, 0, 0, 0, streams=64, window=w)
    rows = []
    for name, make in plans.items():
        it = iter(make())
        got = [np.asarray([i for i, _ in next(it)]) for _ in range(min(batches, n // B))]
        for layout, cls in layouts.items():
            rows.append({"benchmark": "scale", "part": "quality", "order": name, "layout": layout, "batch": B,
                         "shards_per_batch": round(statistics.mean(len(np.unique(shard_of[b])) for b in got), 1),
                         "classes_per_batch": round(statistics.mean(len(np.unique(cls[b])) for b in got), 1)})
            print(" | ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in ("benchmark", "part")), flush=True)
    return rows


def demo_curves(tmp: Path, seeds=(0, 1)) -> list[dict]:
    import json
    import subprocess
    import sys

    from attrdist.demo import scenes
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.pack.vocab import load_vocabulary

    root_dir = Path(__file__).resolve().parents[1]
    vocab = root_dir / "recipes" / "coconut_demo_vocab.json"
    data = scenes.ensure_demo(None, scenes.DemoSpec())
    shards = tmp / "demo-25"
    ann = data / "annotations"
    pack_coco_captions(shards, [SplitSource(s, data / "images", ann / f"captions_{s}.json", ann / f"instances_{s}.json")
                                for s in ("train", "val", "test")], load_vocabulary(vocab), dataset="coconut-demo",
                       vocab_path=vocab, max_samples=25, progress=False)
    rows = []
    for name, over in (("windowed w=1", ["data.order=windowed", "data.shuffle_window=1"]),
                       ("windowed w=4", ["data.order=windowed", "data.shuffle_window=4"]),
                       ("permutation", ["data.order=permutation"])):
        for seed in seeds:
            out = tmp / "runs" / f"{name.replace(' ', '_')}-{seed}"
            subprocess.run([sys.executable, str(root_dir / "recipes" / "coconut.py"), "--profile", "demo",
                            f"data.shards={shards}", f"run.run_dir={out}", f"run.seed={seed}", *over], cwd=root_dir, check=True,
                           capture_output=True)
            recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in recs if r.get("type") == "train"]
            epochs = sorted({r["epoch"] for r in train})
            mean = {e: statistics.mean(r["loss"] for r in train if r["epoch"] == e) for e in epochs}
            maps = [r["val/true_labels/mAP"] for r in recs if r.get("type") == "eval" and "val/true_labels/mAP" in r]
            rows.append({"benchmark": "scale", "part": "demo", "order": name, "seed": seed,
                         "loss_first_epoch": round(mean[epochs[0]], 4),
                         "loss_mid_epoch": round(mean[epochs[len(epochs) // 2]], 4),
                         "loss_last_epoch": round(mean[epochs[-1]], 4), "best_val_map": round(max(maps), 4)})
            print(" | ".join(f"{k}={v}" for k, v in rows[-1].items() if k != "benchmark"), flush=True)
    return rows


def make_pack(root: Path, shards: int, per_shard: int, sample_bytes: int) -> Path:
    """A real pack (manifest + tar shards) of random bytes, written and synced."""
    import json

    import webdataset as wds

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    info = []
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(root / name), mtime=0.0) as w:
            for i in range(per_shard):
                w.write({"__key__": f"{s:06d}{i:06d}", "jpg": rng.bytes(sample_bytes), "json": b'{"labels": []}'})
        from attrdist.atomic import sha256_file

        info.append({"file": name, "nsamples": per_shard, "bytes": (root / name).stat().st_size,
                     "sha256": sha256_file(root / name)})
    (root / "manifest.json").write_text(json.dumps({
        "format": "attrdist-shards-v1", "dataset": "bench-scale", "attributes": ["a"], "label_fields": ["labels"],
        "splits": {"train": {"shards": info, "nsamples": shards * per_shard, "label_counts": {"labels": [0]}}}}))
    os.sync()
    return root


def drop_cached(root: Path) -> None:
    for p in root.glob("*.tar"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def io(root: Path, rounds: int, world: int = 4, B: int = 64) -> tuple[list[dict], dict]:
    from attrdist.data.reader import ShardReader, load_manifest

    reader = ShardReader(load_manifest(root), "train")
    n = len(reader)

    def read(plan) -> float:
        drop_cached(root)
        t0 = time.perf_counter()
        nbytes = 0
        for batch in plan:
            for i, _ in batch:
                nbytes += len(reader[i]["jpg"])
        read.bytes = nbytes
        return time.perf_counter() - t0

    plans = {"windowed": lambda: StreamPlan(reader.lengths, B, world, 0, 0, 0, streams=64, window=4),
             "permutation": lambda: BatchPlan(n, B, world, 0, 0, 0, True, True)}
    t = alternate({k: (lambda k=k: read(plans[k]())) for k in plans}, rounds)
    rows = [{"benchmark": "scale", "part": "io local", "order": k, "rounds": rounds, "median_s": round(statistics.median(v), 3),
             "min_s": round(min(v), 3), "max_s": round(max(v), 3), "mb": round(read.bytes / 1e6, 1),
             "mb_per_s": round(read.bytes / 1e6 / statistics.median(v), 1)} for k, v in t.items()]
    for r in rows:
        print(" | ".join(f"{k}={v}" for k, v in r.items() if k not in ("benchmark",)), flush=True)
    return rows, t


def http(pack: Path, tmp: Path, rounds: int, world: int = 4, B: int = 64) -> list[dict]:
    import shutil

    from attrdist.data.loader import Prefetching
    from attrdist.data.reader import ShardReader, load_manifest
    from tests.test_remote import Cache, Nginx

    (tmp / "www").mkdir()
    os.symlink(pack, tmp / "www" / "pack")
    srv = Nginx(tmp / "www", tmp / "nginx")
    rows = []
    try:
        url = f"{srv.url}/pack/"

        def epoch(kind: str, cache: Path, cold: bool) -> tuple[float, int, int]:
            if cold:
                shutil.rmtree(cache, ignore_errors=True)
            reader = ShardReader(load_manifest(url, Cache(cache, limit_gb=100)), "train")
            gets = sum(srv.gets(f) for f in (s["file"] for s in reader.shards))
            plan = (StreamPlan(reader.lengths, B, world, 0, 0, 0, streams=64, window=4) if kind == "windowed"
                    else BatchPlan(len(reader), B, world, 0, 0, 0, True, True))
            batches = Prefetching(plan, reader.prefetch) if kind == "windowed" else plan
            t0 = time.perf_counter()
            for batch in batches:
                for i, _ in batch:
                    reader[i]
            secs = time.perf_counter() - t0
            got = sum(srv.gets(f) for f in (s["file"] for s in reader.shards)) - gets
            return secs, sum(p.stat().st_size for p in cache.rglob("*.tar")), got

        res: dict[str, list] = {"windowed": [], "permutation": []}
        for r in range(rounds):
            for kind in (("windowed", "permutation") if r % 2 == 0 else ("permutation", "windowed")):
                res[kind].append(epoch(kind, tmp / f"cache-{kind}", cold=True))
        for kind, got in res.items():
            warm = epoch(kind, tmp / f"cache-{kind}", cold=False)
            secs = [g[0] for g in got]
            rows.append({"benchmark": "scale", "part": "io http", "order": kind, "rounds": rounds,
                         "median_s": round(statistics.median(secs), 3), "min_s": round(min(secs), 3),
                         "max_s": round(max(secs), 3), "downloaded_mb": round(got[0][1] / 1e6, 1), "gets": got[0][2],
                         "download_mb_per_s": round(got[0][1] / 1e6 / statistics.median(secs), 1),
                         "warm_s": round(warm[0], 3), "warm_gets": warm[2]})
            print(" | ".join(f"{k}={v}" for k, v in rows[-1].items() if k != "benchmark"), flush=True)
    finally:
        srv.stop()
    return rows


def main(argv=None) -> list[dict]:
    ap = parser(__doc__, quick="smoke run: 1M samples, a 100 MB I/O pack, 1 round")
    ap.add_argument("--samples", type=int, default=100_000_000)
    ap.add_argument("--parts", default="sim,quality,io,http", help="any of sim, quality, io, http, demo")
    ap.add_argument("--io-shards", type=int, default=48, help="shards of the I/O pack (200 samples of 100 kB each)")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.rounds, args.io_shards = 1_000_000, 1, 5
    parts = args.parts.split(",")
    rows, targets = [], []
    with tempfile.TemporaryDirectory(prefix="attrdist-scale-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        tmp = Path(tmp)
        if "sim" in parts:
            (tmp / "sparse").mkdir()
            sim_rows = sim(args.samples, tmp / "sparse")
            rows += sim_rows
            win = [r for r in sim_rows if r["order"] == "windowed"]
            worst_mem = max(win, key=lambda r: r["order_peak_mb"])
            at512 = [r for r in win if r["ranks"] == 512]
            worst_fetch = max(win, key=lambda r: r["fetch_over_share"])
            targets += [
                target_row("scale", f"windowed order: peak memory per rank at {args.samples / 1e6:g}M samples (worst: "
                           f"{worst_mem['ranks']} ranks, {worst_mem['streams']} streams)", worst_mem["order_peak_mb"],
                           min(r["order_peak_mb"] for r in win), worst_mem["order_peak_mb"], "<=", 50, " MB"),
                *[target_row("scale", f"windowed order: time to the first batch at 512 ranks ({r['streams']} streams; "
                             f"{r['first_batch_shards']} shards indexed)", r["first_batch_s"], r["first_batch_s"],
                             r["first_batch_s"], "<=", 5, " s") for r in at512],
                target_row("scale", f"windowed order: bytes fetched per node per epoch / (dataset / nodes) (worst: "
                           f"{worst_fetch['ranks']} ranks, {worst_fetch['streams']} streams)", worst_fetch["fetch_over_share"],
                           min(r["fetch_over_share"] for r in win), worst_fetch["fetch_over_share"], "<=", 1.1),
            ]
        if "quality" in parts:
            rows += quality(min(args.samples, 1_000_000))
        if "demo" in parts:
            rows += demo_curves(tmp)
        if "io" in parts:
            pack = make_pack(tmp / "pack", args.io_shards, 200, 100_000)
            io_rows, t = io(pack, args.rounds)
            rows += io_rows
            r = [a / b for a, b in zip(t["permutation"], t["windowed"])]
            rows.append({"benchmark": "scale", "part": "io local", "what": "permutation time / windowed time (same bytes)",
                         "median": round(statistics.median(r), 2), "spread": f"{min(r):.2f}-{max(r):.2f}"})
            print(f"local disk, page cache dropped: permutation / windowed time {statistics.median(r):.2f}x "
                  f"({min(r):.2f}-{max(r):.2f})")
        if "http" in parts:
            pack = pack if "io" in parts else make_pack(tmp / "pack", args.io_shards, 200, 100_000)
            rows += http(pack, tmp, args.rounds)
    return save("scale-demo" if parts == ["demo"] else "scale", rows, targets, quick=args.quick)


if __name__ == "__main__":
    main()
