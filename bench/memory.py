"""Memory and start-up benchmark (issue benchmark 7): peak RSS flat in dataset size, fast --help,
time from command to first training step.

    .venv/bin/python -m bench.memory [--n 150] [--rounds 3] [--quick]

Every measurement is a real subprocess (the command a user types), with ATTRDIST_CACHE pointed at a
temporary directory. Data: COCO-like 640x480 JPEGs from bench.pack.make_dataset; the 1x dataset is
the first N images of the 10x one (hard links), so 1x and 10x differ only in how many there are.

Peak RSS, two figures per run (alternating 1x / 10x, median of rounds):
  tree_rss_peak   the headline: the largest SUM of RSS over the whole process tree (the command and
                  every descendant: packer pool workers, DataLoader workers), sampled with psutil
                  every 20 ms. Sums count pages shared by forked workers once per process (so it
                  overstates memory, equally at 1x and 10x); a spike shorter than the poll can be missed.
  max_proc_rss    ru_maxrss from os.wait4 (CSV only, not reported): useless here, because Linux's RSS
                  high-water mark is inherited through fork, so every child of this benchmark process
                  starts at the benchmark's own ~1.8 GB (measured: 1828 MB in every run).
Runs:
  pack            python shards/coco.py --mode captions --vocab recipes/coconut_vocab.json
                  --split train IMAGES CAPTIONS (N vs 10N images, all cores, as the CLI defaults)
  train           python recipes/coconut.py --profile demo data.shards=<N or 10N train + the same 32 val>
                  run.max_steps=S run.epochs=1000 run.eval_every=1000 data.eval_labels=labels: the demo
                  profile (ResNet-18 cross_modal, 64 px, batch 32, 1 DataLoader worker), the same S steps
                  on both, then its usual end (checkpoint, val evaluation, inference timing, report)
Start-up (wall time of the whole command, median of runs):
  attrdist --help (target <= 1 s), python recipes/coconut.py --help (same target), and for context
  attrdist predict --help, python shards/coco.py --help, python -c pass, python -c "import attrdist.train.trainer".
First training step: `python recipes/coconut.py run.out_dir=TMP` (plain demo profile; the demo data are
generated and packed into the cache by a warm-up beforehand, outside the timing), from launch until
its "epoch 0 step 1/N" log line arrives on stdout (the trainer logs to stdout), then the run is
killed. Broken down at the log lines it prints on the way (arrival times):
  launch -> "recipe: coconut | run dir"   interpreter, imports (torch, accelerate), demo-data cache
                                          check, Accelerator, run dir
  -> "model ...: parameters"              config log, manifest, build_model
  -> "train split ..."                    channels_last, optimizer, accelerate.prepare, shard reader
  -> "step 1/"                            first DataLoader (worker start), first batch decode and
                                          augment, forward, backward, optimizer step
Writes bench/results/memory.csv (memory-quick.csv with --quick).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import alternate, parser, save, target_row

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
VOCAB = ROOT / "recipes" / "coconut_vocab.json"
POLL_S = 0.02


def env(cache: Path) -> dict:
    e = {**os.environ, "ATTRDIST_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    e.pop("ATTRDIST_EXPECT_WORLD_SIZE", None)
    return e


def measure(cmd: list[str], environ: dict, log: Path, expect: tuple[tuple[str, int], ...] = ()) -> dict:
    """Run cmd to the end; peak RSS of its process tree (psutil, summed) and of its largest process (wait4).
    `expect`: (regex with one number group, value) pairs its output must show (it did the work we think)."""
    import psutil

    with open(log, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(p.pid)
        peak, peak_procs, seen = 0, 0, {p.pid}
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:  # reaped here, so Popen must not wait for it again
                p.returncode = os.waitstatus_to_exitcode(status)
                break
            total, procs = 0, [root]
            try:
                procs += root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            for q in procs:
                try:
                    total += q.memory_info().rss
                    seen.add(q.pid)
                except psutil.NoSuchProcess:
                    pass
            if total > peak:
                peak, peak_procs = total, len(procs)
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}\n{log.read_text()[-4000:]}")
    for pattern, value in expect:
        m = re.search(pattern, log.read_text())
        if not m or int(m.group(1)) != value:
            raise SystemExit(f"{' '.join(cmd)}: expected {pattern!r} = {value}, got "
                             f"{m.group(1) if m else 'no such line'}\n{log.read_text()[-3000:]}")
    return {"tree_rss_peak_mb": peak / 2**20, "max_proc_rss_mb": ru.ru_maxrss / 1024, "procs_at_peak": peak_procs,
            "procs_seen": len(seen), "wall_s": wall}


def make_sizes(tmp: Path, n: int) -> dict[str, Path]:
    """{'1x': N images, '10x': 10N images}; 1x holds hard links to the first N files of 10x."""
    from bench.pack import make_dataset

    big = make_dataset(tmp / "data-10x", 10 * n, seed=0)
    small = tmp / "data-1x"
    (small / "images").mkdir(parents=True)
    caps = json.loads((big / "captions.json").read_text())
    images = caps["images"][:n]
    keep = {im["id"] for im in images}
    for im in images:
        os.link(big / "images" / im["file_name"], small / "images" / im["file_name"])
    (small / "captions.json").write_text(json.dumps(
        {"images": images, "annotations": [a for a in caps["annotations"] if a["image_id"] in keep]}))
    return {"1x": small, "10x": big}


def pack_cmd(data: Path, out: Path) -> list[str]:
    return [PY, str(ROOT / "shards" / "coco.py"), "--mode", "captions", "--out", str(out), "--vocab", str(VOCAB),
            "--split", "train", str(data / "images"), str(data / "captions.json"), "--overwrite", "--quiet",
            "--on-leak", "warn"]


def train_shards(tmp: Path, sizes: dict[str, Path], val: Path) -> dict[str, Path]:
    """Shards for the training runs: each size's images as train + the same val split (outside timing)."""
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.pack.vocab import load_vocabulary

    out = {}
    for key, data in sizes.items():
        out[key] = tmp / f"train-shards-{key}"
        pack_coco_captions(out[key], [SplitSource("train", data / "images", data / "captions.json"),
                                      SplitSource("val", val / "images", val / "captions.json")],
                           load_vocabulary(VOCAB), vocab_path=VOCAB, progress=False, on_leak="warn")
    return out


