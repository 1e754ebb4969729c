"""Leakage detection: planted exact/near duplicates are found, distinct images are not, policies, speed; the
pixel check that confirms the hash's candidates (copies kept, glyphs of other fonts let through), and a real
glyph set packed with --split-dirs (issue 18)."""

from __future__ import annotations

import io
import json
import logging
import string
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from attrdist.errors import AttrdistError
from attrdist.pack.leakage import (DEFAULT_MAX_DISTANCE, DEFAULT_MIN_SIMILARITY, MIRROR_MASK, apply_policy,
                                   contact_sheet, find_leaks, fingerprint, pixel_similarity, sheet_path)
from conftest import SHARED_DATA

pytestmark = pytest.mark.packers
COCO = sorted((SHARED_DATA / "coco" / "images").glob("*.jpg"))


def _enc(im, q=90):
    b = io.BytesIO()
    im.convert("RGB").save(b, "JPEG", quality=q)
    return b.getvalue()


AUGS = {
    "jpeg_q60": lambda im: _enc(im, 60),
    "resize_0.8": lambda im: _enc(im.resize((int(im.width * 0.8), int(im.height * 0.8)), Image.BILINEAR)),
    "crop_1%": lambda im: _enc(im.crop((im.width // 100, im.height // 100, im.width - im.width // 100, im.height - im.height // 100))),
    "brightness+10%": lambda im: _enc(ImageEnhance.Brightness(im).enhance(1.1)),
    "hflip": lambda im: _enc(ImageOps.mirror(im)),
}


def _items(split_files):
    return {s: [(f"{i}", *fingerprint(d)) for i, d in enumerate(files)] for s, files in split_files.items()}


@pytest.fixture(scope="module")
def photos():
    if len(COCO) < 8:
        pytest.skip("shared COCO photos not present")
    return [p.read_bytes() for p in COCO]


def test_exact_duplicates_found(photos):
    rep = find_leaks(_items({"train": photos[:8], "val": [photos[3], photos[9]], "test": photos[10:]}))
    assert rep["pairs"]["train|val"] == {"exact": 1, "near": 0, "near_unconfirmed": 0}
    assert rep["exact"] == 1 and rep["near"] == 0
    assert rep["drop"] == {"val": ["0"]}
    assert rep["examples"][0] == {"a": "train/3", "b": "val/0", "splits": "train|val", "distance": 0, "exact": True}


@pytest.mark.parametrize("aug", list(AUGS))
def test_near_duplicates_found(photos, aug):
    copies = [AUGS[aug](Image.open(io.BytesIO(d))) for d in photos[:8]]
    rep = find_leaks(_items({"train": photos, "val": copies}))
    assert rep["exact"] == 0
    # of these 8 photos, detected at the default distance (measured; see attrdist/pack/leakage.py docstring)
    need = {"jpeg_q60": 8, "brightness+10%": 8, "hflip": 7, "resize_0.8": 5, "crop_1%": 5}[aug]
    assert rep["pairs"]["train|val"]["near"] >= need, rep
    assert {e["a"].split("/")[1] for e in rep["examples"]} <= {str(i) for i in range(8)}


def test_distinct_photos_no_leak(photos):
    half = len(photos) // 2
    rep = find_leaks(_items({"train": photos[:half], "val": photos[half:]}))
    assert rep["exact"] == 0 and rep["near"] == 0


def test_distinct_demo_no_leak(tmp_path):
    from attrdist.demo.scenes import DemoSpec, ensure_demo

    root = ensure_demo(tmp_path / "demo", DemoSpec(n_train=400, n_val=100, n_test=100), progress=False)
    files = {s: [p.read_bytes() for p in sorted((root / "images" / s).glob("*.jpg"))] for s in ("train", "val", "test")}
    rep = find_leaks(_items(files))
    assert rep["exact"] == 0 and rep["near"] == 0, rep["examples"]


def test_undecodable_raises():
    with pytest.raises(Exception):
        fingerprint(b"not an image")


def _leaky():
    return find_leaks({"train": [("a", "s1", 0), ("b", "s2", 2**64 - 1)], "val": [("c", "s1", 0), ("d", "s9", 2**64 - 2)],
                       "test": [("e", "s3", 12345)]})


def test_policies():
    rep = _leaky()
    assert rep["exact"] == 1 and rep["near"] == 1 and rep["drop"] == {"val": ["c", "d"]}
    with pytest.raises(AttrdistError) as e:
        apply_policy(rep, "error", "/out/dir")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("/out/dir: ") and "--on-leak=warn|drop" in msg and "train/a" in msg
    assert apply_policy(rep, "warn", "/out/dir") == {}
    assert apply_policy(rep, "drop", "/out/dir") == {"val": {"c", "d"}}
    clean = find_leaks({"train": [("a", "s1", 0)], "val": [("b", "s2", 2**64 - 1)]})
    assert apply_policy(clean, "error", "x") == {} and apply_policy(clean, "drop", "x") == {}
    assert DEFAULT_MAX_DISTANCE >= 0


def test_find_leaks_is_fast():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2**63, size=(2, 100_000), dtype=np.int64).tolist()
    b[17] = a[99] ^ 0b11
    items = {"train": [(str(i), f"a{i}", h) for i, h in enumerate(a)], "val": [(str(i), f"b{i}", h) for i, h in enumerate(b)]}
    t = time.perf_counter()
    rep = find_leaks(items)
    dt = time.perf_counter() - t
    print(f"find_leaks 2 x 100k: {dt:.2f} s")
    assert dt < 30
    assert {"a": "train/99", "b": "val/17", "splits": "train|val", "distance": 2} in rep["examples"]


# ------------------------------------------------------------------------------------------ the pixel check

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
SANS = ["DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSansCondensed",
        "DejaVuSansCondensed-Bold", "DejaVuSansCondensed-Oblique", "DejaVuSansCondensed-BoldOblique"]
SERIF = ["DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "DejaVuSerifCondensed",
         "DejaVuSerifCondensed-Bold", "DejaVuSerifCondensed-Italic", "DejaVuSerifCondensed-BoldItalic"]


def glyph(font: str, letter: str, pt: int = 36, size: int = 64) -> Image.Image:
    """A black capital, centred, on white (as bench/leak_confirm.py renders them)."""
    f = ImageFont.truetype(str(FONT_DIR / f"{font}.ttf"), pt)
    im = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = d.textbbox((0, 0), letter, font=f)
    d.text(((size - x0 - x1) / 2, (size - y0 - y1) / 2), letter, fill=0, font=f)
    return im


def _png(im) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def _distance(a: int, b: int) -> int:
    return min(bin(a ^ b).count("1"), bin(a ^ b ^ MIRROR_MASK).count("1"))


def _confirmed(split_files):
    """find_leaks with the pixel check, on in-memory files (check_leakage reads them from disk instead)."""
    def confirm(pairs):
        return [pixel_similarity(split_files[a[0]][int(a[1])], split_files[b[0]][int(b[1])]) for a, b in pairs]
    return find_leaks(_items(split_files), confirm=confirm)


needs_fonts = pytest.mark.skipif(not all((FONT_DIR / f"{f}.ttf").is_file() for f in SANS + SERIF),
                                 reason="DejaVu fonts not installed")


@pytest.mark.parametrize("aug", list(AUGS))
def test_pixel_check_keeps_every_copy_the_hash_finds(photos, aug):
    """Every augmented COCO copy the hash flags is confirmed by pixels (similarity >= 0.98; measured minimum
    0.99 over these augmentations, bench/leak_confirm.py), so the pixel check loses none of today's catches."""
    copies = [AUGS[aug](Image.open(io.BytesIO(d))) for d in photos[:8]]
    files = {"train": photos, "val": copies}
    hash_only, checked = find_leaks(_items(files)), _confirmed(files)
    assert checked["near"] == hash_only["near"] > 0 and checked["near_unconfirmed"] == 0, checked
    assert min(e["similarity"] for e in checked["examples"]) >= DEFAULT_MIN_SIMILARITY
    assert checked["min_similarity"] == DEFAULT_MIN_SIMILARITY and checked["drop"] == hash_only["drop"]


def test_pixel_check_keeps_demo_copies(tmp_path):
    from attrdist.demo.scenes import DemoSpec, ensure_demo

    root = ensure_demo(tmp_path / "demo", DemoSpec(n_train=8, n_val=30, n_test=8), progress=False)
    val = [p.read_bytes() for p in sorted((root / "images" / "val").glob("*.jpg"))]
    for aug in ("jpeg_q60", "brightness+10%", "hflip", "resize_0.8"):
        files = {"train": val, "val": [AUGS[aug](Image.open(io.BytesIO(d))) for d in val]}
        hash_only, checked = find_leaks(_items(files)), _confirmed(files)
        assert checked["near"] == hash_only["near"] > 0 and checked["near_unconfirmed"] == 0, (aug, checked)


@needs_fonts
def test_pixel_check_rejects_glyphs_of_other_fonts():
    """DejaVu Sans vs DejaVu Serif capitals (8 styles each, 36 pt in 64 px): the hash flags 6 pairs of different
    letters' shapes from different fonts; the pixel check confirms none (similarity <= 0.955)."""
    files = {"train": [_png(glyph(f, c)) for f in SANS for c in string.ascii_uppercase],
             "val": [_png(glyph(f, c)) for f in SERIF for c in string.ascii_uppercase]}
    hash_only, checked = find_leaks(_items(files)), _confirmed(files)
    assert hash_only["near"] >= 3  # the hash alone would refuse this pack
    assert checked["near"] == 0 and checked["near_unconfirmed"] == hash_only["near"] and checked["drop"] == {}
    assert max(e["similarity"] for e in checked["unconfirmed_examples"]) < DEFAULT_MIN_SIMILARITY - 0.02
    assert apply_policy(checked, "error", "x") == {}


@needs_fonts
def test_shared_outlines_are_confirmed():
    """The limit, measured: DejaVu Sans Mono draws some capitals as DejaVu Sans does ('F' at 56 pt: hash distance 1,
    similarity 0.999, 0.74 grey levels apart on average); no pixel check can tell those apart, so they
    are confirmed as copies. (bench/leak_confirm.py: 'shared outlines')"""
    a, b = _png(glyph("DejaVuSans", "F", 56)), _png(glyph("DejaVuSansMono", "F", 56))
    assert _distance(fingerprint(a)[1], fingerprint(b)[1]) <= DEFAULT_MAX_DISTANCE
    assert pixel_similarity(a, b) >= DEFAULT_MIN_SIMILARITY


def test_similarity_edge_cases():
    flat_a, flat_b = _png(Image.new("L", (40, 40), 10)), _png(Image.new("L", (40, 40), 200))
    noise = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)))
    assert pixel_similarity(flat_a, flat_b) == 1.0  # two featureless images: the same picture
    assert pixel_similarity(flat_a, noise) == 0.0
    assert pixel_similarity(noise, noise) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pixel_similarity(b"not an image", noise)


