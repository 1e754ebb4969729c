"""The `dior_remoteclip` demo: procedural "aerial" scenes with boxes, in DIOR's official layout.

The same packer serves the demo and real DIOR (`attrdist.pack.dior.pack_dior`), so the demo exercises
the real path: XML parsing of both variants, DIOR's raw class spellings, split lists, leakage check.

    <root>/JPEGImages-trainval/<id>.jpg               train + val images (size x size, JPEG q90)
    <root>/JPEGImages-test/<id>.jpg                   test images
    <root>/Annotations/Horizontal Bounding Boxes/<id>.xml   VOC-style <bndbox> (tabs, CRLF, like DIOR)
    <root>/Annotations/Oriented Bounding Boxes/<id>.xml     <robndbox> x_left_top..y_left_bottom + <angle>
    <root>/ImageSets/Main/{train,val,test}.txt        one 5-digit id per line ("00001"; train, val, test
                                                      ids are consecutive, in that order)
    <root>/DEMO_VERSION                               written last: version string + spec

Scene: a `size` px (default 128) ground of 2-5 warped land-cover regions (striped field, bare soil,
urban blocks with streets, forest, grass, water), one sun direction for all shadows, and 1-6
objects that never touch (their footprints, shadows and water included, are 2 px apart, so boxes
never overlap) and lie wholly inside the image. Twelve DIOR classes (raw spellings, as in the XML):

    airplane                 light-grey fuselage + swept wings + tail, any heading, small shadow
    ship                     white pointed hull, grey superstructure, pale wake, on a dark water patch
    storagetank              off-white disc with a darker inner ring and a crescent shadow
    vehicle                  small dark/red/blue/white rectangle with a windscreen, any heading
    tenniscourt              green or blue court with white outline, net and service line on a
                             contrasting apron
    basketballcourt          orange-tan court with white outline, midcourt line, centre circle, keys
    groundtrackfield         red running-track oval around a green pitch, one white lane line
    windmill                 three thin white blades from a hub, with a long tower + blade shadow
    bridge                   grey deck with dark railings spanning a water channel
    baseballfield            green 90-degree fan with a brown infield diamond and white foul lines
    golffield                bright-green lobed blob with pale fairways and sand bunkers
    Expressway-Service-area  grey lot with rows of tiny multicoloured cars and a building

Boxes: rectangular classes (ship, vehicle, the courts, groundtrackfield, bridge, the service
area) turn freely; their oriented box is the rotated rectangle (<angle> = direction of its top
edge, degrees, in [-90, 90)). Silhouette classes (airplane, storagetank, windmill, baseballfield,
golffield) have an oriented box with angle 0 equal to the hull of the silhouette (shadows and
water never count). Corners are written as integers, like DIOR, and the horizontal box is exactly
the hull of the oriented corners (the DOTA convention), so both variants give the same boxes.

Everything is a pure function of (seed, split, index): numpy Generator(PCG64) per image, fixed
JPEG options, fixed XML text, so the same spec gives identical bytes. The default spec (1200 /
200 / 200 images, ~3.5 objects each) takes ~9 s to generate (one process) and ~3 s to pack
(2 cores); images of different splits are >= 11 bits apart in the leakage hash (threshold: 2):

    python -m attrdist.demo.aerial --out /tmp/aerial      # generate only (prints the root)
    python shards/dior.py --root /tmp/aerial --out /tmp/aerial-shards
    attrdist inspect /tmp/aerial-shards --sheet /tmp/aerial_sheet.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from attrdist.cache import cache_dir
from attrdist.errors import AttrdistError, user_errors

__all__ = ["AERIAL_VERSION", "AERIAL_CLASSES", "AerialSpec", "render_aerial", "ensure_aerial",
           "aerial_demo_shards", "default_aerial_root"]

AERIAL_VERSION = "attrdist-aerial-demo 1"
SPLITS = ("train", "val", "test")
HBB_DIR, OBB_DIR = "Annotations/Horizontal Bounding Boxes", "Annotations/Oriented Bounding Boxes"
_SS = 4  # supersampling factor of the object layers
_GAP = 2.0  # px between object footprints (at 128 px)


@dataclass(frozen=True)
class AerialSpec:
    seed: int = 0
    n_train: int = 1200
    n_val: int = 200
    n_test: int = 200
    size: int = 128
    max_objects: int = 6

    def n(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


# ------------------------------------------------------------------------------------ geometry


def _rot(pts, theta: float) -> np.ndarray:
    """Local (u, v) points [K, 2] rotated by theta (radians; image axes, y down)."""
    c, s = np.cos(theta), np.sin(theta)
    return np.asarray(pts, np.float64) @ np.array([[c, s], [-s, c]])


def _ellipse(a: float, b: float, n: int = 32, jitter=None) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1.0 if jitter is None else jitter
    return np.stack([a * r * np.cos(t), b * r * np.sin(t)], 1)


def _rect(u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    return np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]], np.float64)


def _stadium(a: float, b: float, n: int = 12) -> np.ndarray:
    """Half-length a (caps included), half-width b: a rectangle with semicircular ends."""
    t = np.linspace(-np.pi / 2, np.pi / 2, n)
    right = np.stack([a - b + b * np.cos(t), b * np.sin(t)], 1)
    return np.concatenate([right, -right])


def _closed(pts: np.ndarray) -> np.ndarray:
    return np.concatenate([pts, pts[:1]])


@dataclass(frozen=True)
class _Thing:
    """One object relative to its reference point: drawing ops, oriented box corners, angle."""

    name: str
    ops: tuple  # ("fill", pts, rgb) | ("line", pts, rgb, width) | ("shadow", pts)
    corners: np.ndarray  # [4, 2] left_top, right_top, right_bottom, left_bottom
    angle: float  # degrees

    def footprint(self) -> tuple[np.ndarray, np.ndarray]:
        pts = np.concatenate([op[1] for op in self.ops] + [self.corners])
        return pts.min(0), pts.max(0)

    def footprint_area(self) -> float:
        lo, hi = self.footprint()
        return float(np.prod(hi - lo))

    def moved(self, t: np.ndarray) -> _Thing:
        ops = tuple((op[0], op[1] + t, *op[2:]) for op in self.ops)
        return _Thing(self.name, ops, self.corners + t, self.angle)


def _rotated_box(a: float, b: float, theta: float) -> tuple[np.ndarray, float]:
    """Corners and angle (degrees in [-90, 90)) of the rectangle |u| <= a, |v| <= b turned by theta."""
    theta = (theta + np.pi / 2) % np.pi - np.pi / 2  # the same rectangle, a top edge in [-90, 90)
    return _rot(_rect(-a, a, -b, b), theta), float(np.degrees(theta))


def _upright_box(*polys: np.ndarray) -> tuple[np.ndarray, float]:
    pts = np.concatenate(polys)
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    return _rect(x0, x1, y0, y1), 0.0


# ------------------------------------------------------------------------------------- objects


def _rgb(g: np.random.Generator, rgb, d: float = 12.0) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + g.uniform(-d, d), 0, 255)) for c in rgb)


def _pick(g: np.random.Generator, options):
    return options[int(g.integers(len(options)))]


def _water(g: np.random.Generator) -> tuple[int, int, int]:
    return _rgb(g, (32, 62, 98), 8)


def _airplane(g, s, sun):
    L, th = g.uniform(18, 34) * s, g.uniform(0, 2 * np.pi)
    w = 0.065 * L
    body = _rect(-0.5 * L, 0.4 * L, -w, w).tolist()
    body.insert(2, [0.5 * L, 0.0])
    wing = [[0.12 * L, 0], [-0.14 * L, 0.48 * L], [-0.25 * L, 0.48 * L], [-0.14 * L, 0]]
    tail = [[-0.36 * L, 0], [-0.46 * L, 0.2 * L], [-0.52 * L, 0.2 * L], [-0.49 * L, 0]]
    parts = [_rot(p, th) for p in (body, wing, np.array(wing) * [1, -1], tail, np.array(tail) * [1, -1])]
    grey = _rgb(g, (222, 224, 228), 14)
    shadow = tuple(("shadow", p + sun * 0.12 * L) for p in parts)
    return shadow + tuple(("fill", p, grey) for p in parts), _upright_box(*parts)


def _ship(g, s, sun):
    L, th = g.uniform(16, 32) * s, g.uniform(0, 2 * np.pi)
    a, b = L / 2, L * g.uniform(0.11, 0.15)
    patch = _rot(_ellipse(1.45 * a + 4 * s, b + g.uniform(5, 8) * s, 20, g.uniform(0.92, 1.08, 20)), th)
    wake = _rot([[-a, -0.7 * b], [-a, 0.7 * b], [-1.35 * a, 1.1 * b], [-1.35 * a, -1.1 * b]], th)
    hull = _rot([[-a, -b], [0.45 * a, -b], [a, 0], [0.45 * a, b], [-a, b]], th)
    deck = _rot(_rect(-0.75 * a, -0.3 * a, -0.6 * b, 0.6 * b), th)
    ops = (("fill", patch, _water(g)), ("fill", wake, _rgb(g, (80, 112, 145), 8)),
           ("fill", hull, _rgb(g, (226, 226, 222), 14)), ("fill", deck, _rgb(g, (150, 150, 155), 18)))
    return ops, _rotated_box(a, b, th)


def _storagetank(g, s, sun):
    r = g.uniform(4.5, 10) * s
    disc = _ellipse(r, r)
    ops = (("shadow", disc + sun * 0.4 * r), ("fill", disc, _rgb(g, (232, 232, 226), 12)),
           ("line", _closed(_ellipse(0.72 * r, 0.72 * r)), _rgb(g, (185, 185, 180), 10), 0.8 * s))
    return ops, _upright_box(disc)


def _vehicle(g, s, sun):
    L, th = g.uniform(9, 13) * s, g.uniform(-np.pi / 2, np.pi / 2)
    a, b = L / 2, L * g.uniform(0.21, 0.25)
    body = _rot(_rect(-a, a, -b, b), th)
    colour = _pick(g, [(34, 34, 38), (175, 35, 35), (40, 62, 160), (236, 236, 236)])
    ops = (("shadow", body + sun * 1.2 * s), ("fill", body, _rgb(g, colour, 10)),
           ("fill", _rot(_rect(0.15 * a, 0.45 * a, -0.8 * b, 0.8 * b), th), (55, 65, 80)))
    return ops, _rotated_box(a, b, th)


def _tenniscourt(g, s, sun):
    L, th = g.uniform(20, 30) * s, g.uniform(-np.pi / 2, np.pi / 2)
    a, b = L / 2, L * g.uniform(0.25, 0.3)
    court, apron = _pick(g, [((52, 98, 165), (62, 128, 78)), ((84, 154, 92), (168, 92, 64))])
    line, w = (245, 245, 245), 0.9 * s
    ops = (("fill", _rot(_rect(-a, a, -b, b), th), _rgb(g, apron, 10)),
           ("fill", _rot(_rect(-0.78 * a, 0.78 * a, -0.68 * b, 0.68 * b), th), _rgb(g, court, 10)),
           ("line", _rot(_closed(_rect(-0.78 * a, 0.78 * a, -0.68 * b, 0.68 * b)), th), line, w),
           ("line", _rot([[0, -0.68 * b], [0, 0.68 * b]], th), line, w),
           ("line", _rot([[-0.45 * a, 0], [0.45 * a, 0]], th), line, w))
    return ops, _rotated_box(a, b, th)


def _basketballcourt(g, s, sun):
    L, th = g.uniform(20, 30) * s, g.uniform(-np.pi / 2, np.pi / 2)
    a, b = L / 2, L * g.uniform(0.26, 0.31)
    line, w = (245, 245, 240), 0.9 * s
    ops = (("fill", _rot(_rect(-a, a, -b, b), th), _rgb(g, (198, 128, 70), 14)),
           ("line", _rot(_closed(_rect(-0.88 * a, 0.88 * a, -0.82 * b, 0.82 * b)), th), line, w),
           ("line", _rot([[0, -0.82 * b], [0, 0.82 * b]], th), line, w),
           ("line", _rot(_closed(_ellipse(0.3 * b, 0.3 * b, 16)), th), line, w),
           ("line", _rot(_closed(_rect(0.55 * a, 0.88 * a, -0.3 * b, 0.3 * b)), th), line, w),
           ("line", _rot(_closed(_rect(-0.88 * a, -0.55 * a, -0.3 * b, 0.3 * b)), th), line, w))
    return ops, _rotated_box(a, b, th)


def _groundtrackfield(g, s, sun):
    L, th = g.uniform(36, 50) * s, g.uniform(-np.pi / 2, np.pi / 2)
    a, b = L / 2, L * g.uniform(0.28, 0.33)
    t = 0.2 * b
    ops = (("fill", _rot(_stadium(a, b), th), _rgb(g, (170, 72, 56), 12)),
           ("fill", _rot(_stadium(a - t, b - t), th), _rgb(g, (76, 142, 66), 12)),
           ("line", _rot(_closed(_stadium(a - t / 2, b - t / 2)), th), (236, 232, 228), 0.7 * s))
    return ops, _rotated_box(a, b, th)


def _windmill(g, s, sun):
    R, phase = g.uniform(8, 15) * s, g.uniform(0, 2 * np.pi)
    blade = [[0, -0.07 * R], [R, -0.02 * R], [R, 0.02 * R], [0, 0.07 * R]]
    blades = [_rot(blade, phase + k * 2 * np.pi / 3) for k in range(3)]
    hub = _ellipse(0.12 * R, 0.12 * R, 12)
    tower = np.array([[-sun[1], sun[0]], [sun[1], -sun[0]]]) * 0.06 * R
    tower = np.concatenate([tower, tower[::-1] + sun * 1.6 * R])
    ops = ((("shadow", tower),) + tuple(("shadow", p + sun * 1.6 * R) for p in blades)
           + tuple(("fill", p, (240, 240, 238)) for p in blades) + (("fill", hub, (200, 200, 200)),))
    return ops, _upright_box(*blades, hub)


def _bridge(g, s, sun):
    L, th = g.uniform(28, 44) * s, g.uniform(-np.pi / 2, np.pi / 2)
    a, b = L / 2, g.uniform(2.5, 3.5) * s
    bank = b + g.uniform(8, 14) * s
    v = np.linspace(-bank, bank, 9)
    river = np.concatenate([np.stack([0.35 * L + g.uniform(-1.5, 1.5, 9) * s, v], 1),
                            np.stack([-0.35 * L + g.uniform(-1.5, 1.5, 9) * s, v[::-1]], 1)])
    deck = _rot(_rect(-a, a, -b, b), th)
    rail = (118, 118, 122)
    ops = (("fill", _rot(river, th), _water(g)), ("shadow", deck + sun * 2.5 * s),
           ("fill", deck, _rgb(g, (182, 180, 176), 12)),
           ("line", _rot([[-a, -0.8 * b], [a, -0.8 * b]], th), rail, 0.7 * s),
           ("line", _rot([[-a, 0.8 * b], [a, 0.8 * b]], th), rail, 0.7 * s))
    return ops, _rotated_box(a, b, th)


def _baseballfield(g, s, sun):
    R, phi = g.uniform(22, 36) * s, g.uniform(0, 2 * np.pi)
    t = phi + np.linspace(-np.pi / 4, np.pi / 4, 13)
    fan = np.concatenate([[[0.0, 0.0]], np.stack([R * np.cos(t), R * np.sin(t)], 1)])
    k = 0.42 * R
    diamond = np.array([[0, 0], [k * np.cos(phi - np.pi / 4), k * np.sin(phi - np.pi / 4)],
                        [k * np.sqrt(2) * np.cos(phi), k * np.sqrt(2) * np.sin(phi)],
                        [k * np.cos(phi + np.pi / 4), k * np.sin(phi + np.pi / 4)]])
    line, w = (240, 240, 236), 0.8 * s
    ops = (("fill", fan, _rgb(g, (92, 158, 74), 12)), ("fill", diamond, _rgb(g, (188, 136, 86), 12)),
           ("line", fan[[1, 0, -1]], line, w))
    return ops, _upright_box(fan)


def _golffield(g, s, sun):
    D = g.uniform(36, 50) * s
    n = int(g.integers(3, 5))
    centres = g.uniform(-0.22, 0.22, (n, 2)) * D
    lobes = [c + _rot(_ellipse(*(g.uniform(0.2, 0.32, 2) * D)), g.uniform(0, np.pi)) for c in centres]
    fairways = [c + _rot(_ellipse(0.16 * D, 0.06 * D, 16), g.uniform(0, np.pi)) for c in centres]
    bunkers = [c + g.uniform(-0.08, 0.08, 2) * D + _ellipse(*(g.uniform(1.5, 3, 2) * s), 12)
               for c in centres[: int(g.integers(2, n + 1))]]
    green, light, sand = _rgb(g, (96, 178, 68), 10), _rgb(g, (138, 200, 100), 8), _rgb(g, (232, 218, 162), 8)
    ops = (tuple(("fill", p, green) for p in lobes) + tuple(("fill", p, light) for p in fairways)
           + tuple(("fill", p, sand) for p in bunkers))
    return ops, _upright_box(*lobes)


def _service_area(g, s, sun):
    L, th = g.uniform(32, 46) * s, g.uniform(-np.pi / 2, np.pi / 2)
    a, b = L / 2, L * g.uniform(0.27, 0.34)
    roof = _pick(g, [(214, 218, 226), (92, 122, 172), (176, 84, 70)])
    ops = [("fill", _rot(_rect(-a, a, -b, b), th), _rgb(g, (104, 104, 108), 8)),
           ("shadow", _rot(_rect(0.45 * a, 0.88 * a, -0.5 * b, 0.5 * b), th) + sun * 1.5 * s),
           ("fill", _rot(_rect(0.45 * a, 0.88 * a, -0.5 * b, 0.5 * b), th), _rgb(g, roof, 10))]
    cw, ch = 1.3 * s, 0.75 * s  # tiny parked cars: half-length along v, half-width along u
    for u in np.arange(-0.85 * a, 0.3 * a, 2.6 * s):
        for v in (-0.55 * b, 0.0, 0.55 * b):
            if g.random() < 0.65:
                car = _rect(u - ch, u + ch, v - cw, v + cw)
                colour = _pick(g, [(230, 230, 230), (30, 30, 34), (180, 40, 40), (50, 70, 170), (200, 190, 60)])
                ops.append(("fill", _rot(car, th), colour))
    return tuple(ops), _rotated_box(a, b, th)


# (raw DIOR spelling, maker): the spelling written in the XML; the packer canonicalises it.
_MAKERS = {
    "airplane": _airplane, "ship": _ship, "storagetank": _storagetank, "vehicle": _vehicle,
    "tenniscourt": _tenniscourt, "basketballcourt": _basketballcourt,
    "groundtrackfield": _groundtrackfield, "windmill": _windmill, "bridge": _bridge,
    "baseballfield": _baseballfield, "golffield": _golffield, "Expressway-Service-area": _service_area,
}
AERIAL_CLASSES: tuple[str, ...] = tuple(_MAKERS)


def _make(g: np.random.Generator, name: str, s: float, sun: np.ndarray) -> _Thing:
    ops, (corners, angle) = _MAKERS[name](g, s, sun)
    return _Thing(name, tuple(ops), corners, angle)


# -------------------------------------------------------------------------------------- ground


def _smooth(g: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise [size, size] with ~unit amplitude: a cells x cells normal grid, bicubic-upsampled."""
    low = g.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(low, "F").resize((size, size), Image.BICUBIC))


