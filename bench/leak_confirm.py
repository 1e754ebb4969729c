"""Leak confirmation: how the pixel check (attrdist.pack.leakage.similarity) sorts the hash's candidates.

    .venv/bin/python -m bench.leak_confirm [--quick]

The leak check's perceptual hash flags candidates at hash distance <= DEFAULT_MAX_DISTANCE (mirrors included);
a candidate blocks a pack only when `similarity` (normalised correlation of 32x32 grey pixels, the mirror and
1-2 % centre crops tried) is >= DEFAULT_MIN_SIMILARITY. Measured here, on every hash candidate of:

  glyphs      64x64 black capitals A-Z on white, one per DejaVu font file in /usr/share/fonts/truetype/dejavu
              (21 files, not the maths one) at 36/44/52/60 pt (--quick: 44 pt); every pair of two different font
              files. "different designs": a Sans, Sans Condensed or Sans Mono face against a Serif one; "shared
              outlines": both Sans-lineage (Sans, Sans Condensed and Sans Mono draw many capitals alike) or both
              Serif, styles of one family included.
  copies      the 16 COCO photos in ../shared/data/coco/images, 60 demo val images (80 px) and 56 glyphs, each
              against an augmented copy: JPEG q50/q60, resize 0.5x/0.8x, crop 1%/2% each side, brightness
              +10%/+15%, colour jitter (brightness/contrast/saturation +-0.2, hue +-0.02), horizontal flip.
  characters  the characters demo (attrdist.demo.characters: random fonts, rotations, noise) with grouping off:
              same-source pairs (offline copies: shift +-3 px, rotation +-8 deg, brightness, blur) and
              different-source pairs of the hash's candidates (--quick: fewer sources).

Per group: the pairs, the hash's candidates, how many of them the pixel check confirms, and their smallest and
largest similarity; and the cost of confirming (ms per candidate pair: read both files, decode, compare; COCO
photos). Writes bench/results/leak_confirm[-quick].csv; the numbers in attrdist/pack/leakage.py's docstring
come from here.
"""

from __future__ import annotations

import io
import itertools
import string
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from attrdist.pack.leakage import (DEFAULT_MAX_DISTANCE, DEFAULT_MIN_SIMILARITY, MIRROR_MASK, fingerprint,
                                   image_views, similarity)
from bench.common import parser, save, target_row

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco" / "images"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def render_glyph(font: str, letter: str, pt: int = 48, size: int = 64) -> Image.Image:
    """A black capital, centred, on a white size x size image."""
    f = ImageFont.truetype(str(FONT_DIR / font), pt)
    im = Image.new("L", (size, size), 255)
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = d.textbbox((0, 0), letter, font=f)
    d.text(((size - x0 - x1) / 2, (size - y0 - y1) / 2), letter, fill=0, font=f)
    return im


def png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def jpeg(im: Image.Image, q: int = 90) -> bytes:
    b = io.BytesIO()
    im.convert("RGB").save(b, "JPEG", quality=q)
    return b.getvalue()


def _crop(im: Image.Image, f: float) -> Image.Image:
    dx, dy = int(im.width * f), int(im.height * f)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


def jitter(im: Image.Image, g: np.random.Generator) -> Image.Image:
    im = ImageEnhance.Brightness(im.convert("RGB")).enhance(1 + g.uniform(-0.2, 0.2))
    im = ImageEnhance.Contrast(im).enhance(1 + g.uniform(-0.2, 0.2))
    im = ImageEnhance.Color(im).enhance(1 + g.uniform(-0.2, 0.2))
    h, s, v = im.convert("HSV").split()
    shift = int(g.uniform(-0.02, 0.02) * 255)
    return Image.merge("HSV", (h.point(lambda x: (x + shift) % 256), s, v)).convert("RGB")


