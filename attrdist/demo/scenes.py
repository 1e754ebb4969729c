"""The built-in demo dataset: procedural shapes with learnable attributes and weak captions.

Every recipe runs with no data configured on this dataset. It is written in real COCO formats
(instances + captions JSON, JPEG files), so the same loaders serve the demo and real data:

    <root>/images/<split>/<image_id:012d>.jpg        splits: train, val, test
    <root>/annotations/instances_<split>.json         COCO instances (4 shape categories);
        images[i]["attributes"] = image-level attributes (count word, background),
        annotations[j]["attributes"] = object-level attributes (shape, colour, size, texture)
    <root>/annotations/captions_<split>.json          COCO captions, 2 per image
    <root>/DEMO_VERSION                               written last: version string + spec

Scene: an 80x80 image, one of 4 noisy backgrounds (sky, grass, sand, night) with 1-4 objects,
each a shape (circle, square, triangle, cross), a colour (red, yellow, blue, purple, white,
orange), a size (small ~14-18 px, large ~28-34 px) and a texture (plain, striped, dotted).
An image's true attributes are the union of its objects' attributes, its count word (single,
pair, many) and its background: 21 attributes, `DEMO_ATTRIBUTES`, in the order of
`recipes/coconut_demo_vocab.json`.

Captions mention only some attributes (each mention omitted with probability ~0.4-0.45, replaced
by a synonym with probability ~0.3, sometimes describing only some objects), so labels mined
from them through the vocabulary are weak: incomplete, but never false (no word in a caption
names an attribute that is absent). The pixels are drawn from the scene, never from the text.

Everything is a pure function of (seed, split, index): numpy Generator(PCG64) per image, JPEG
quality 90 with fixed options, fixed JSON metadata, so the same spec gives identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from attrdist.cache import cache_dir
from attrdist.errors import AttrdistError, user_errors

__all__ = [
    "DEMO_ATTRIBUTES", "DEMO_VERSION", "SPLITS", "SHAPES", "COLOURS", "BACKGROUNDS",
    "DemoSpec", "ensure_demo", "render_scene", "make_captions", "true_attributes",
    "default_demo_root",
]

DEMO_VERSION = "attrdist-demo 1"

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "yellow", "blue", "purple", "white", "orange")
SIZES = ("small", "large")
TEXTURES = ("striped", "dotted")  # "plain" has no attribute
COUNTS = ("single", "pair", "many")
BACKGROUNDS = ("sky", "grass", "sand", "night")
DEMO_ATTRIBUTES: tuple[str, ...] = SHAPES + COLOURS + SIZES + TEXTURES + COUNTS + BACKGROUNDS

SPLITS = ("train", "val", "test")

_RGB = {
    "red": (225, 35, 35), "yellow": (250, 222, 30), "blue": (35, 80, 235),
    "purple": (150, 45, 210), "white": (246, 246, 246), "orange": (255, 140, 0),
}
_BG_RGB = {"sky": (150, 200, 248), "grass": (62, 150, 62), "sand": (222, 198, 150),
           "night": (18, 18, 30)}
_SS = 4  # supersampling factor for shape masks


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 0
    n_train: int = 2400
    n_val: int = 400
    n_test: int = 400
    size: int = 80

    def n(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


# ---------------------------------------------------------------------------------- scenes


def _polygon(shape: str, cx: float, cy: float, d: float, theta: float) -> np.ndarray:
    """Vertices [K, 2] (x, y) of a shape of extent ~d centred at (cx, cy), rotated by theta."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(a), np.sin(a)], 1) * (d / 2)
    elif shape == "square":
        s = 0.86 * d / 2
        pts = np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    elif shape == "triangle":
        r = 0.62 * d
        a = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        pts = np.stack([np.cos(a), np.sin(a)], 1) * r
        pts[:, 1] += 0.12 * d  # centre the bounding box rather than the centroid
    elif shape == "cross":
        h, w = d / 2, 0.2 * d
        pts = np.array([[-w, -h], [w, -h], [w, -w], [h, -w], [h, w], [w, w], [w, h], [-w, h],
                        [-w, w], [-h, w], [-h, -w], [-w, -w]])
    else:
        raise ValueError(shape)
    c, s_ = np.cos(theta), np.sin(theta)
    rot = pts @ np.array([[c, s_], [-s_, c]])
    return rot + np.array([cx, cy])


