"""run.precision=auto on a CPU with native bf16: measure, don't assume.

bf16 autocast is not faster for every model on a CPU that has AVX512_BF16: measured here (bench/precision.py,
2 cores, batch 32 @ 64 px, channels_last) it makes a ResNet-18 step ~1.4x faster and an EfficientNet-B0 step
~1.6x SLOWER (its depthwise convolutions, BatchNorm and SiLU run as bf16 <-> fp32 conversions around kernels
with no bf16 fast path). So `auto` on such a CPU times the run's own model before training: a few forward +
backward passes at the run's per-rank batch and image size, fp32 and bf16 alternated, one warm-up each, the
median of each; bf16 is chosen only when its median step is at least BF16_MARGIN faster (a tie keeps fp32:
the same speed, more precise). CUDA keeps bf16 where the GPU has it, unmeasured (tensor cores: bf16 is the
fast path there); a CPU without native bf16 keeps fp32 (emulated bf16 is slow); DeepSpeed keeps the rule
(its precision is fixed in its config before the model exists).

One answer per run, every rank the same:
  - rank 0 alone decides and broadcasts the decision over the process group (gloo on CPU), so ranks that
    would time differently cannot split, on one node or many; ranks on other nodes follow rank 0's
    machine (a heterogeneous job should pin run.precision);
  - the decision is cached per machine in <attrdist cache>/precision/<key>.json, keyed by what changes the
    answer (cache_key: CPU model and flags, torch version (oneDNN comes with it), the model config, head size, task,
    image size, per-rank batch, threads, channels_last in the model config); the probe runs under a file
    lock, so two runs starting together on one machine probe once and the second reads the answer;
  - the run records it in <run_dir>/precision.json and a resumed run (run.resume=auto) takes it from there
    without probing or reading the cache: a run never switches precision mid-way, even on another machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from attrdist import atomic
from attrdist.cache import cache_dir

log = logging.getLogger("attrdist")

PROBE_VERSION = 1  # part of the cache key: a changed probe measures again
BF16_MARGIN = 0.95  # bf16 only when its median step is <= 0.95x fp32's
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")


def needs_probe(pref: str, device: str, rule: str, deepspeed: str) -> bool:
    """Whether run.precision=auto is settled by measuring: a CPU where the rule said bf16 (native bf16), no DeepSpeed."""
    return pref == "auto" and device == "cpu" and rule == "bf16" and not deepspeed


def cpu_identity() -> dict:
    """The CPU's model name and the instruction-set flags that decide fp32/bf16 kernel speed."""
    name, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if not name and line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"cpu": name or platform.processor(), "flags": sorted(f for f in FLAGS if f in flags)}


def key_fields(*, model: dict, classes: int, task: str, image_size: int, per_rank_batch: int, threads: int) -> dict:
    """Everything the fp32-vs-bf16 answer depends on (the cache key's contents)."""
    model = {k: v for k, v in model.items() if k not in ("pretrained",)}  # which weights: not their speed
    return {"probe": PROBE_VERSION, **cpu_identity(), "torch": torch.__version__,
            "model": model, "classes": classes, "task": task, "image_size": image_size,
            "per_rank_batch": per_rank_batch, "threads": threads}


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def choose(fp32_s: list[float], bf16_s: list[float], margin: float = BF16_MARGIN) -> str:
    """accelerate's value: 'bf16' when bf16's median step is at least `margin` x fp32's, else 'no'."""
    return "bf16" if statistics.median(bf16_s) <= margin * statistics.median(fp32_s) else "no"


def time_alternating(steps: dict[str, Callable[[], None]], *, rounds: int = 3, budget_s: float = 30.0) -> dict:
    """{name: [seconds of each timed call]}: one untimed warm-up call each, then rounds alternating the order
    (AB BA AB); stops after the first round past `budget_s` (a slow model still gets one timed call each)."""
    for fn in steps.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in steps}
    names, t_start = list(steps), time.perf_counter()
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            steps[name]()
            out[name].append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > budget_s:
            break
    return out


