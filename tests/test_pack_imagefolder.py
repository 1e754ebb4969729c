"""Image-folder packer (experiment 5): seeded group-aware split, CSV groups, --split-dirs, corrupt
files counted, and the leakage check catching augmented copies packed without group ids."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from attrdist.errors import AttrdistError
from attrdist.data.reader import FORMAT, ShardReader, load_manifest
from tests.conftest import ROOT, assert_one_line_error, packer_main, run_env

pytestmark = pytest.mark.packers
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
CLASSES = ["A", "B", "C", "D"]


def render(letter: str, seed: int, size: int = 96) -> Image.Image:
    """A letter on a distinct smooth random background (distinct perceptual hashes per seed)."""
    rng = np.random.default_rng(seed)
    bg = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    d = ImageDraw.Draw(bg)
    try:
        font = ImageFont.truetype(FONT, int(rng.integers(40, 70)))
    except OSError:
        font = ImageFont.load_default()
    xy = tuple(int(v) for v in rng.integers(5, 30, 2))
    d.text(xy, letter, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), font=font)
    return bg


def save(im: Image.Image, path: Path, fmt: str = "JPEG", **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.convert("RGB").save(path, format=fmt, **kw)


def make_folder(root: Path, sources: int = 6, augs: int = 3) -> Path:
    """root/<class>/<class>_<src>_aug<k>.jpg|png: `augs` re-encoded/brightened copies of each source."""
    for ci, c in enumerate(CLASSES):
        for s in range(sources):
            im = render(c, 100 * ci + s)
            for k in range(augs):
                v = ImageEnhance.Brightness(im).enhance(1.0 + 0.05 * k)
                fmt, ext = ("PNG", "png") if (s + k) % 3 == 0 else ("JPEG", "jpg")
                save(v, root / c / f"{c}_{s:04d}_aug{k}.{ext}", fmt)
    return root


def pack(root, out, **kw):
    from attrdist.pack.imagefolder import pack_imagefolder

    return pack_imagefolder(root, out, workers=kw.pop("workers", 2), progress=False, **kw)


def samples(out: Path, split: str) -> list[dict]:
    r = ShardReader(load_manifest(out), split)
    return [json.loads(r[i]["json"]) for i in range(len(r))]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "shards" / "imagefolder.py"), *map(str, args), "--quiet"],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)


def main_inproc(*args) -> subprocess.CompletedProcess:
    return packer_main("imagefolder", *args)


# ---------------------------------------------------------------------------------------------


def test_group_split_unit():
    from attrdist.pack.imagefolder import ImageFile, group_split, prefix_group

    assert prefix_group("cat/A_0012_aug3.jpg") == "A_0012"
    assert prefix_group("x/A-1-b.png", "-", 1) == "A" and prefix_group("x/plain.jpg") == "plain"
    files = [ImageFile(f"{c}/{c}{g}_{k}.jpg", c, f"{c}{g}") for c in "xyz" for g in range(20) for k in range(1 + g % 3)]
    fr = {"train": 0.7, "val": 0.2, "test": 0.1}
    a = group_split(files, fr, seed=1)
    b = group_split(list(reversed(files)), fr, seed=1)
    assert a == b  # a function of the file set, not its order
    assert group_split(files, fr, seed=2) != a
    where = {}
    for s, fs in a.items():
        for f in fs:
            assert where.setdefault(f.group, s) == s  # groups never straddle splits
    for c in "xyz":  # stratified: each class close to its target share
        n = sum(f.cls == c for f in files)
        for s, frac in fr.items():
            got = sum(f.cls == c for f in a[s])
            assert abs(got - frac * n) <= 3, (c, s, got, frac * n)


def test_prefix_groups_cli(tmp_path):
    root = make_folder(tmp_path / "exp5")
    (root / "A" / "broken.jpg").write_bytes((root / "A" / "A_0001_aug1.jpg").read_bytes()[:300])  # truncated JPEG
    (root / "B" / "notes.jpg").write_text("not an image")
    (root / "C" / "README.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out"
    p = cli("--root", root, "--out", out, "--val", 0.25, "--seed", 3, "--workers", 2, "--max-dropped", 0.15)
    assert p.returncode == 0, p.stderr
    m = load_manifest(out).data
    assert m["attributes"] == CLASSES and m["dataset"] == "imagefolder"
    rep = m["report"]
    assert rep["scan"]["skipped_files"] == {"not_an_image_extension": 1}
    dropped = {k: rep["train"]["dropped"].get(k, 0) + rep["val"]["dropped"].get(k, 0)
               for k in ("corrupt_image", "not_an_image")}
    assert dropped == {"corrupt_image": 1, "not_an_image": 1}
    assert rep["leakage"]["exact"] == rep["leakage"]["near"] == 0  # the prefix groups kept copies together
    tr, va = samples(out, "train"), samples(out, "val")
    assert len(tr) + len(va) == 4 * 6 * 3
    assert not {s["group"] for s in tr} & {s["group"] for s in va}
    for c in CLASSES:  # stratified: 6 groups per class, 25% -> 1-2 val groups each
        nval = len({s["group"] for s in va if s["class"] == c})
        assert 1 <= nval <= 2, (c, nval)
    for s in tr + va:
        assert s["labels"] == [CLASSES.index(s["class"])] and s["id"].startswith(f"{s['class']}/")
        assert s["group"] == "_".join(Path(s["id"]).stem.split("_")[:2])
    # PNG stays PNG, bytes copied through
    r = ShardReader(load_manifest(out), "train")
    for i in range(len(r)):
        rec, meta = r[i], json.loads(r[i]["json"])
        ext = "png" if meta["id"].endswith(".png") else "jpg"
        assert rec[ext] == (root / meta["id"]).read_bytes()
    # deterministic: same seed, same split
    m2 = pack(root, tmp_path / "out2", val=0.25, seed=3, max_dropped=0.15)
    assert [s["id"] for s in samples(tmp_path / "out2", "val")] == [s["id"] for s in va]
    assert m2["splits"]["val"]["nsamples"] == len(va)


def _augment(im: Image.Image, kind: str) -> Image.Image:
    if kind == "flip":
        return ImageOps.mirror(im)
    if kind == "brightness":
        return ImageEnhance.Brightness(im).enhance(1.15)
    if kind == "crop":
        w, h = im.size
        return im.crop((3, 3, w - 3, h - 3)).resize((w, h), Image.BICUBIC)
    if kind == "rotate":
        return im.rotate(10, resample=Image.BICUBIC)
    return im  # "reencode": saved again below at another quality


PHOTOMETRIC = ("reencode", "brightness", "flip")
GEOMETRIC = ("crop", "rotate")


def make_leaky(root: Path) -> tuple[Path, dict]:
    """Experiment 5's mistake: offline-augmented copies with unrelated names and no group ids."""
    n = 0
    origin = {}
    for ci, c in enumerate(CLASSES):
        for s in range(5):
            im = render(c, 1000 + 10 * ci + s, size=128)
            for kind in ("orig",) + PHOTOMETRIC + GEOMETRIC:
                name = f"{c}/img{(n * 7919) % 1000:03d}.jpg"  # unrelated file names: no usable prefix
                n += 1
                save(_augment(im, kind), root / name, quality=95 if kind == "orig" else 70)
                origin[name] = (f"{c}{s}", kind)
    return root, origin


