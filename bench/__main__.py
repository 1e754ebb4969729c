"""Every benchmark, one after the other (they must not share the cores), and one summary.

    .venv/bin/python -m bench            # = make bench; ~30 min on the 2-core reference machine
    .venv/bin/python -m bench --quick    # smoke run of every benchmark (~3 min): proves they run, measures nothing
    .venv/bin/python -m bench input train_step   # some of them

Each benchmark also runs alone (`python -m bench.<name> --help`) and writes bench/results/<name>.csv
with the machine's details. The target rows of all of them go to bench/results/summary.md, the
tables that BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import sys
import time

from bench.common import RESULTS, machine_info, markdown_targets

ORDER = ["pack", "input", "input_profile", "train_step", "trainer_profile", "timm_peer", "precision", "ddp", "malloc", "inference", "memory", "scale"]


def targets_from_csv(name: str) -> list[dict]:
    path = RESULTS / f"{name}.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r.get("verdict")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=ORDER, help=f"any of {', '.join(ORDER)}")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    sections = []
    for name in args.names:
        if name not in ORDER:
            ap.error(f"unknown benchmark {name!r}; choose from {', '.join(ORDER)}")
        t0 = time.perf_counter()
        print(f"\n=== bench.{name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main(["--quick"] if args.quick else [])
        took = time.perf_counter() - t0
        rows = targets_from_csv(f"{name}-quick" if args.quick else name)
        for r in rows:
            r["median"] = float(r["median"])
        sections.append(f"## {name} ({took:.0f} s)\n\n{markdown_targets(rows) if rows else '(no targets)'}\n")
        print(f"=== bench.{name}: {took:.0f} s ===", flush=True)
    info = machine_info()
    out = RESULTS / ("summary-quick.md" if args.quick else "summary.md")
    out.write_text(f"# Benchmark targets ({info['date']}, commit {info.get('commit', '?')}, {info['cpu']}, "
                   f"{info['cores']} cores, torch {info.get('torch', '?')})\n\n" + "\n".join(sections))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