def test_contact_sheet_and_its_place(tmp_path):
    im = _png(Image.new("RGB", (300, 200), "red"))
    sheet = Image.open(io.BytesIO(contact_sheet([(im, None, "a/" * 60 + "x.png", "b.png", "distance 1"),
                                                 (im, im, "c.png", "d.png", "exact copy")])))
    assert sheet.format == "PNG" and sheet.height >= 2 * 128 and sheet.getpixel((8 + 64, 8 + 64)) == (255, 0, 0)
    assert sheet_path(tmp_path / "out") == tmp_path / "out.leaks.png"
    assert sheet_path(str(tmp_path / "out") + "/") == tmp_path / "out.leaks.png"


def test_policy_messages_name_files(caplog):
    rep = find_leaks({"train": [("t/R/a.png", "s1", 0, "/d/train/R/a.png"),
                                ("t/R/b.png", "s2", 2**64 - 1, "/d/train/R/b.png")],
                      "val": [("v/R/c.png", "s1", 0, "/d/val/R/c.png"),
                              ("v/R/d.png", "s9", 2**64 - 2, "/d/val/R/d.png")]},
                     confirm=lambda pairs: [0.99] * len(pairs))
    assert rep["drop_files"] == {"val": ["/d/val/R/c.png", "/d/val/R/d.png"]}
    with pytest.raises(AttrdistError) as e:
        apply_policy(rep, "error", "/d", sheet="/o.leaks.png")
    msg = str(e.value)
    assert "/d/train/R/a.png ~ /d/val/R/c.png (exact copy)" in msg and "similarity 0.990" in msg
    assert "side by side in /o.leaks.png" in msg and "given by the input" in msg and "\n" not in msg
    with caplog.at_level(logging.WARNING, logger="attrdist"):
        assert apply_policy(rep, "warn", "/d") == {}
        assert apply_policy(rep, "drop", "/d") == {"val": {"v/R/c.png", "v/R/d.png"}}
    warn, drop = (r.getMessage() for r in caplog.records)
    assert "/d/train/R/b.png ~ /d/val/R/d.png" in warn and "--on-leak=warn" in warn
    assert "dropping 2 images" in drop and "/d/val/R/c.png, /d/val/R/d.png" in drop