def test_leak_of_augmented_copies(tmp_path):
    root, origin = make_leaky(tmp_path / "leaky")
    out = tmp_path / "out"
    # the default policy refuses: one line naming the root
    p = main_inproc("--root", root, "--out", out, "--group-by", "none", "--val", 0.3, "--workers", 2)
    assert_one_line_error(p, str(root), "near-duplicate", "--on-leak", "same group", "--group-by csv")
    assert not out.exists()
    # drop: the val copies of sources that also have a copy in train go
    m = pack(root, out, group_by="none", val=0.3, on_leak="drop")
    leak = m["report"]["leakage"]
    dropped_val = set(leak["drop"].get("val", []))
    assert m["report"]["val"]["dropped"]["leak"] == len(dropped_val) > 0
    kept_val = {s["id"] for s in samples(out, "val")}
    assert not kept_val & dropped_val
    # the copies that were caught are the later-split (val) halves of cross-split pairs
    assert all(origin[k][0] in {origin[s["id"]][0] for s in samples(out, "train")} for k in dropped_val)
    # warn keeps everything and stores the report
    m = pack(root, tmp_path / "warn", group_by="none", val=0.3, on_leak="warn")
    assert m["report"]["leakage"]["near"] + m["report"]["leakage"]["exact"] > 0
    assert "leak" not in m["report"]["val"]["dropped"]
    # with group ids (CSV: path,group = source), the group split prevents the leak altogether
    csv = tmp_path / "groups.csv"
    csv.write_text("path,group\n" + "".join(f"{k},{v[0]}\n" for k, v in origin.items()))
    m = pack(root, tmp_path / "grouped", group_by="csv", groups_csv=csv, val=0.3)
    assert m["report"]["leakage"]["exact"] + m["report"]["leakage"]["near"] == 0
    assert m["report"]["val"]["packed"] > 0