def decide(fields: dict, measure: Callable[[], dict], root: Path | None = None) -> dict:
    """The decision for `fields`: from the cache, else measured (`measure()` -> {"no": [s...], "bf16": [s...]})
    under the cache entry's file lock and cached. Returns the record (choice, step medians, source, key)."""
    key = cache_key(fields)
    folder = Path(root or cache_dir()) / "precision"
    path = folder / f"{key}.json"
    rec = _read(path, fields)
    if rec is not None:
        return {**rec, "source": "cache", "cache": str(path)}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run on this machine may be probing the same key: wait for it
        rec = _read(path, fields)
        if rec is not None:
            return {**rec, "source": "cache", "cache": str(path)}
        t0 = time.perf_counter()
        times = measure()
        rec = {"choice": choose(times["no"], times["bf16"]), "key": key, "fields": fields,
               "fp32_ms": [round(1000 * s, 2) for s in times["no"]], "bf16_ms": [round(1000 * s, 2) for s in times["bf16"]],
               "probe_s": round(time.perf_counter() - t0, 2), "margin": BF16_MARGIN, "date": time.strftime("%Y-%m-%d %H:%M")}
        atomic.write_json(path, rec)
    return {**rec, "source": "probe", "cache": str(path)}


def _read(path: Path, fields: dict) -> dict | None:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and rec.get("choice") in ("no", "bf16") and rec.get("fields") == json.loads(
        json.dumps(fields, default=str))
    return rec if ok else None


def previous(run_dir: Path) -> dict | None:
    """The decision an earlier launch of this run recorded (<run_dir>/precision.json), if any."""
    try:
        rec = json.loads((run_dir / "precision.json").read_text())
    except (OSError, ValueError):
        return None
    return {**rec, "source": "resumed"} if isinstance(rec, dict) and rec.get("choice") in ("no", "bf16") else None


def broadcast(rec: dict | None, world: int) -> dict:
    """Rank 0's record on every rank (a collective when world > 1)."""
    if world == 1:
        return rec
    box = [rec]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def describe(rec: dict) -> str:
    """The one log line of the decision."""
    mp = "bf16" if rec["choice"] == "bf16" else "fp32"
    if rec.get("source") == "resumed":
        return f"run.precision=auto -> {mp}: as this run's earlier launch decided (precision.json; not measured again)"
    if rec.get("source") == "rule":
        return f"run.precision=auto -> {mp}: rank 0's CPU has no native bf16 (every rank follows rank 0)"
    if rec.get("source") == "failed":
        return f"run.precision=auto -> {mp}: the precision probe failed ({rec.get('error')}); the rule (native bf16) holds"
    f, b = statistics.median(rec["fp32_ms"]), statistics.median(rec["bf16_ms"])
    how = (f"measured now in {rec['probe_s']:.1f} s, cached in {rec['cache']}" if rec.get("source") == "probe"
           else f"cached answer {rec['cache']} of {rec.get('date', '?')}, not measured again")
    return (f"run.precision=auto -> {mp}: forward+backward step fp32 {f:.1f} ms, bf16 {b:.1f} ms (bf16/fp32 {b / f:.2f}; "
            f"medians of {len(rec['fp32_ms'])} alternated steps each, per-rank batch {rec['fields']['per_rank_batch']} @ "
            f"{rec['fields']['image_size']} px, {rec['fields']['threads']} threads; bf16 needs <= {rec['margin']:g}x); {how}")


def use_fp32(acc) -> None:
    """Turn an Accelerator made with mixed_precision='bf16' (the rule's provisional value) into an fp32 one, before
    `prepare` wraps the model's forward: accelerate keeps the choice in these two attributes (1.15; checked by
    tests/test_precision.py, which trains and asserts fp32 activations)."""
    acc.state._mixed_precision = "no"
    acc.native_amp = False