def train_cmd(shards: Path, out: Path, steps: int) -> list[str]:
    return [PY, str(ROOT / "recipes" / "coconut.py"), "--profile", "demo", f"data.shards={shards}",
            f"run.out_dir={out}", f"run.max_steps={steps}", "run.epochs=1000", "run.eval_every=1000",
            "data.eval_labels=labels"]


def wall(cmd: list[str], environ: dict, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=environ, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


MILESTONES = [("imports_accelerator_s", re.compile(r"recipe: coconut \| run dir")),
              ("model_build_s", re.compile(r"\bmodel \S+: [\d.]+M parameters")),
              ("optimizer_prepare_data_s", re.compile(r"train split '")),
              ("first_batch_and_step_s", re.compile(r"epoch \d+ step 1/\d+"))]


def first_step(environ: dict, out: Path, timeout: float = 300) -> dict:
    """Seconds from launching the plain demo recipe until its first training-step log line (stdout)."""
    p = subprocess.Popen([PY, str(ROOT / "recipes" / "coconut.py"), f"run.out_dir={out}"], cwd=ROOT, env=environ,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    t0 = time.perf_counter()
    marks, i, lines = {}, 0, []
    try:
        for line in p.stdout:
            now = time.perf_counter() - t0
            lines.append(line)
            while i < len(MILESTONES) and MILESTONES[i][1].search(line):
                marks[MILESTONES[i][0]] = now
                i += 1
            if i == len(MILESTONES) or now > timeout:
                break
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: the recipe and its DataLoader worker
        p.wait()
        p.stdout.close()
    if i < len(MILESTONES):
        raise SystemExit(f"no '{MILESTONES[i][1].pattern}' line from the recipe:\n{''.join(lines)[-4000:]}")
    out_ = {"to_step1_s": marks[MILESTONES[-1][0]]}
    prev = 0.0
    for name, _ in MILESTONES:
        out_[name] = marks[name] - prev
        prev = marks[name]
    return out_


def main(argv=None):
    ap = parser(__doc__, quick="smoke run: N=64, 1 round, 3 steps, fewer start-up runs")
    ap.add_argument("--n", type=int, default=150, help="images in the 1x dataset (10x: ten times as many)")
    ap.add_argument("--steps", type=int, default=12, help="run.max_steps of each training run")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.steps = 64, 1, 3
    help_runs, step_runs = (3, 1) if args.quick else (7, 3)
    rows, targets = [], []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attrdist-bench-mem-") as tmp_s:
        tmp = Path(tmp_s)
        environ = env(tmp / "cache")

        # --- start-up: --help and friends
        exe = Path(PY).with_name("attrdist")
        attrdist = [str(exe)] if exe.is_file() else [PY, "-m", "attrdist.cli"]
        starts = {"attrdist --help": [*attrdist, "--help"],
                  "python recipes/coconut.py --help": [PY, str(ROOT / "recipes" / "coconut.py"), "--help"],
                  "attrdist predict --help": [*attrdist, "predict", "--help"],
                  "python shards/coco.py --help": [PY, str(ROOT / "shards" / "coco.py"), "--help"],
                  "python -c pass": [PY, "-c", "pass"],
                  "python -c 'import attrdist.train.trainer'": [PY, "-c", "import attrdist.train.trainer"]}
        start_t = {}
        for what, cmd in starts.items():
            runs = help_runs if "trainer" not in what else max(1, help_runs // 2)
            wall(cmd, environ, 1)  # warm the page cache
            start_t[what] = wall(cmd, environ, runs)
            v = start_t[what]
            rows.append({"benchmark": "memory", "what": f"start-up: {what}", "median_s": round(statistics.median(v), 3),
                         "min_s": round(min(v), 3), "max_s": round(max(v), 3), "rounds": len(v)})
        for what in ("attrdist --help", "python recipes/coconut.py --help"):
            v = start_t[what]
            targets.append(target_row("memory", f"`{what}` wall time", statistics.median(v), min(v), max(v), "<=", 1,
                                      unit=" s"))
        print(f"start-up done ({time.perf_counter() - t_start:.0f} s)", flush=True)

        # --- first training step of the plain demo recipe (demo data prepared first, outside the timing)
        subprocess.run([PY, "-c", "from pathlib import Path; from attrdist.recipe import demo_shards; "
                        f"demo_shards(Path({str(ROOT / 'recipes' / 'coconut_demo_vocab.json')!r}))"],
                       cwd=ROOT, env=environ, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fs = [first_step(environ, tmp / f"first-{k}") for k in range(step_runs)]
        med = {k: statistics.median(r[k] for r in fs) for k in fs[0]}
        rows.append({"benchmark": "memory", "what": "command to first training step (coconut demo, CPU)",
                     "median_s": round(med["to_step1_s"], 3), "min_s": round(min(r["to_step1_s"] for r in fs), 3),
                     "max_s": round(max(r["to_step1_s"] for r in fs), 3), "rounds": len(fs),
                     **{k: round(v, 3) for k, v in med.items() if k != "to_step1_s"}})
        print(f"first step done ({time.perf_counter() - t_start:.0f} s)", flush=True)

        # --- peak RSS: packing and training, 1x vs 10x
        from bench.pack import make_dataset

        sizes = make_sizes(tmp, args.n)
        val = make_dataset(tmp / "data-val", 32, seed=7)
        n_of = {"1x": args.n, "10x": 10 * args.n}
        got: dict[str, list[dict]] = {f"{kind} {k}": [] for kind in ("pack", "train") for k in sizes}

        def run_pack(key: str):
            got[f"pack {key}"].append(measure(pack_cmd(sizes[key], tmp / f"packed-{key}"), environ,
                                              tmp / f"pack-{key}.log", ((r"train: packed (\d+) of", n_of[key]),)))
            return got[f"pack {key}"][-1]["wall_s"]

        alternate({k: (lambda k=k: run_pack(k)) for k in sizes}, args.rounds)
        print(f"packing done ({time.perf_counter() - t_start:.0f} s)", flush=True)
        shards = train_shards(tmp, sizes, val)
        counter = iter(range(10**6))

        def run_train(key: str):
            got[f"train {key}"].append(measure(train_cmd(shards[key], tmp / f"runs-{next(counter)}", args.steps),
                                               environ, tmp / f"train-{key}.log",
                                               ((r"train split 'train': (\d+) samples", n_of[key]),
                                                (r"optimizer steps per rank \[(\d+)\]", args.steps))))
            return got[f"train {key}"][-1]["wall_s"]

        alternate({k: (lambda k=k: run_train(k)) for k in sizes}, args.rounds)
        print(f"training done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    for name, runs in got.items():
        kind, key = name.split()
        row = {"benchmark": "memory", "what": f"peak RSS: {kind} {key}", "images": n_of[key], "rounds": len(runs)}
        for f in ("tree_rss_peak_mb", "max_proc_rss_mb", "wall_s"):
            v = [r[f] for r in runs]
            row[f] = round(statistics.median(v), 1 if f != "wall_s" else 2)
            row[f"{f}_spread"] = f"{min(v):.1f}-{max(v):.1f}"
        row["procs_seen"] = max(r["procs_seen"] for r in runs)
        if kind == "train":
            row["steps"] = args.steps
        rows.append(row)
    for kind in ("pack", "train"):
        # (max_proc_rss_mb stays in the CSV but is no measure here: Linux's RSS high-water mark survives fork,
        # so a child of this torch-holding process starts at the parent's ~1.8 GB; measured: 1828 MB for every run)
        for f, label in (("tree_rss_peak_mb", "process-tree RSS (sum)"),):
            rs = [b[f] / a[f] for a, b in zip(got[f"{kind} 1x"], got[f"{kind} 10x"])]
            row = target_row("memory", f"{kind}: peak {label}, {10 * args.n} / {args.n} images",
                             statistics.median(rs), min(rs), max(rs), "<=", 1.2)
            if f == "tree_rss_peak_mb":
                targets.append(row)
            else:
                rows.append(row | {"verdict": "", "target": "(diagnostic) " + row["target"]})
    step_row = next(r for r in rows if r["what"].startswith("command to first"))
    took = time.perf_counter() - t_start

    print("| what | median | spread |\n| --- | ---: | ---: |")
    for r in rows:
        if "median_s" in r:
            print(f"| {r['what']} | {r['median_s']:.3f} s | {r['min_s']:.3f}-{r['max_s']:.3f} |")
    print(f"\nfirst step ({step_row['rounds']} run(s)): {step_row['median_s']:.2f} s = "
          + " + ".join(f"{k} {step_row[k]:.2f}" for k, _ in MILESTONES))
    print("\n| run | images | peak tree RSS (sum) MB | processes | wall s |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if r["what"].startswith("peak RSS"):
            print(f"| {r['what'][10:]} | {r['images']} | {r['tree_rss_peak_mb']:.0f} "
                  f"({r['tree_rss_peak_mb_spread']}) | {r['procs_seen']} | {r['wall_s']:.1f} |")
    for r in rows:
        if r.get("target", "").startswith("(diagnostic)"):
            print(f"{r['what']}: {r['median']:.3f}x ({r['spread']})")
    return save("memory", rows, targets, quick=args.quick, note=f"({took:.0f} s)")


if __name__ == "__main__":
    main()
