"""Benchmark plumbing: the one shape every benchmark has, machine info, alternating timings, CSV results.

Every `bench/<name>.py` is run as `python -m bench.<name> [--quick] [--rounds N] ...` and has the same shape:
its docstring says what it measures against what (its first paragraph is the --help text); `main(argv)`
takes its arguments from `parser(__doc__, ...)`, runs, and ends with `save(name, rows, targets, quick=...)`,
which writes bench/results/<name>[-quick].csv (every row with the machine's facts) and prints the targets
table; it returns the target rows, which `python -m bench` (make bench) gathers into results/summary.md.

These machines are noisy, so every comparison alternates A and B for several rounds and reports
the median and the spread (min-max) of each, and the ratio of medians.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    info = {"host": platform.node(), "python": platform.python_version(), "cores": len(os.sched_getaffinity(0)),
            "cpu": "", "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        here = Path(__file__).parent
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "attrdist", "recipes",
                                "launch", "shards", "bench", ":(exclude)bench/results"], capture_output=True, text=True, cwd=here.parent).stdout
        if dirty.strip():
            info["commit"] += "+changes"  # measured on uncommitted code: the next commit holds it
    except OSError:
        pass
    return info


def alternate(fns: dict[str, Callable[[], float | None]], rounds: int = 3) -> dict[str, list[float]]:
    """Run each fn once per round, in alternating order; a fn returns its own seconds or None (timed here)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            got = fns[name]()
            times[name].append(got if isinstance(got, float) else time.perf_counter() - t0)
    return times


def summarize(times: list[float], items: int) -> dict:
    med = statistics.median(times)
    return {"median_s": round(med, 4), "min_s": round(min(times), 4), "max_s": round(max(times), 4),
            "items_per_s": round(items / med, 1), "rounds": len(times)}


def write_csv(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    path = RESULTS / f"{name}.csv"
    fields = sorted({k for r in rows for k in r} | set(info), key=lambda k: (k in info, k))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**info, **r})
    return path


def ratio_stats(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios a[i]/b[i] (rounds alternate, so pairs are neighbours)."""
    rs = [x / y for x, y in zip(a, b)]
    return statistics.median(rs), min(rs), max(rs)


def verdict(value: float, op: str, threshold: float) -> str:
    ok = value >= threshold if op == ">=" else value <= threshold
    return "PASS" if ok else "FALLS SHORT"


def target_row(benchmark: str, what: str, value: float, lo: float, hi: float, op: str, threshold: float,
               unit: str = "x", note: str = "") -> dict:
    """One line of a BENCHMARKS.md target table: the measured median (and spread) against its target."""
    return {"benchmark": benchmark, "what": what, "target": f"{op} {threshold:g}{unit}", "median": round(value, 3),
            "spread": f"{lo:.3f}-{hi:.3f}", "verdict": verdict(value, op, threshold), "note": note}


def markdown_targets(rows: list[dict]) -> str:
    lines = ["| what | target | measured (median) | spread (min-max over rounds) | verdict |",
             "| --- | --- | ---: | ---: | --- |"]
    for r in rows:
        unit = r["target"].split()[-1].lstrip("0123456789.e-+") if r["target"] else ""
        lines.append(f"| {r['what']} | {r['target']} | {r['median']:g}{unit} | {r['spread']} | "
                     f"**{r['verdict']}**{' - ' + r['note'] if r.get('note') else ''} |")
    return "\n".join(lines)


def parser(doc: str, *, rounds: int | None = 3, quick: str = "smoke run: proves the benchmark runs, measures little"
           ) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --quick, and --rounds (alternated repetitions) unless `rounds` is None."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick)
    if rounds is not None:
        ap.add_argument("--rounds", type=int, default=rounds, help=f"alternated repetitions (default: {rounds})")
    return ap


def save(name: str, rows: list[dict], targets: list[dict] | tuple = (), *, quick: bool, note: str = "") -> list[dict]:
    """Write bench/results/<name>[-quick].csv (rows, then targets), print the targets table and where it went;
    returns the targets."""
    path = write_csv(name + ("-quick" if quick else ""), [*rows, *targets])
    if targets:
        print()
        print(markdown_targets(list(targets)))
    print(f"wrote {path}{' ' + note if note else ''}")
    return list(targets)