def _land(g: np.random.Generator, kind: str, size: int, s: float) -> np.ndarray:
    """Texture [size, size, 3] of one land-cover kind (fresh parameters per region)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phi = g.uniform(0, np.pi)
    u, v = xx * np.cos(phi) + yy * np.sin(phi), -xx * np.sin(phi) + yy * np.cos(phi)
    if kind == "field":
        base = _pick(g, [(96, 138, 62), (148, 158, 82), (176, 160, 104), (124, 150, 70)])
        pattern = 9 * np.sin(2 * np.pi * u / (g.uniform(2.5, 5) * s)) + 5 * _smooth(g, size, 4)
    elif kind == "soil":
        base = _pick(g, [(152, 122, 92), (132, 108, 84), (170, 146, 112)])
        pattern = 12 * _smooth(g, size, 6) + 6 * _smooth(g, size, size // 4)
    elif kind == "urban":
        base = (128, 128, 132)
        p = g.uniform(9, 15) * s
        table = g.normal(0, 18, (64, 64)).astype(np.float32)
        blocks = table[(np.floor(u / p) % 64).astype(int), (np.floor(v / p) % 64).astype(int)]
        street = (np.mod(u, p) < 1.6 * s) | (np.mod(v, p) < 1.6 * s)
        pattern = np.where(street, -30.0, blocks)
    elif kind == "forest":
        base = (52, 88, 48)
        pattern = 16 * _smooth(g, size, size // 4) + 6 * _smooth(g, size, 5)
    elif kind == "grass":
        base = (112, 148, 84)
        pattern = 8 * _smooth(g, size, 5)
    else:  # water
        base = _water(g)
        pattern = 3 * _smooth(g, size, 3)
    tint = np.array(_rgb(g, base, 10), np.float32)
    return tint[None, None, :] + pattern[:, :, None]


_LANDS = ("field", "soil", "urban", "forest", "grass", "water")
_LAND_P = (0.26, 0.2, 0.18, 0.14, 0.14, 0.08)


def _ground(g: np.random.Generator, size: int, s: float) -> np.ndarray:
    """2-5 land-cover regions with wiggly borders (warped Voronoi cells), float [size, size, 3]."""
    k = int(g.integers(2, 6))
    seeds = g.uniform(0, size, (k, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist = np.stack([np.hypot(xx - x, yy - y) + 0.15 * size * _smooth(g, size, 4) for x, y in seeds])
    region = dist.argmin(0)
    out = np.zeros((size, size, 3), np.float32)
    for i in range(k):
        kind = _LANDS[int(g.choice(len(_LANDS), p=_LAND_P))]
        out = np.where((region == i)[:, :, None], _land(g, kind, size, s), out)
    return out


# -------------------------------------------------------------------------------------- scenes


def _place(g: np.random.Generator, thing: _Thing, size: int, taken: list, gap: float) -> _Thing | None:
    """Move `thing` to a random spot inside the image whose footprint keeps `gap` from `taken`."""
    lo, hi = thing.footprint()
    t_lo, t_hi = 1.0 - lo, size - 1.0 - hi
    if np.any(t_hi < t_lo):
        return None
    for _ in range(40):
        t = g.uniform(t_lo, t_hi)
        a0, a1 = lo + t, hi + t
        if all(np.any(a0 >= b1 + gap) or np.any(b0 >= a1 + gap) for b0, b1 in taken):
            taken.append((a0, a1))
            return thing.moved(t)
    return None


def _draw(things: list[_Thing], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Supersampled object layers: premultiplied colour [size, size, 3], coverage, shadow (0..1)."""
    big = (size * _SS, size * _SS)
    col, cov, shade = Image.new("RGB", big), Image.new("L", big), Image.new("L", big)
    dc, dv, ds = ImageDraw.Draw(col), ImageDraw.Draw(cov), ImageDraw.Draw(shade)
    for thing in things:
        for op in thing.ops:
            xy = [(float(x), float(y)) for x, y in op[1] * _SS]
            if op[0] == "shadow":
                ds.polygon(xy, fill=255)
            elif op[0] == "fill":
                dc.polygon(xy, fill=op[2])
                dv.polygon(xy, fill=255)
            else:
                w = max(1, round(op[3] * _SS))
                dc.line(xy, fill=op[2], width=w, joint="curve")
                dv.line(xy, fill=255, width=w, joint="curve")
    return _reduced(col), _reduced(cov)[:, :, None] / 255.0, _reduced(shade)[:, :, None] / 255.0


