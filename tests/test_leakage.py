"""Leakage detection: planted exact/near duplicates are found, distinct images are not, policies, speed."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from attrdist.errors import AttrdistError
from attrdist.pack.leakage import DEFAULT_MAX_DISTANCE, apply_policy, find_leaks, fingerprint
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
    assert rep["pairs"]["train|val"] == {"exact": 1, "near": 0}
    assert rep["exact"] == 1 and rep["near"] == 0
    assert rep["drop"] == {"val": ["0"]}
    assert rep["examples"][0] == {"a": "train/3", "b": "val/0", "distance": 0}


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
    assert {"a": "train/99", "b": "val/17", "distance": 2} in rep["examples"]
