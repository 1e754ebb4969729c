"""`attrdist inspect`: summary counts, contact sheet, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, run_env

pytestmark = pytest.mark.packers


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "attrdist.cli", "inspect", *map(str, args)], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=120)


def test_summary_counts(small_shards):
    p = _cli(small_shards)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    for split, n in (("train", 96), ("val", 32), ("test", 32)):
        assert any(line.split()[:2] == [split, str(n)] for line in lines), p.stdout
    assert "test-demo" in p.stdout and "label frequencies" in p.stdout


def test_sheet(small_shards, tmp_path):
    out = tmp_path / "sheet.png"
    p = _cli(small_shards, "--sheet", out, "--n", 10, "--split", "val", "--seed", 1)
    assert p.returncode == 0, p.stderr
    from attrdist.pack.inspect import contact_sheet  # noqa: F401 (same layout rules as the CLI)

    im = Image.open(out)
    assert im.format == "PNG" and im.size == (8 * 230 + 6, 2 * (224 + 86 + 6) + 6)
    assert not list(tmp_path.glob(".*tmp*"))


def test_sheet_with_boxes(tmp_path):
    import io

    from attrdist.pack.inspect import contact_sheet
    from attrdist.pack.writer import PackWriter

    buf = io.BytesIO()
    Image.new("RGB", (100, 60), (0, 90, 0)).save(buf, "JPEG")
    with PackWriter(tmp_path / "p", dataset="x", attributes=["cat", "dog"], label_fields=["labels"]) as w:
        w.add("train", "k0", {"jpg": buf.getvalue(), "json": {"id": 1, "labels": [1], "boxes": [[10, 10, 30, 20]], "box_labels": [0]}})
        w.commit(sources=[], options={})
    size = contact_sheet(tmp_path / "p", tmp_path / "s.png", n=5)
    assert Image.open(tmp_path / "s.png").size == size == (236, 322)


def test_errors(tmp_path, small_shards):
    p = _cli(tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("attrdist: error: ") and len(p.stderr.strip().splitlines()) == 1
    p = _cli(small_shards, "--sheet", tmp_path / "s.png", "--split", "nope")
    assert p.returncode == 2 and p.stderr.startswith("attrdist: error: ") and len(p.stderr.strip().splitlines()) == 1