def _reduced(im: Image.Image) -> np.ndarray:
    return np.asarray(im.reduce(_SS), np.float32)


def render_aerial(g: np.random.Generator, size: int = 128, max_objects: int = 6) -> tuple[Image.Image, list[_Thing]]:
    """Draw one scene. Pure given `g`. Returns (RGB image, placed objects, largest first)."""
    s = size / 128.0
    ground = _ground(g, size, s)
    psi = g.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(psi), np.sin(psi)])
    names = [AERIAL_CLASSES[int(i)] for i in g.integers(len(AERIAL_CLASSES), size=int(g.integers(1, max_objects + 1)))]
    things = [_make(g, n, s, sun) for n in names]
    things.sort(key=lambda t: -t.footprint_area())  # big first, so that they fit
    taken: list = []
    placed = [p for p in (_place(g, t, size, taken, _GAP * s) for t in things) if p is not None]
    col, cov, shade = _draw(placed, size)
    img = ground * (1.0 - 0.45 * shade) * (1.0 - cov) + col
    img = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(g.uniform(0.3, 0.6) * s)), np.float32)
    img = img + g.normal(0.0, 3.0, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB"), placed


# ------------------------------------------------------------------------------------------ XML

_CORNERS = ("left_top", "right_top", "right_bottom", "left_bottom")


def _int_corners(thing: _Thing) -> np.ndarray:
    return np.rint(thing.corners).astype(int)


def _hbb_xml(fname: str, size: int, things: list[_Thing]) -> str:
    """DIOR's horizontal variant: tab-indented VOC with CRLF line ends, no XML declaration."""
    lines = ["<annotation>", f"\t<filename>{fname}</filename>", "\t<source>", "\t\t<database>DIOR</database>",
             "\t</source>", "\t<size>", f"\t\t<width>{size}</width>", f"\t\t<height>{size}</height>",
             "\t\t<depth>3</depth>", "\t</size>", "\t<segmented>0</segmented>"]
    for t in things:
        c = _int_corners(t)
        (x0, y0), (x1, y1) = c.min(0), c.max(0)
        lines += ["\t<object>", f"\t\t<name>{t.name}</name>", "\t\t<pose>Unspecified</pose>", "\t\t<bndbox>",
                  f"\t\t\t<xmin>{x0}</xmin>", f"\t\t\t<ymin>{y0}</ymin>", f"\t\t\t<xmax>{x1}</xmax>",
                  f"\t\t\t<ymax>{y1}</ymax>", "\t\t</bndbox>", "\t</object>"]
    return "\r\n".join(lines + ["</annotation>", ""])


def _obb_xml(fname: str, size: int, things: list[_Thing], image_dir: str) -> str:
    """DIOR's oriented variant: 4-space indent, <robndbox> corner points and <angle> (degrees)."""
    i1, i2, i3 = " " * 4, " " * 8, " " * 12
    folder = f"/{image_dir}.zip/{image_dir}/{image_dir}"
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', "<annotation>", f"{i1}<folder>{folder}</folder>",
             f"{i1}<filename>{fname}</filename>", f"{i1}<path>{folder}</path>", f"{i1}<source>",
             f"{i2}<database>Unknown</database>", f"{i1}</source>", f"{i1}<size>", f"{i2}<width>{size}</width>",
             f"{i2}<height>{size}</height>", f"{i2}<depth>3</depth>", f"{i1}</size>", f"{i1}<segmented>0</segmented>"]
    for t in things:
        c = _int_corners(t)
        lines += [f"{i1}<object>", f"{i2}<type>robndbox</type>", f"{i2}<name>{t.name}</name>",
                  f"{i2}<pose>Unspecified</pose>", f"{i2}<truncated>0</truncated>", f"{i2}<difficult>0</difficult>",
                  f"{i2}<robndbox>"]
        for k, (x, y) in zip(_CORNERS, c):
            lines += [f"{i3}<x_{k}>{x}</x_{k}>", f"{i3}<y_{k}>{y}</y_{k}>"]
        lines += [f"{i2}</robndbox>", f"{i2}<angle>{round(t.angle, 1) + 0.0:g}</angle>", f"{i1}</object>"]
    return "\n".join(lines + ["</annotation>", ""])


