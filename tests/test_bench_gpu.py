"""`python -m bench.gpu --quick` (the GPU check of issue 21) as `make gpu-check` runs it, on whatever this machine
has: every section's CPU-side part really runs (the cuda tests' subprocess, trainer vs bare loop, the shard loader,
inference), each GPU-only measurement says it was skipped, and the CSV holds the machine's facts and every
row. Timings are not checked here (bench/ and BENCHMARKS.md hold those)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT, run_env

SECTIONS = ("tests", "train", "input", "inference", "compile")


def run_bench(*args: str, timeout: float = 400) -> tuple[str, list[dict]]:
    """Run bench.gpu in a fresh interpreter; (its output, the rows of the CSV it says it wrote)."""
    p = subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=ROOT, env=run_env(), capture_output=True,
                       text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-8000:]}"
    wrote = re.findall(r"^wrote (\S+\.csv)", out, re.M)
    assert len(wrote) == 1, out[-4000:]
    path = Path(wrote[0])
    assert path.parent == ROOT / "bench" / "results" and path.name.startswith("gpu-"), path
    with open(path) as f:
        return out, list(csv.DictReader(f))


def test_quick_run_measures_the_cpu_side_and_names_what_it_skipped():
    out, rows = run_bench("--quick")
    cuda = torch.cuda.is_available()
    # every row carries the machine: card, driver (on CUDA), torch and its CUDA build, cores
    for r in rows:
        assert r["torch"] == torch.__version__ and r["torch_cuda"] == (torch.version.cuda or "")
        assert int(r["cores"]) >= 1
        assert r["gpu"] == (torch.cuda.get_device_name(0) if cuda else "none")
    skipped = {r["section"] for r in rows if r.get("skipped")}
    if not cuda:
        for section in SECTIONS:
            assert re.search(rf"^SKIPPED \(no CUDA\): {section}: ", out, re.M), f"no SKIPPED line for {section}\n{out}"
        assert set(SECTIONS) <= skipped
        assert "-quick.csv" in out

    # (a) the cuda tests ran in a subprocess (without CUDA they skip themselves; without the marker: said so)
    t = next(r for r in rows if r["section"] == "tests" and r["what"] == "pytest -m cuda" and not r.get("skipped"))
    assert float(t["seconds"]) > 0 and t["state"]
    assert int(t["tests_failed"]) == 0 and int(t["tests_errors"]) == 0, t

    # (b) the Trainer (both host-sync modes) and the bare loop trained: the same step-1 loss on the same batches
    train = {r["what"].split(": ", 1)[1]: r for r in rows if r["section"] == "train" and r.get("items_per_s")}
    assert set(train) == {"attrdist Trainer, run.host_sync=step", "attrdist Trainer, run.host_sync=lagged", "bare loop"}
    losses = [float(r["step1_loss"]) for r in train.values()]
    assert max(losses) - min(losses) <= 2e-3 * max(1.0, abs(losses[0])), losses
    assert all(float(r["items_per_s"]) > 0 for r in train.values())

    # (c) the loader delivered every image of its epochs through batch_images
    (inp,) = [r for r in rows if r["section"] == "input" and r.get("items_per_s") and r["decode"] == "workers"]
    assert int(inp["images_per_round"]) == 2 * (64 // 16) * 16 and float(inp["items_per_s"]) > 0

    # (d) inference: the product's three paths against the bare loop, and the CLI
    inf = {r["what"] for r in rows if r["section"] == "inference" and r.get("items_per_s")}
    assert {"bare", "measure_inference", "eval", "predict", "bare_e2e"} <= inf

    # the targets table: nothing failed; without CUDA no target is judged
    targets = [r for r in rows if r.get("verdict")]
    assert targets and not [r for r in targets if r["verdict"] == "ERROR"], targets
    judged = [r for r in targets if r["verdict"] in ("PASS", "FALLS SHORT", "FAIL")]
    assert cuda or not judged, judged
    assert "| what | target | measured (median) |" in out


def test_budget_skips_what_does_not_fit():
    out, rows = run_bench("--quick", "--budget-s", "1", "--sections", "tests,inference", timeout=120)
    for section in ("tests", "inference"):
        assert re.search(rf"^SKIPPED \(budget\): {section}: needs ~\d+ s", out, re.M), out
    assert {r["section"] for r in rows if r.get("skipped") == "budget"} == {"tests", "inference"}
    assert "=== tests" not in out and "=== inference" not in out
