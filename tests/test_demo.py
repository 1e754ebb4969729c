"""attrdist.demo.scenes: deterministic COCO-format demo data with true attributes and weak captions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attrdist.demo import scenes as demo_mod
from attrdist.demo.scenes import (DEMO_ATTRIBUTES, SPLITS, DemoSpec, _generate_one, ensure_demo,
                           make_captions, render_scene, true_attributes)
from attrdist.errors import AttrdistError
from attrdist.pack.vocab import load_vocabulary

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = DemoSpec(seed=7, n_train=40, n_val=10, n_test=10)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return ensure_demo(tmp_path_factory.mktemp("demo") / "root", SMALL, progress=False)


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary(RECIPES / "coconut_demo_vocab.json")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_determinism(small_root, tmp_path):
    other = ensure_demo(tmp_path / "again", SMALL, progress=False)
    a, b = files(small_root), files(other)
    assert a.keys() == b.keys() and a == b
    n_img = sum(1 for k in a if k.startswith("images/"))
    assert n_img == 60
    for s in SPLITS:
        assert f"annotations/instances_{s}.json" in a and f"annotations/captions_{s}.json" in a
    assert a["DEMO_VERSION"].decode().startswith(demo_mod.DEMO_VERSION)
    # a different seed gives different images
    c = ensure_demo(tmp_path / "seed8", DemoSpec(seed=8, n_train=3, n_val=0, n_test=0), progress=False)
    d = ensure_demo(tmp_path / "seed7", DemoSpec(seed=7, n_train=3, n_val=0, n_test=0), progress=False)
    img = "images/train/000010000001.jpg"
    assert (c / img).read_bytes() != (d / img).read_bytes()
    assert (d / img).read_bytes() == a[img]  # an image depends on (seed, split, index) only
    # no temporary directories left beside the roots
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
def test_pycocotools_loads(small_root):
    from pycocotools.coco import COCO

    ids = set()
    for s in SPLITS:
        inst = COCO(str(small_root / "annotations" / f"instances_{s}.json"))
        caps = COCO(str(small_root / "annotations" / f"captions_{s}.json"))
        assert len(inst.getImgIds()) == SMALL.n(s)
        assert [c["name"] for c in inst.loadCats(inst.getCatIds())] == list(demo_mod.SHAPES)
        assert sorted(caps.getImgIds()) == sorted(inst.getImgIds())
        ids |= set(inst.getImgIds())
        for iid in inst.getImgIds():
            info = inst.loadImgs(iid)[0]
            assert info["file_name"] == f"{s}/{iid:012d}.jpg"
            assert (small_root / "images" / info["file_name"]).is_file()
            assert len(info["attributes"]) == 2
            anns = inst.loadAnns(inst.getAnnIds(imgIds=iid))
            assert 1 <= len(anns) <= 4
            count = {1: "single", 2: "pair"}.get(len(anns), "many")
            assert info["attributes"][0] == count
            for a in anns:
                x, y, w, h = a["bbox"]
                assert 0 <= x and 0 <= y and x + w <= 80 and y + h <= 80 and a["area"] > 0
                assert a["iscrowd"] == 0 and len(a["segmentation"][0]) >= 6
                assert demo_mod.SHAPES[a["category_id"] - 1] == a["attributes"][0]
                assert inst.annToMask(a).sum() > 0
            assert len(caps.loadAnns(caps.getAnnIds(imgIds=iid))) == 2
    assert len(ids) == SMALL.n_train + SMALL.n_val + SMALL.n_test  # unique across splits


def test_images_are_valid_jpegs(small_root):
    for p in sorted((small_root / "images").rglob("*.jpg")):
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (80, 80) and im.mode == "RGB"
            im.load()


def test_captions_are_weak_but_never_false(vocab):
    """Over 400 scenes: caption labels are a subset of the truth; per-attribute recall 0.5-0.9."""
    assert vocab.names == DEMO_ATTRIBUTES
    n = 400
    truth = np.zeros((n, len(DEMO_ATTRIBUTES)), np.uint8)
    weak = np.zeros_like(truth)
    for i in range(n):
        _, objects, image_attrs, caps = _generate_one(123, "train", i, 80)
        t = set(true_attributes(image_attrs, objects))
        truth[i] = [a in t for a in DEMO_ATTRIBUTES]
        weak[i] = vocab.labels(caps)
        false = [a for a, w, tt in zip(DEMO_ATTRIBUTES, weak[i], truth[i]) if w and not tt]
        assert not false, (caps, sorted(t), false)
    pos = truth.sum(0)
    assert (pos >= 30).all(), dict(zip(DEMO_ATTRIBUTES, pos.tolist()))
    recall = (weak & truth).sum(0) / pos
    bad = {a: round(float(r), 3) for a, r in zip(DEMO_ATTRIBUTES, recall) if not 0.5 <= r <= 0.9}
    assert not bad, bad


def test_render_and_captions_are_pure():
    def gen(seed):
        rng = np.random.Generator(np.random.PCG64(seed))
        img, objs, attrs = render_scene(rng, 80)
        return np.asarray(img), objs, attrs, make_captions(rng, objs, attrs, n=3)

    a, b = gen(5), gen(5)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert len(a[3]) == 3 and all(c.endswith(".") and c[0].isupper() for c in a[3])
    assert a[2][1] in demo_mod.BACKGROUNDS
    for o in a[1]:
        assert o["shape"] in demo_mod.SHAPES and o["colour"] in demo_mod.COLOURS
        assert o["visible"] >= 0.8 - 1e-6


def test_cache_reuse(small_root):
    marker = small_root / "DEMO_VERSION"
    img = next((small_root / "images" / "train").glob("*.jpg"))
    before = (marker.stat().st_mtime_ns, img.stat().st_mtime_ns)
    assert ensure_demo(small_root, SMALL, progress=False) == small_root
    assert (marker.stat().st_mtime_ns, img.stat().st_mtime_ns) == before


def test_default_root_uses_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRDIST_CACHE", str(tmp_path / "cache"))
    spec = DemoSpec(n_train=2, n_val=1, n_test=1)
    root = ensure_demo(spec=spec, progress=False)
    assert root.parent == tmp_path / "cache" / "demo" and (root / "DEMO_VERSION").is_file()
    assert root == demo_mod.default_demo_root(spec)
    assert demo_mod.default_demo_root(DemoSpec(seed=1)) != demo_mod.default_demo_root(DemoSpec())


def test_crash_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("crash")

    monkeypatch.setattr(demo_mod, "_write_split", boom)
    with pytest.raises(RuntimeError):
        ensure_demo(tmp_path / "root", DemoSpec(n_train=2, n_val=1, n_test=1), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_generator_loses_gracefully(tmp_path, monkeypatch):
    spec = DemoSpec(n_train=2, n_val=1, n_test=1)
    root = tmp_path / "root"
    real = demo_mod._write_split
    state = {"raced": False}

    def racing(tmp, spec_, split, bar):
        if not state["raced"]:  # another process finishes first, while we are writing
            state["raced"] = True
            ensure_demo(root, spec, progress=False)
        return real(tmp, spec_, split, bar)

    monkeypatch.setattr(demo_mod, "_write_split", racing)
    assert ensure_demo(root, spec, progress=False) == root
    assert (root / "DEMO_VERSION").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["root"]


def test_bad_roots(tmp_path):
    spec = DemoSpec(n_train=2, n_val=1, n_test=1)
    root = ensure_demo(tmp_path / "r", spec, progress=False)
    with pytest.raises(AttrdistError, match="DEMO_VERSION"):
        ensure_demo(root, DemoSpec(seed=3, n_train=2, n_val=1, n_test=1), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(AttrdistError, match="not a demo dataset"):
        ensure_demo(other, spec, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ensure_demo(empty, spec, progress=False) / "DEMO_VERSION").is_file()


def test_cli(tmp_path, capsys):
    rc = demo_mod.main(["--root", str(tmp_path / "cli"), "--seed", "2", "--n-train", "3",
                        "--n-val", "1", "--n-test", "1", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "cli")
    meta = json.loads((tmp_path / "cli" / "DEMO_VERSION").read_text().splitlines()[1])
    assert meta["seed"] == 2 and meta["n_train"] == 3
    assert len(os.listdir(tmp_path / "cli" / "images" / "train")) == 3
