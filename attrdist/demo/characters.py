"""The `characters` demo: an image folder of rendered letters, like experiment 5's data.

    <root>/<letter>/<source>_aug<k>.png     one sub-folder per class

Each *source* is one rendering of a letter (font, size, rotation, position, colours, background
noise all drawn from a keyed RNG); like the experiment, each source also gets offline-augmented
copies (`_aug1`, `_aug2`: small shifts, rotations, colour changes). The copies of one source must
never straddle train and val: the image-folder packer's group split (`--group-by prefix`) keeps
them together. Grouping is the only guard here: these copies are shifted and rotated, which the
leakage check does not catch (bench/leak_confirm.py: with grouping off, the hash matched 2 of 780 copies
and the pixel-level confirmation rejects both).
Deterministic from the seed; generated once into the cache, atomically.
"""

from __future__ import annotations

import os
import shutil
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from attrdist.cache import cache_dir
from attrdist.core import rng as rnglib

VERSION = "attrdist-characters-demo 2"
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype", "/usr/share/fonts")


@dataclass(frozen=True)
class CharactersSpec:
    seed: int = 0
    classes: int = 26
    sources_per_class: int = 30
    copies: int = 2  # offline-augmented copies per source (besides the source itself)
    size: int = 64


def _fonts() -> list[str]:
    for d in FONT_DIRS:
        if os.path.isdir(d):
            found = sorted(str(p) for p in Path(d).rglob("*.ttf"))
            if found:
                return found[:12]
    return []


def _font(paths: list[str], index: int, size: int):
    if paths:
        return ImageFont.truetype(paths[index % len(paths)], size)
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font


def render_letter(letter: str, g: np.random.Generator, size: int, fonts: list[str]) -> Image.Image:
    bg = tuple(int(v) for v in g.integers(0, 256, 3))
    fg = tuple(int((c + 128 + g.integers(-40, 40)) % 256) for c in bg)  # far from the background
    big = size * 3
    im = Image.new("RGB", (big, big), bg)
    font = _font(fonts, int(g.integers(0, 1000)), int(big * g.uniform(0.45, 0.7)))
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = d.textbbox((0, 0), letter, font=font)
    cx = big / 2 + g.uniform(-0.1, 0.1) * big
    cy = big / 2 + g.uniform(-0.1, 0.1) * big
    d.text((cx - (x0 + x1) / 2, cy - (y0 + y1) / 2), letter, fill=fg, font=font)
    im = im.rotate(float(g.uniform(-20, 20)), resample=Image.BICUBIC, fillcolor=bg)
    noise = g.normal(0, 8, (big, big, 3))
    arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).resize((size, size), Image.LANCZOS)


def augment_copy(im: Image.Image, g: np.random.Generator) -> Image.Image:
    """Offline augmentation as in the experiment's data: shift, small rotation, brightness, blur."""
    w, h = im.size
    corner = im.getpixel((0, 0))  # fill with the background, not black
    out = im.rotate(float(g.uniform(-8, 8)), resample=Image.BICUBIC,
                    translate=tuple(int(v) for v in g.integers(-3, 4, 2)), fillcolor=corner)
    arr = np.clip(np.asarray(out, dtype=np.float32) * g.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
    out = Image.fromarray(arr)
    if g.uniform() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(float(g.uniform(0.3, 0.8))))
    return out


def default_root(spec: CharactersSpec) -> Path:
    import hashlib
    import json

    h = hashlib.sha1(json.dumps({"v": VERSION, **asdict(spec)}, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "characters" / h


def ensure_characters(root: Path | None = None, spec: CharactersSpec = CharactersSpec()) -> Path:
    """Generate the image folder unless present (marker file written last; atomic rename)."""
    root = Path(root) if root else default_root(spec)
    marker = root / "DEMO_VERSION"
    text = f"{VERSION}\n{asdict(spec)}\n"
    if marker.is_file() and marker.read_text() == text:
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fonts = _fonts()
    letters = string.ascii_uppercase[: spec.classes]
    for c, letter in enumerate(letters):
        (tmp / letter).mkdir(parents=True)
        for s in range(spec.sources_per_class):
            g = rnglib.generator(spec.seed, c, s)
            src = render_letter(letter, g, spec.size, fonts)
            stem = f"{letter}{s:04d}"
            src.save(tmp / letter / f"{stem}_aug0.png")
            for k in range(1, spec.copies + 1):
                augment_copy(src, g).save(tmp / letter / f"{stem}_aug{k}.png")
    (tmp / "DEMO_VERSION").write_text(text)
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        shutil.rmtree(root)
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return root