# ------------------------------------------------------------------------------------------ a real glyph set


def _main(*args):
    from tests.test_pack_imagefolder import main_inproc

    return main_inproc(*args)


@pytest.fixture(scope="module")
def glyph_root(tmp_path_factory):
    """root/<split>/<letter>/<font>.png: DejaVu Sans faces in train, DejaVu Serif faces in val, 64 px."""
    if not all((FONT_DIR / f"{f}.ttf").is_file() for f in SANS + SERIF):
        pytest.skip("DejaVu fonts not installed")
    root = tmp_path_factory.mktemp("glyphs") / "letters"
    for split, fonts in (("train", SANS), ("val", SERIF)):
        for c in string.ascii_uppercase:
            (root / split / c).mkdir(parents=True)
            for f in fonts:
                glyph(f, c).save(root / split / c / f"{f}.png")
    return root


def test_glyph_set_packs_with_split_dirs(glyph_root, tmp_path):
    """The issue's case: glyphs of unrelated fonts that the hash alone flags pack with the default --on-leak error;
    the candidates are reported, the summary gives no group counts."""
    out = tmp_path / "out"
    p = _main("--root", glyph_root, "--out", out, "--split-dirs", "--workers", 2)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "manifest.json").read_text())
    leak = m["report"]["leakage"]
    assert leak["exact"] == leak["near"] == 0 and leak["near_unconfirmed"] >= 3, leak
    assert all(e["similarity"] < DEFAULT_MIN_SIMILARITY for e in leak["unconfirmed_examples"])
    assert leak["unconfirmed_examples"][0]["a"].startswith(str(glyph_root / "train"))
    assert m["splits"]["train"]["nsamples"] == m["splits"]["val"]["nsamples"] == 26 * 8
    assert "groups" not in m["report"]["train"] and m["options"]["group_by"] is None
    assert "train: packed 208 of 208 files; dropped" in p.stdout and "groups" not in p.stdout
    assert not sheet_path(out).exists()