def test_split_dirs_and_max_side(tmp_path):
    root = tmp_path / "official"
    for split, n in (("train", 3), ("val", 2)):
        for ci, c in enumerate(CLASSES[:3]):
            for k in range(n):
                save(render(c, 5000 + 100 * ci + 10 * n + k, size=120), root / split / c / f"{c}{k}.jpg")
    save(render("D", 7777, size=120), root / "val" / "D" / "d0.bmp", fmt="BMP")  # a class only in val, BMP
    out = tmp_path / "out"
    m = pack(root, out, split_dirs=True, max_side=60)
    assert m["attributes"] == CLASSES and list(m["splits"]) == ["train", "val"]
    tr, va = samples(out, "train"), samples(out, "val")
    assert len(tr) == 9 and len(va) == 7
    assert all(s["id"].startswith("train/") for s in tr) and all(s["id"].startswith("val/") for s in va)
    assert all(s["group"] is None for s in tr + va) and "groups" not in m["report"]["val"]  # the folders split
    assert {s["class"] for s in va} == set(CLASSES) and [s["labels"] for s in va if s["class"] == "D"] == [[3]]
    r = ShardReader(load_manifest(out), "val")
    for i in range(len(r)):
        rec = r[i]
        im = Image.open(io.BytesIO(rec["jpg"]))
        assert im.format == "JPEG" and im.size == (60, 60) and json.loads(rec["json"])["width"] == 60


def test_bad_inputs(tmp_path):
    root = make_folder(tmp_path / "exp5", sources=2, augs=1)
    out = tmp_path / "out"
    csv = tmp_path / "g.csv"
    csv.write_text("path,group\n../../etc/passwd,x\n")
    assert_one_line_error(main_inproc("--root", root, "--out", out, "--group-by", "csv", "--groups", csv),
                          "g.csv", "..")
    csv.write_text("path,group\n/abs/A_0000_aug0.jpg,x\n")
    assert_one_line_error(main_inproc("--root", root, "--out", out, "--group-by", "csv", "--groups", csv),
                          "g.csv", "absolute")
    csv.write_text("file;grp\nA/A_0000_aug0.jpg;x\n")
    assert_one_line_error(main_inproc("--root", root, "--out", out, "--group-by", "csv", "--groups", csv),
                          "g.csv", "path,group")
    csv.write_text("path,group\nA/A_0000_aug0.jpg,x\n")
    assert_one_line_error(main_inproc("--root", root, "--out", out, "--group-by", "csv", "--groups", csv),
                          "g.csv", "no group row")
    assert_one_line_error(main_inproc("--root", root, "--out", out, "--group-by", "csv", "--groups",
                                      tmp_path / "missing.csv"), "missing.csv")
    assert_one_line_error(main_inproc("--root", tmp_path / "nope", "--out", out), "nope")
    assert_one_line_error(main_inproc("--root", root, "--out", out, "--val", 0.7, "--test", 0.4), "--val")
    assert_one_line_error(main_inproc("--root", root, "--out", out, "--split-dirs"), "--split-dirs")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": FORMAT, "dataset": "dior", "splits": {}}))
    assert_one_line_error(main_inproc("--root", root, "--out", other), "'dior'", "--overwrite")
    assert main_inproc("--root", root, "--out", other, "--overwrite", "--workers", 1, "--val", 0).returncode == 0
    assert load_manifest(other).data["dataset"] == "imagefolder"
    # a real subprocess failing: one line on stderr, exit 2
    assert_one_line_error(cli("--root", tmp_path / "nope", "--out", out), "nope")
    with pytest.raises(AttrdistError):
        pack(root, out, group_by="prefix", group_parts=0)
    assert not out.exists()


@pytest.mark.xfail(reason="attrdist.pack.leakage at its default max_distance=2 misses some re-encoded/brightened copies of "
                          "these smooth synthetic images (measured: q95->q70 re-encode 0-5 bits, brightness +15% "
                          "1-10 bits, rotation 10 deg 16-33 bits); group ids remain the real fix", strict=False)
def test_leak_catches_every_photometric_copy(tmp_path):
    root, origin = make_leaky(tmp_path / "leaky")
    out = tmp_path / "out"
    pack(root, out, group_by="none", val=0.3, on_leak="drop")
    plain = ("orig",) + PHOTOMETRIC
    train_plain = {origin[s["id"]][0] for s in samples(out, "train") if origin[s["id"]][1] in plain}
    missed = sorted(origin[s["id"]] for s in samples(out, "val")
                    if origin[s["id"]][0] in train_plain and origin[s["id"]][1] in plain)
    assert not missed, missed