def _mask(poly: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage [size, size] float32 in [0, 1] of a polygon (pixel coords)."""
    big = Image.new("L", (size * _SS, size * _SS), 0)
    ImageDraw.Draw(big).polygon([(float(x) * _SS, float(y) * _SS) for x, y in poly], fill=255)
    return np.asarray(big.reduce(_SS), dtype=np.float32) / 255.0


def _boxes_meet(lo, hi, box, gap: float) -> bool:
    lo2, hi2 = box
    return bool(np.all(lo - gap < hi2) and np.all(lo2 - gap < hi))


def _texture(rng: np.random.Generator, texture: str, size: int, scale: float) -> np.ndarray | None:
    """Coverage [size, size] of the texture pattern (stripes or dots), or None for plain."""
    if texture == "plain":
        return None
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if texture == "striped":
        period = float(rng.uniform(5.5, 7.0)) * scale
        width = 0.5 * period
        phi = np.deg2rad(float(rng.choice([0.0, 45.0, 90.0, 135.0])))
        t = np.mod(xx * np.cos(phi) + yy * np.sin(phi) + rng.uniform(0, period), period)
        sd = np.where(t < width, np.minimum(t, width - t), -np.minimum(t - width, period - t))
        return np.clip(sd + 0.5, 0.0, 1.0)
    if texture == "dotted":
        g = float(rng.uniform(5.5, 6.5)) * scale
        r = 1.5 * scale
        ox, oy = rng.uniform(0, g, size=2)
        dx = np.mod(xx - ox, g)
        dx = np.minimum(dx, g - dx)
        dy = np.mod(yy - oy, g)
        dy = np.minimum(dy, g - dy)
        return np.clip(r - np.hypot(dx, dy) + 0.5, 0.0, 1.0)
    raise ValueError(texture)


def _background(rng: np.random.Generator, bg: str, size: int) -> np.ndarray:
    base = np.array(_BG_RGB[bg], np.float32) + rng.uniform(-8, 8, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    a = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(8, 18) if bg != "night" else rng.uniform(4, 9)
    grad = (np.cos(a) * xx + np.sin(a) * yy) * 2 * amp
    return base[None, None, :] + grad[:, :, None]


def render_scene(rng: np.random.Generator, size: int = 80):
    """Draw one scene. Pure given `rng`.

    Returns (PIL RGB image, objects, image_attrs): each object a dict with shape, colour, size,
    texture, bbox [x, y, w, h], segmentation [[x0, y0, ...]], area, visible (fraction) and
    attributes (object-level names); image_attrs = [count word, background].
    """
    scale = size / 80.0
    bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    n_target = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.2, 0.2]))
    img = _background(rng, bg, size)
    margin = 7.0 * scale  # objects stay (almost) whole in a centre 64x64 crop of 80x80

    placed: list[dict] = []
    masks: list[np.ndarray] = []  # full coverage of each placed object
    vis: list[np.ndarray] = []  # visible coverage (after later objects are drawn on top)
    for _ in range(n_target):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        sz = "large" if rng.random() < 0.45 else "small"
        texture = ("plain", "striped", "dotted")[int(rng.integers(3))]
        ok = False
        for attempt in range(80):
            if attempt == 40 and sz == "large":
                sz = "small"  # crowded scene: fall back to a small object
            d = (rng.uniform(28, 34) if sz == "large" else rng.uniform(14, 18)) * scale
            theta = 0.0 if shape == "circle" else float(rng.uniform(-0.26, 0.26))
            cx, cy = rng.uniform(margin + d / 2, size - margin - d / 2, size=2)
            poly = _polygon(shape, float(cx), float(cy), float(d), theta)
            if poly.min() < margin - 1e-6 or poly.max() > size - margin + 1e-6:
                continue
            lo, hi = poly.min(axis=0), poly.max(axis=0)
            # Same-coloured objects never touch (they would read as one blob): boxes 2 px apart.
            if any(o["colour"] == colour and _boxes_meet(lo, hi, o["_box"], 2.0 * scale)
                   for o in placed):
                continue
            m = _mask(poly, size)
            keep = 1.0 - m
            if all(float((v * keep).sum()) >= 0.8 * float(mk.sum()) for v, mk in zip(vis, masks)):
                ok = True
                break
        if not ok:
            continue  # could not place it: the scene has one object fewer
        vis = [v * (1.0 - m) for v in vis] + [m]
        masks.append(m)
        rgb = np.array(_RGB[colour], np.float32) + rng.uniform(-10, 10, size=3).astype(np.float32)
        rgb = np.clip(rgb, 0, 255)
        pat = _texture(rng, texture, size, scale)
        fill = np.broadcast_to(rgb, (size, size, 3))
        if pat is not None:
            fill = fill * (1.0 - 0.5 * pat[:, :, None])  # a darker shade of the object colour
        img = img * (1.0 - m[:, :, None]) + fill * m[:, :, None]
        x0, y0 = poly.min(axis=0)
        x1, y1 = poly.max(axis=0)
        px, py = poly[:, 0], poly[:, 1]
        area = 0.5 * abs(float(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1))))
        attrs = [shape, colour, sz] + ([texture] if texture != "plain" else [])
        placed.append({
            "shape": shape, "colour": colour, "size": sz, "texture": texture,
            "bbox": [round(float(x0), 2), round(float(y0), 2),
                     round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
            "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
            "area": round(area, 2),
            "attributes": attrs,
            "_box": (lo, hi),
        })
    for obj, v, mk in zip(placed, vis, masks):
        del obj["_box"]
        obj["visible"] = round(float(v.sum() / max(mk.sum(), 1e-6)), 3)

    img = img + rng.normal(0.0, 4.0, size=img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    n = len(placed)
    count = "single" if n == 1 else "pair" if n == 2 else "many"
    return Image.fromarray(img, "RGB"), placed, [count, bg]


# -------------------------------------------------------------------------------- captions

P_OMIT = 0.4  # object attributes (shape, colour, size, texture)
P_OMIT_IMAGE = 0.45  # image attributes (count, background): two captions keep recall < 0.9
P_SYN = 0.3

# (canonical wordings, synonym wordings); every attribute word here is a keyword of exactly
# that attribute in recipes/coconut_demo_vocab.json, and no filler word is a keyword.
_SHAPE_WORDS = {
    "circle": (["circle"], ["disc", "disk"]),
    "square": (["square"], ["box", "block"]),
    "triangle": (["triangle"], ["wedge"]),
    "cross": (["cross"], ["plus sign", "plus shape"]),
}
_COLOUR_WORDS = {
    "red": (["red"], ["crimson", "scarlet"]),
    "yellow": (["yellow"], ["golden", "lemon-coloured"]),
    "blue": (["blue"], ["cobalt", "azure"]),
    "purple": (["purple"], ["violet"]),
    "white": (["white"], ["ivory"]),
    "orange": (["orange"], ["tangerine", "amber"]),
}
_SIZE_WORDS = {"small": (["small"], ["tiny", "little"]),
               "large": (["large"], ["big", "huge", "giant"])}
# (words before the noun, words after the noun)
_TEXTURE_WORDS = {
    "striped": ((["striped"], ["with stripes"]), (["stripy", "banded"], [])),
    "dotted": ((["dotted"], ["with dots"]), (["spotted", "polka-dot"], ["with polka dots"])),
}
_COUNT_WORDS = {
    "single": (["a single"], ["a lone", "just one", "only one"]),
    "pair": (["two"], ["a pair of", "a couple of"]),
    "many": (["several"], ["many", "multiple", "a group of"]),
}
_BG_WORDS = {
    "sky": (["against the sky", "in the sky", "under a clear sky"], ["in daylight"]),
    "grass": (["on the grass", "on green grass"], ["on a lawn", "in a meadow", "on the turf"]),
    "sand": (["on the sand", "on sand"], ["on a beach", "in the desert", "on a sandy dune"]),
    "night": (["at night"], ["in the dark", "in darkness", "at nighttime"]),
}
_GENERIC_NOUNS = ["shape", "object", "figure", "thing"]
_PLURAL_NOUNS = ["shapes", "objects", "figures", "items"]
_LEADS = ["A photo of", "An image of", "A picture of", "A drawing of", "A rendering of",
          "Here we see", "This shows", ""]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _word(rng: np.random.Generator, table: dict, key: str, p_omit: float = P_OMIT) -> str | None:
    """None (omitted), a synonym, or a canonical wording of attribute `key`."""
    if rng.random() < p_omit:
        return None
    canon, syn = table[key]
    if syn and rng.random() < P_SYN:
        return _pick(rng, syn)
    return _pick(rng, canon)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _describe(rng: np.random.Generator, obj: dict) -> tuple[str, str]:
    """(phrase without article, first word) for one object."""
    size = _word(rng, _SIZE_WORDS, obj["size"])
    colour = _word(rng, _COLOUR_WORDS, obj["colour"])
    noun = _word(rng, _SHAPE_WORDS, obj["shape"]) or _pick(rng, _GENERIC_NOUNS)
    pre = post = None
    if obj["texture"] != "plain" and rng.random() >= P_OMIT:
        (canon_pre, canon_post), (syn_pre, syn_post) = _TEXTURE_WORDS[obj["texture"]]
        use_syn = rng.random() < P_SYN
        pres, posts = (syn_pre, syn_post) if use_syn else (canon_pre, canon_post)
        choice = _pick(rng, [(w, None) for w in pres] + [(None, w) for w in posts])
        pre, post = choice
    words = [w for w in (size, pre, colour, noun, post) if w]
    return " ".join(words), words[0]


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _caption(rng: np.random.Generator, objects: list[dict], image_attrs: list[str]) -> str:
    count_attr, bg_attr = image_attrs
    n = len(objects)
    lead = _pick(rng, _LEADS)
    count = _word(rng, _COUNT_WORDS, count_attr, P_OMIT_IMAGE) if n else None
    bg = _word(rng, _BG_WORDS, bg_attr, P_OMIT_IMAGE)
    if n > 1 and rng.random() >= 0.5:  # describe a random non-empty subset
        k = int(rng.integers(1, n))
        idx = sorted(rng.choice(n, size=k, replace=False).tolist())
    else:
        idx = list(range(n))
    descs, seen = [], set()
    for i in idx:
        phrase, first = _describe(rng, objects[i])
        if phrase in seen:
            descs.append("another " + phrase)
        else:
            seen.add(phrase)
            descs.append(_article(first) + " " + phrase)

    if n == 0:
        body = " ".join(w for w in ["nothing but an empty scene", bg] if w)
    elif n == 1:
        first = descs[0].split(" ", 1)[1] if count else None
        body = " ".join(w for w in [f"{count} {first}" if count else descs[0], bg] if w)
    elif count is None:
        body = " ".join(w for w in [_join(descs), bg] if w)
    else:
        group = f"{count} {_pick(rng, _PLURAL_NOUNS)}"
        if len(idx) == n:
            form = int(rng.integers(2))
            if form == 0:
                body = " ".join(w for w in [group, bg] if w) + ": " + _join(descs)
            else:
                body = f"{group}, {_join(descs)}" + (f", {bg}" if bg else "")
        else:
            joiner = _pick(rng, ["including", "among them"])
            body = " ".join(w for w in [group, bg] if w) + f", {joiner} {_join(descs)}"
    text = f"{lead} {body}" if lead else body
    return text[0].upper() + text[1:] + "."


def make_captions(rng: np.random.Generator, objects: list[dict], image_attrs: list[str],
                  n: int = 2) -> list[str]:
    """`n` captions for one scene; each mentions only some of its (true) attributes."""
    return [_caption(rng, objects, image_attrs) for _ in range(n)]


def true_attributes(image_attrs, objects) -> list[str]:
    """The image's true attribute set (in DEMO_ATTRIBUTES order): image-level + all objects'."""
    s = set(image_attrs)
    for o in objects:
        s.update(o["attributes"])
    return [a for a in DEMO_ATTRIBUTES if a in s]


# ------------------------------------------------------------------------------ generation


def _image_id(split: str, index: int) -> int:
    # Stable across spec sizes and unique across splits (while a split has < 10M images).
    return (SPLITS.index(split) + 1) * 10_000_000 + index + 1


def _generate_one(seed: int, split: str, index: int, size: int):
    ss = np.random.SeedSequence([int(seed), SPLITS.index(split), int(index)])
    scene_ss, caption_ss = ss.spawn(2)
    img, objects, image_attrs = render_scene(np.random.Generator(np.random.PCG64(scene_ss)), size)
    captions = make_captions(np.random.Generator(np.random.PCG64(caption_ss)), objects,
                             image_attrs, n=2)
    return img, objects, image_attrs, captions


def _version_text(spec: DemoSpec) -> str:
    return f"{DEMO_VERSION}\n{json.dumps(asdict(spec), sort_keys=True)}\n"


def default_demo_root(spec: DemoSpec = DemoSpec()) -> Path:
    """$ATTRDIST_CACHE/demo/<hash> (else ~/.cache/attrdist/demo/<hash>) for this spec+version."""
    h = hashlib.sha256(_version_text(spec).encode()).hexdigest()[:16]
    return cache_dir() / "demo" / h


_INFO = {"description": "attrdist procedural demo dataset (shapes with attributes)",
         "version": DEMO_VERSION, "year": 2025, "contributor": "attrdist",
         "url": "", "date_created": "2025-01-01"}
_LICENSES = [{"id": 1, "name": "CC0 1.0 (procedurally generated)",
              "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]


def _write_split(tmp: Path, spec: DemoSpec, split: str, bar) -> None:
    img_dir = tmp / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns, caps = [], [], []
    for i in range(spec.n(split)):
        img, objects, image_attrs, captions = _generate_one(spec.seed, split, i, spec.size)
        iid = _image_id(split, i)
        name = f"{iid:012d}.jpg"
        img.save(img_dir / name, format="JPEG", quality=90, subsampling=0, optimize=False,
                 progressive=False)
        images.append({"id": iid, "file_name": f"{split}/{name}", "width": spec.size,
                       "height": spec.size, "license": 1, "attributes": list(image_attrs)})
        for k, o in enumerate(objects):
            anns.append({"id": iid * 10 + k, "image_id": iid,
                         "category_id": SHAPES.index(o["shape"]) + 1, "bbox": o["bbox"],
                         "area": o["area"], "iscrowd": 0, "segmentation": o["segmentation"],
                         "attributes": list(o["attributes"])})
        for k, c in enumerate(captions):
            caps.append({"id": iid * 10 + k, "image_id": iid, "caption": c})
        bar.update(1)
    cats = [{"id": j + 1, "name": s, "supercategory": "shape"} for j, s in enumerate(SHAPES)]
    ann_dir = tmp / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    instances = {"info": _INFO, "licenses": _LICENSES, "images": images, "annotations": anns,
                 "categories": cats, "attribute_names": list(DEMO_ATTRIBUTES)}
    captions_js = {"info": _INFO, "licenses": _LICENSES, "images": images, "annotations": caps}
    (ann_dir / f"instances_{split}.json").write_text(json.dumps(instances) + "\n")
    (ann_dir / f"captions_{split}.json").write_text(json.dumps(captions_js) + "\n")


def _is_current(root: Path, version: str) -> bool:
    try:
        return (root / "DEMO_VERSION").read_text() == version
    except (FileNotFoundError, NotADirectoryError):
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clean_stale_temps(root: Path, max_age_s: float = 24 * 3600) -> None:
    now = time.time()
    for p in root.parent.glob(f".{root.name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ensure_demo(root: Path | str | None = None, spec: DemoSpec = DemoSpec(), *,
                progress: bool = True) -> Path:
    """Generate the demo dataset at `root` unless it is already there; return the root.

    Default root: `default_demo_root(spec)`. A root whose DEMO_VERSION matches is returned at
    once. Otherwise the data are written into a temporary sibling directory, DEMO_VERSION
    last, which is then renamed into place, so a crash never leaves a directory that looks
    complete. If another process wins the race, its copy is used and ours is discarded.
    """
    root = Path(root).expanduser() if root is not None else default_demo_root(spec)
    version = _version_text(spec)
    if _is_current(root, version):
        return root
    if root.exists():
        if not root.is_dir():
            raise AttrdistError(f"{root}: exists and is not a directory; remove it or choose "
                                "another demo root")
        if (root / "DEMO_VERSION").exists():
            raise AttrdistError(f"{root / 'DEMO_VERSION'}: holds a different demo version/spec; "
                                "delete the directory or choose another demo root")
        if any(root.iterdir()):
            raise AttrdistError(f"{root}: exists, is not empty and is not a demo dataset; "
                                "choose an empty or new directory as demo root")
    for name, n in (("n_train", spec.n_train), ("n_val", spec.n_val), ("n_test", spec.n_test)):
        if not (0 <= n < 10_000_000):
            raise AttrdistError(f"demo spec: {name}={n} out of range; use 0 <= {name} < 10000000")
    if spec.size < 32:
        raise AttrdistError(f"demo spec: size={spec.size} too small; use size >= 32")

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AttrdistError(f"{root.parent}: cannot create the demo directory ({e}); set "
                            "ATTRDIST_CACHE or --root to a writable place") from None
    _clean_stale_temps(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        from tqdm import tqdm

        total = spec.n_train + spec.n_val + spec.n_test
        with tqdm(total=total, desc="attrdist demo", unit="img", disable=not progress,
                  leave=False) as bar:
            for split in SPLITS:
                _write_split(tmp, spec, split, bar)
        (tmp / "DEMO_VERSION").write_text(version)
        try:
            os.replace(tmp, root)  # atomic; also replaces an empty directory
        except OSError:
            if _is_current(root, version):  # a concurrent generator won the race
                return root
            raise
        _fsync_dir(root.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attrdist.demo.scenes",
                                description="Generate the built-in demo dataset; print its root.")
    p.add_argument("--root", type=Path, default=None, help="dataset root (default: cache dir)")
    p.add_argument("--seed", type=int, default=DemoSpec.seed)
    p.add_argument("--n-train", type=int, default=DemoSpec.n_train)
    p.add_argument("--n-val", type=int, default=DemoSpec.n_val)
    p.add_argument("--n-test", type=int, default=DemoSpec.n_test)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    spec = DemoSpec(seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    with user_errors():
        root = ensure_demo(args.root, spec, progress=not args.quiet)
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