def test_glyph_copy_is_caught(glyph_root, tmp_path):
    """A genuine copy (a train glyph brightened and saved as JPEG in val) is still refused: the message names both
    files by path (no repeated split folder), the contact sheet beside the output, advice for given splits."""
    root = tmp_path / "letters"
    import shutil

    shutil.copytree(glyph_root, root)
    src = root / "train" / "R" / "DejaVuSans.png"
    ImageEnhance.Brightness(Image.open(src).convert("RGB")).enhance(0.85).save(root / "val" / "R" / "scan.jpg",
                                                                              quality=80)
    out = tmp_path / "out"
    p = _main("--root", root, "--out", out, "--split-dirs", "--workers", 2)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    err = p.stderr
    assert f"{src} ~ {root / 'val' / 'R' / 'scan.jpg'} (distance" in err and "/train/train/" not in err
    sheet = sheet_path(out)
    assert f"side by side in {sheet}" in err and Image.open(sheet).format == "PNG"
    assert "given by the input" in err and "--on-leak=warn|drop" in err and "--group-by" not in err
    assert not out.exists()
    # drop: the copy goes, named on stderr (the log line; a real process, where no logging is set up) and in the
    # manifest; the unrelated fonts stay
    from tests.test_pack_imagefolder import cli

    p = cli("--root", root, "--out", out, "--split-dirs", "--workers", 2, "--on-leak", "drop")
    assert p.returncode == 0, p.stderr
    assert "dropping 1 images" in p.stderr and str(root / "val" / "R" / "scan.jpg") in p.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["report"]["leakage"]["drop_files"] == {"val": [str(root / "val" / "R" / "scan.jpg")]}
    assert m["report"]["val"]["dropped"]["leak"] == 1 and m["splits"]["val"]["nsamples"] == 26 * 8
    # once the copy is gone the stale sheet goes too
    (root / "val" / "R" / "scan.jpg").unlink()
    assert _main("--root", root, "--out", out, "--split-dirs", "--workers", 2, "--overwrite").returncode == 0
    assert not sheet.exists()


def test_split_dirs_refuses_split_options(glyph_root, tmp_path):
    from tests.test_pack_imagefolder import assert_one_line_error

    out = tmp_path / "out"
    for extra, name in ((("--group-by", "none"), "--group-by"), (("--val", "0.1"), "--val"),
                        (("--seed", "3"), "--seed"), (("--group-parts", "1"), "--group-parts")):
        assert_one_line_error(_main("--root", glyph_root, "--out", out, "--split-dirs", *extra), "--split-dirs", name)
    assert not out.exists()
