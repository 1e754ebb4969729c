"""run.malloc=keep (`attrdist.malloc.tune_malloc`): big tensors stop costing a page fault per 4 KiB page, in the
training process and in the data workers. Page-fault counts are exact, unlike timings (those are in bench/)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc")

SCRIPT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {root!r})
    import torch
    from torch.utils.data import Dataset
    from attrdist.core.order import BatchPlan
    from attrdist.data.loader import make_loader
    from attrdist.malloc import tune_malloc

    def faults_of_64mib_tensors(n=10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            torch.empty(16 << 20).fill_(1.0)  # 64 MiB, freed at once
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // n

    class Faults(Dataset):
        def __len__(self):
            return 2
        def __getitem__(self, item):
            faults_of_64mib_tensors()  # warm, as a worker's first images are
            return {{"index": faults_of_64mib_tensors(), "valid": True}}

    where, mode = sys.argv[1], sys.argv[2]
    if where == "process":
        applied = tune_malloc(mode)
        faults_of_64mib_tensors()  # warm: the heap grows to hold one
        print(int(applied), faults_of_64mib_tensors())
    else:  # a worker of attrdist's loader, forked from this untuned process
        plan = BatchPlan(2, 2, 1, 0, 0, 0, shuffle=False, drop_last=True)
        batch = next(iter(make_loader(Faults(), plan, num_workers=1, malloc=mode)))
        print(-1, int(batch["index"].max()))
""")


def faults(tmp_path: Path, where: str, mode: str) -> tuple[int, int]:
    script = tmp_path / "faults.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    p = subprocess.run([sys.executable, str(script), where, mode], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    applied, n = (int(x) for x in p.stdout.split())
    return applied, n


def test_keep_serves_big_tensors_without_page_faults_in_the_process(tmp_path):
    applied, kept = faults(tmp_path, "process", "keep")
    assert applied == 1
    _, system = faults(tmp_path, "process", "system")
    print(f"page faults per 64 MiB tensor: keep {kept}, system {system}")
    assert system > 10_000  # 16,384 pages of 4 KiB, each faulted in and zero-filled
    assert kept < 100


def test_the_loader_tunes_its_workers(tmp_path):
    _, kept = faults(tmp_path, "worker", "keep")
    _, system = faults(tmp_path, "worker", "system")
    print(f"page faults per 64 MiB tensor in a data worker: keep {kept}, system {system}")
    assert system > 10_000 and kept < 100