# ----------------------------------------------------------------------------------- generation


def _first_id(spec: AerialSpec, split: str) -> int:
    return 1 + sum(spec.n(s) for s in SPLITS[: SPLITS.index(split)])


def _write_one(tmp: Path, spec: AerialSpec, split: str, index: int) -> None:
    g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, SPLITS.index(split), index])))
    img, things = render_aerial(g, spec.size, spec.max_objects)
    name = f"{_first_id(spec, split) + index:05d}"
    img_dir = "JPEGImages-test" if split == "test" else "JPEGImages-trainval"
    img.save(tmp / img_dir / f"{name}.jpg", format="JPEG", quality=90, subsampling=0, optimize=False,
             progressive=False)
    (tmp / HBB_DIR / f"{name}.xml").write_bytes(_hbb_xml(f"{name}.jpg", spec.size, things).encode())
    (tmp / OBB_DIR / f"{name}.xml").write_bytes(_obb_xml(f"{name}.jpg", spec.size, things, img_dir).encode())


def _version_text(spec: AerialSpec) -> str:
    return f"{AERIAL_VERSION}\n{json.dumps(asdict(spec), sort_keys=True)}\n"


def default_aerial_root(spec: AerialSpec = AerialSpec()) -> Path:
    """<ATTRDIST_CACHE or ~/.cache/attrdist>/demo-aerial-<hash of spec + version>."""
    return cache_dir() / f"demo-aerial-{hashlib.sha256(_version_text(spec).encode()).hexdigest()[:12]}"