AUGS = {
    "jpeg_q50": lambda im, g: jpeg(im, 50),
    "jpeg_q60": lambda im, g: jpeg(im, 60),
    "resize_0.5": lambda im, g: jpeg(im.resize((im.width // 2, im.height // 2), Image.BILINEAR)),
    "resize_0.8": lambda im, g: jpeg(im.resize((int(im.width * 0.8), int(im.height * 0.8)), Image.BILINEAR)),
    "crop_1%": lambda im, g: jpeg(_crop(im, 0.01)),
    "crop_2%": lambda im, g: jpeg(_crop(im, 0.02)),
    "brightness+10%": lambda im, g: jpeg(ImageEnhance.Brightness(im).enhance(1.1)),
    "brightness+15%": lambda im, g: jpeg(ImageEnhance.Brightness(im).enhance(1.15)),
    "colour_jitter": lambda im, g: jpeg(jitter(im, g)),
    "hflip": lambda im, g: jpeg(ImageOps.mirror(im)),
}


def distance(a: int, b: int) -> int:
    return min(bin(a ^ b).count("1"), bin(a ^ b ^ MIRROR_MASK).count("1"))


def lineage(font: str) -> str:
    return "serif" if "Serif" in font else "sans"


def row(what: str, group: str, pairs: int, sims: list[float]) -> dict:
    conf = sum(s >= DEFAULT_MIN_SIMILARITY for s in sims)
    return {"benchmark": "leak_confirm", "set": what, "group": group, "pairs": pairs, "hash_candidates": len(sims),
            "confirmed": conf, "min_similarity": round(min(sims), 4) if sims else "",
            "max_similarity": round(max(sims), 4) if sims else ""}


def glyph_rows(sizes: tuple[int, ...]) -> list[dict]:
    fonts = sorted(p.name for p in FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name)
    sims: dict[str, list[float]] = {"different designs": [], "shared outlines": []}
    pairs = dict.fromkeys(sims, 0)
    for pt in sizes:
        data = {(f, c): png(render_glyph(f, c, pt)) for f in fonts for c in string.ascii_uppercase}
        hashes = {k: fingerprint(v)[1] for k, v in data.items()}
        views: dict = {}
        for ka, kb in itertools.combinations(data, 2):
            if ka[0] == kb[0]:
                continue
            kind = "different designs" if lineage(ka[0]) != lineage(kb[0]) else "shared outlines"
            pairs[kind] += 1
            if distance(hashes[ka], hashes[kb]) <= DEFAULT_MAX_DISTANCE:
                va = views.setdefault(ka, image_views(data[ka]))
                vb = views.setdefault(kb, image_views(data[kb]))
                sims[kind].append(similarity(va, vb))
    return [row(f"glyphs {len(fonts)} fonts x 26 x {'/'.join(map(str, sizes))} pt", k, pairs[k], v)
            for k, v in sims.items()]


def copy_rows(quick: bool) -> list[dict]:
    from attrdist.demo.scenes import DemoSpec, ensure_demo

    g = np.random.default_rng(0)
    sets: dict[str, list[bytes]] = {}  # the original files' bytes
    if COCO.is_dir():
        sets["coco photos"] = [p.read_bytes() for p in sorted(COCO.glob("*.jpg"))]
    with tempfile.TemporaryDirectory() as tmp:
        demo = ensure_demo(Path(tmp) / "demo", DemoSpec(n_train=8, n_val=60, n_test=8), progress=False)
        sets["demo images"] = [p.read_bytes() for p in sorted((demo / "images" / "val").glob("*.jpg"))]
    fonts = sorted(p.name for p in FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name)[::3]
    sets["glyphs"] = [png(render_glyph(f, c)) for f in fonts for c in "ABCRSTXZ"]
    rows = []
    for name, originals in sets.items():
        originals = originals[:8] if quick else originals
        for aug, fn in AUGS.items():
            sims = []
            for orig in originals:
                copy = fn(Image.open(io.BytesIO(orig)).convert("RGB"), g)
                if distance(fingerprint(orig)[1], fingerprint(copy)[1]) <= DEFAULT_MAX_DISTANCE:
                    sims.append(similarity(image_views(orig), image_views(copy)))
            rows.append(row(f"copies: {name}", aug, len(originals), sims))
    return rows


def character_rows(quick: bool) -> list[dict]:
    from attrdist.demo.characters import CharactersSpec, ensure_characters

    spec = CharactersSpec(classes=26, sources_per_class=4 if quick else 10, copies=2, size=64)
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_characters(Path(tmp) / "chars", spec)
        files = sorted(root.glob("*/*.png"))
        data = {p.name: p.read_bytes() for p in files}
    hashes = {k: fingerprint(v)[1] for k, v in data.items()}
    same, other, n_same, n_other = [], [], 0, 0
    for a, b in itertools.combinations(sorted(data), 2):
        src = a.split("_")[0] == b.split("_")[0]
        n_same += src
        n_other += not src
        if distance(hashes[a], hashes[b]) <= DEFAULT_MAX_DISTANCE:
            (same if src else other).append(similarity(image_views(data[a]), image_views(data[b])))
    what = f"characters demo {spec.classes} x {spec.sources_per_class} sources x {spec.copies + 1}"
    return [row(what, "same source (offline copies)", n_same, same), row(what, "different sources", n_other, other)]


def cost_row() -> dict:
    """ms per candidate pair: read both files, decode (JPEG draft), views, compare (the check's work per pair)."""
    if not COCO.is_dir():
        return {}
    paths = sorted(COCO.glob("*.jpg"))
    t = time.perf_counter()
    n = 0
    for _ in range(5):
        for a, b in zip(paths, paths[1:] + paths[:1]):
            similarity(image_views(a.read_bytes()), image_views(b.read_bytes()))
            n += 1
    ms = (time.perf_counter() - t) / n * 1000
    return {"benchmark": "leak_confirm", "set": "cost", "group": "COCO photo pairs (640 px JPEG), one thread",
            "pairs": n, "ms_per_pair": round(ms, 2)}


def main(argv=None) -> list[dict]:
    ap = parser(__doc__, rounds=None)
    args = ap.parse_args(argv)
    rows = glyph_rows((44,) if args.quick else (36, 44, 52, 60)) + copy_rows(args.quick) + character_rows(args.quick)
    rows.append(cost_row())
    print(f"\nthreshold: similarity >= {DEFAULT_MIN_SIMILARITY} (hash distance <= {DEFAULT_MAX_DISTANCE})")
    print("| set | group | pairs | hash candidates | confirmed | similarity min-max |\n"
          "| --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        if "hash_candidates" in r:
            print(f"| {r['set']} | {r['group']} | {r['pairs']} | {r['hash_candidates']} | {r['confirmed']} | "
                  f"{r['min_similarity']}-{r['max_similarity']} |")
        elif r:
            print(f"| {r['set']} | {r['group']} | {r['pairs']} | {r['ms_per_pair']} ms per pair | | |")
    fp = sum(r["confirmed"] for r in rows if r.get("group") == "different designs")
    copies = [r for r in rows if str(r.get("set", "")).startswith("copies")]
    found = sum(r["hash_candidates"] for r in copies)
    kept = sum(r["confirmed"] for r in copies)
    targets = [target_row("leak_confirm", "glyphs of different designs confirmed (false positives)", fp, fp, fp,
                          "<=", 0, unit=""),
               target_row("leak_confirm", "augmented copies the hash finds, confirmed", kept / max(1, found),
                          kept / max(1, found), kept / max(1, found), ">=", 1.0, unit="")]
    return save("leak_confirm", [r for r in rows if r], targets, quick=args.quick)


if __name__ == "__main__":
    main()