def _check(root: Path, spec: AerialSpec) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise AttrdistError(f"{root}: exists and is not this aerial demo (or is another spec); delete it or choose "
                            "a new directory")
    if spec.n_train < 1 or spec.n_val < 0 or spec.n_test < 0 or spec.n_train + spec.n_val + spec.n_test > 99_999:
        raise AttrdistError(f"aerial demo spec: {spec.n_train}/{spec.n_val}/{spec.n_test} images; use n_train >= 1 "
                            "and at most 99999 in all (DIOR ids have 5 digits)")
    if spec.size < 96 or not 1 <= spec.max_objects <= 6:
        raise AttrdistError(f"aerial demo spec: size={spec.size}, max_objects={spec.max_objects}; use size >= 96 "
                            "and 1 <= max_objects <= 6")


def ensure_aerial(root: Path | str | None = None, spec: AerialSpec = AerialSpec(), *, progress: bool = True) -> Path:
    """Generate the aerial demo at `root` (default: `default_aerial_root(spec)`) unless it is there.

    Written into a temporary sibling, DEMO_VERSION last, then renamed into place; if another
    process wins the race its copy is used.
    """
    from tqdm import tqdm

    root = Path(root).expanduser() if root is not None else default_aerial_root(spec)
    version = _version_text(spec)
    marker = root / "DEMO_VERSION"
    if marker.is_file() and marker.read_text() == version:
        return root
    _check(root, spec)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        for d in ("JPEGImages-trainval", "JPEGImages-test", HBB_DIR, OBB_DIR, "ImageSets/Main"):
            (tmp / d).mkdir(parents=True)
        jobs = [(split, i) for split in SPLITS for i in range(spec.n(split))]
        for split, i in tqdm(jobs, desc="attrdist aerial demo", unit="img", disable=not progress, leave=False):
            _write_one(tmp, spec, split, i)
        for split in SPLITS:
            first = _first_id(spec, split)
            ids = "".join(f"{first + i:05d}\n" for i in range(spec.n(split)))
            (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text(ids)
        (tmp / "DEMO_VERSION").write_text(version)
        try:
            os.replace(tmp, root)
        except OSError:
            if not (marker.is_file() and marker.read_text() == version):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def aerial_demo_shards(spec: AerialSpec | None = None) -> Path:
    """The aerial demo generated (DIOR layout) and packed by the real DIOR packer once; the shard dir."""
    from filelock import FileLock

    from attrdist.pack.dior import pack_dior

    spec = spec or AerialSpec()
    cache_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / "demo.lock")):
        root = ensure_aerial(None, spec)
        out = root.with_name(root.name + "-shards")
        if not (out / "manifest.json").is_file():
            pack_dior(root, out, dataset="dior-aerial-demo", progress=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attrdist.demo.aerial",
                                description="Generate the aerial demo (DIOR layout); print its root.")
    p.add_argument("--out", type=Path, default=None, help="dataset root (default: the cache dir)")
    for f in ("seed", "n_train", "n_val", "n_test", "size"):
        p.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(AerialSpec, f))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    spec = AerialSpec(seed=a.seed, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, size=a.size)
    with user_errors():
        print(ensure_aerial(a.out, spec, progress=not a.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
