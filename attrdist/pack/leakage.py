"""Duplicate and near-duplicate detection across splits (train/val/test leakage), run at pack time.

    fp = {split: [(key, *fingerprint(jpeg_bytes), path) for key, jpeg_bytes, path in ...]}
    report = find_leaks(fp, confirm=...)     # JSON-able, store under manifest report["leakage"]
    drop = apply_policy(report, "error", where=str(out_dir))   # or "warn" / "drop"

(`attrdist.pack.pipeline.check_leakage` does all of it for a pack, reading the candidates' files again.)
Two stages: the perceptual hash finds CANDIDATES among all images cheaply; a pixel comparison of only those
candidates CONFIRMS them. Exact copies (same sha1) need no confirmation.

Fingerprint = (sha1 of the file bytes, 64-bit perceptual hash). The hash: decode (JPEG draft to
>= 64 px), grayscale, bilinear resize to 32x32, 2-D DCT-II, and take the SIGNS of 64 mid-frequency
coefficients (positions 60..123 of the zig-zag order of AC coefficients, u+v ~ 10..15). Signs of
AC coefficients are invariant to brightness and contrast and stable under re-encoding and resizing.
Mirroring negates exactly the coefficients with odd horizontal frequency, so hash(mirror(img)) ==
hash(img) ^ MIRROR_MASK: `find_leaks` also matches every hash against the mirrored hashes of the
other split, so horizontally flipped copies are caught at no extra hashing cost.

Why mid frequencies: the lowest 64 coefficients (classic pHash) encode the coarse layout, and the
built-in demo (shapes on four smooth backgrounds) has many DISTINCT images with the same coarse
layout: with the lowest 64 coefficients, 13 distinct cross-split pairs of the default demo have
distance 0 (classic median-threshold pHash: 5 at distance 0), so no threshold is false-positive-free.

Measured (scripts: tests/test_leakage.py reproduces the key numbers), Hamming distance with mirror matching:
  False positives, distinct images, all cross-split pairs (train|val, train|test, val|test):
    default demo (DemoSpec(): 2400/400/400, 2.08M pairs): 0 pairs at d<=2, 7 at d=3, 5 at d=4, 3 at d=5
    small demo (800/200/200): 0 at d<=2;  16 real COCO photos (120 pairs): minimum distance 22
  Augmented copies vs original (16 COCO photos | 60 demo val images), max distance:
    JPEG q50: 1 | 10     resize 0.5x: 3 | 7     brightness +10%: 2 | 6     colour jitter
    (b/c/s 0.2, hue 0.02): 3 | 7     horizontal flip: 5 (median 0) | 2
    crop 5% each side: median 18 | 14 (NOT caught)   rotation 5 deg: median 18 | 16 (NOT caught)
    rotation 15 deg, random-resized-crop (scale 0.8-1): median ~30 | ~27 (= unrelated images; NOT caught)
  Detection rate at DEFAULT_MAX_DISTANCE=2 on the 16 COCO photos: JPEG q60 16/16, brightness +10% 16/16,
    hflip 13/16, resize 0.8x 12/16, crop 1% each side 9/16 (tests/test_leakage.py checks the first 8).
DEFAULT_MAX_DISTANCE = 2: the largest threshold with zero false positives on the default demo
(which packers check with policy "error"); it catches exact copies, re-encodes, resizes, brightness
and colour jitter and flips of real photos (most of them: coco resize 0.5x max 3, jitter max 3,
flip max 5 are partly above it), and on the tiny 80 px demo images about 90% of these.
LIMITS: a global 64-bit hash cannot catch rotations (>= ~3 deg) or crops beyond ~2% without
flagging distinct demo images (all measured rotated/cropped copies sit at 14-30 bits, where distinct
demo images already are). Leakage from offline geometric augmentation (experiment 5) must be
prevented by splitting on the SOURCE image id before augmenting; this check catches copies and
photometric/re-encoded/flipped variants.

Confirmation (issue 18). On small simple images 64 bits are not enough: capitals of DIFFERENT fonts
(64 px glyphs) match at hash distance 1-2, and a pack of a font-split glyph set was refused over them.
So a hash candidate counts only when `similarity` >= DEFAULT_MIN_SIMILARITY = 0.98: both images in grey,
bilinear to 32x32, each standardised (mean 0, std 1: brightness and contrast out), and the normalised
correlation taken, the largest over B as it is or mirrored and over centre crops keeping 1/1.02 or
1/1.04 of each side of either image (a copy cropped by 1-2 % each side lines up again; without the
crops, crop-1% copies of COCO photos fell to 0.978). Unconfirmed candidates are reported
(report["near_unconfirmed"], per split pair, and "unconfirmed_examples" with their similarity) and
neither block nor drop. Measured by bench/leak_confirm.py (bench/results/leak_confirm.csv), every hash
candidate (d <= 2):
  glyphs, 64x64 black capitals A-Z on white, 21 DejaVu font files x 4 sizes (36/44/52/60 pt), pairs of
    two different files: Sans/Sans Condensed/Sans Mono faces vs Serif faces: 15 hash candidates of 281k
    pairs, 0 confirmed (similarity 0.85-0.96); styles of one family (Bold vs Oblique...): 0 of 40
    confirmed; but Sans vs Sans Condensed vs Sans Mono, and Serif vs Serif Condensed, draw many capitals
    alike (Sans Mono's F, E, P, T are Sans's, 0.74 grey levels apart on average at 56 pt): 46 of 97
    such candidates confirmed (up to 0.999; the other 51 at 0.73-0.979). Those are pixel copies: no
    pixel check can tell them apart, so a glyph set split by font must not put Sans Mono or a Condensed
    face in another split than the face it derives from (tests/test_leakage.py packs Sans | Serif).
  augmented copies the hash finds (16 COCO photos | 60 demo images | 56 glyphs), all confirmed,
    smallest similarity: JPEG q50 0.9998 | 0.995 | 0.9994, resize 0.5x 0.996 | 0.985 | 0.9994,
    resize 0.8x 0.994 | 0.996 | 0.9994, crop 1% 0.996 | 0.9999 | 0.9999, crop 2% 0.9994 | 0.998 |
    0.9992, brightness +15% 0.994 | 0.990 | 0.9996, colour jitter 0.9975 | 0.985 | 0.9997, hflip
    0.992 | 0.9999 | 0.9999: the confirmation loses none of the copies the hash catches (the smallest,
    0.985, leaves a margin of 0.005; the largest look-alike of another design, 0.96, one of 0.02).
  the characters demo (random fonts/rotations; offline copies shifted +-3 px and rotated +-8 deg), 26 x
    10 sources x 3: the hash matched 2 of its 780 copy pairs (0.958, 0.972) and the pixel check rejects
    them: rotated copies were never reliably caught (see LIMITS), and now not by chance either.
  cost: 2.0-2.4 ms per candidate pair (two 640 px JPEGs read, draft-decoded, compared; one thread); only
    candidates are decoded, in `check_leakage`'s worker threads.
A candidate whose file cannot be read again counts as a duplicate (report["near_unchecked"]).

When duplicates are found, `check_leakage` writes a contact sheet of the first SHEET_PAIRS pairs side by
side (`contact_sheet`, labelled with both paths, the distance and similarity) BESIDE the output directory,
`<out>.leaks.png` (`sheet_path`; atomically; never inside the previous pack), and the message names it.
The message names pairs by file path and ends with the format's advice (`ADVICE_GIVEN_SPLITS` where the
input gives the splits, `ADVICE_GROUPS` where a group split made them); "drop" logs the files it drops.

find_leaks is multi-index hashing: the 64 bits are cut into m chunks; a pair within distance d
agrees to within floor(d/m) bits on at least one chunk (pigeonhole), so candidates come from
sorted-chunk look-ups of every probe within that radius, then are verified with a numpy popcount.
m is chosen per call to minimise the expected work; 2 x 100k random hashes take ~0.3 s (2-core machine).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attrdist.errors import AttrdistError

__all__ = ["DEFAULT_MAX_DISTANCE", "DEFAULT_MIN_SIMILARITY", "MIRROR_MASK", "fingerprint", "perceptual_hash",
           "image_views", "similarity", "pixel_similarity", "find_leaks", "apply_policy", "contact_sheet",
           "ADVICE_GIVEN_SPLITS", "ADVICE_GROUPS"]

DEFAULT_MAX_DISTANCE = 2
DEFAULT_MIN_SIMILARITY = 0.98  # a hash match is a near duplicate when `similarity` >= this (module docstring)
CONFIRM_SCALES = (1.0, 1.02, 1.04)  # centre crops compared (1/s of each side kept): crops of 1-2% each side
FLAT_STD = 0.5  # grey levels: a view with less spread is featureless
MAX_EXAMPLES = 20
_N = 32
_K0 = 60  # first zig-zag AC coefficient used (see the module docstring)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


_D = _dct_matrix(_N)
_ZIGZAG = sorted(((u, v) for u in range(_N) for v in range(_N) if (u, v) != (0, 0)), key=lambda t: (t[0] + t[1], t[0]))
_SEL = _ZIGZAG[_K0:_K0 + 64]
_U = np.array([u for u, _ in _SEL])
_V = np.array([v for _, v in _SEL])
_WEIGHTS = np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)  # bit i of the hash = coefficient i


def _pack(bits: np.ndarray) -> int:
    return int(np.sum(_WEIGHTS[bits.astype(bool)], dtype=np.uint64))


MIRROR_MASK: int = _pack(_V % 2 == 1)  # hash(mirrored image) == hash(image) ^ MIRROR_MASK


def perceptual_hash(data: bytes) -> int:
    """64-bit hash of the decoded image (raises on undecodable data)."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG":
            im.draft("L", DRAFT_SIZE)
        return hash_image(im)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from None


DRAFT_SIZE = (2 * _N, 2 * _N)  # packers decode with `im.draft("L", DRAFT_SIZE)` once and call hash_image


def hash_image(im) -> int:
    """The perceptual hash of an opened PIL image (for packers that already decoded it)."""
    from PIL import Image

    g = np.asarray(im.convert("L").resize((_N, _N), Image.BILINEAR), dtype=np.float64)
    c = (_D @ g @ _D.T)[_U, _V]
    return _pack(c > 0)


def fingerprint(data: bytes) -> tuple[str, int]:
    """(sha1 hex of the raw bytes, 64-bit perceptual hash as a Python int)."""
    return hashlib.sha1(data).hexdigest(), perceptual_hash(data)


# ------------------------------------------------------------------------------------------ search

_ORDER = {"train": 0, "val": 1, "test": 2}


def _split_order(splits) -> list[str]:
    return sorted(splits, key=lambda s: (_ORDER.get(s, 3), s))


def _chunks(m: int) -> list[tuple[int, int]]:
    """(shift, width) of m chunks covering 64 bits."""
    out, lo = [], 0
    for i in range(m):
        w = 64 // m + (1 if i < 64 % m else 0)
        out.append((lo, w))
        lo += w
    return out


def _probe_masks(width: int, r: int) -> np.ndarray:
    masks = [0]
    for k in range(1, r + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(width), k)]
    return np.array(masks, dtype=np.uint64)


def _plan(na: int, nb: int, d: int) -> int:
    """Number of chunks minimising probes + expected candidates (uniform-hash model)."""
    best, best_m = math.inf, 1
    for m in range(1, min(d + 1, 16) + 1):
        r = d // m
        cost = 0.0
        for _, w in _chunks(m):
            p = sum(math.comb(w, k) for k in range(r + 1))
            cost += na * p * (1 + nb / 2.0 ** w) + nb
        if cost < best:
            best, best_m = cost, m
    return best_m


def _near_pairs(a: np.ndarray, b: np.ndarray, d: int, block: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (i, j, dist) with popcount(a[i] ^ b[j]) <= d."""
    if len(a) == 0 or len(b) == 0:
        e = np.zeros(0, np.int64)
        return e, e, e
    if len(a) > len(b):
        j, i, dist = _near_pairs(b, a, d, block)
        return i, j, dist
    m = _plan(len(a), len(b), d)
    r = d // m
    found_i, found_j = [], []
    for shift, w in _chunks(m):
        mask = np.uint64((1 << w) - 1)
        cb = (b >> np.uint64(shift)) & mask
        order = np.argsort(cb, kind="stable")
        cb_sorted = cb[order]
        probes = _probe_masks(w, r)
        ca = (a >> np.uint64(shift)) & mask
        step = max(1, block // len(probes))
        for s in range(0, len(a), step):
            q = (ca[s:s + step, None] ^ probes[None, :]).ravel()
            qi = np.repeat(np.arange(s, min(s + step, len(a))), len(probes))
            lo = np.searchsorted(cb_sorted, q, "left")
            hi = np.searchsorted(cb_sorted, q, "right")
            n = hi - lo
            keep = n > 0
            if not keep.any():
                continue
            lo, n, qi = lo[keep], n[keep], qi[keep]
            ii = np.repeat(qi, n)
            starts = np.repeat(lo - np.cumsum(n) + n, n)
            jj = order[starts + np.arange(len(ii))]
            ok = np.bitwise_count(a[ii] ^ b[jj]) <= d
            found_i.append(ii[ok])
            found_j.append(jj[ok])
    if not found_i:
        e = np.zeros(0, np.int64)
        return e, e, e
    pair = np.unique(np.concatenate(found_i).astype(np.int64) * len(b) + np.concatenate(found_j))
    i, j = pair // len(b), pair % len(b)
    return i, j, np.bitwise_count(a[i] ^ b[j]).astype(np.int64)


# ------------------------------------------------------------------------------------------ confirmation


def image_views(data: bytes) -> np.ndarray:
    """What `similarity` compares: uint8 [len(CONFIRM_SCALES), 32, 32], the image in grey (a JPEG decoded in
    draft mode to >= 64 px, like the hash) cut to its centre keeping 1/s of each side for each s in
    CONFIRM_SCALES, each bilinearly resized to 32x32. Raises ValueError on undecodable data."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        if im.format == "JPEG":
            im.draft("L", DRAFT_SIZE)
        im = im.convert("L")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from None
    w, h = im.size
    views = []
    for s in CONFIRM_SCALES:
        cw, ch = w / s, h / s
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        views.append(np.asarray(im.resize((_N, _N), Image.BILINEAR, box=box), dtype=np.uint8))
    return np.stack(views)


def _standardise(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each view with mean 0 and standard deviation 1 (brightness and contrast taken out), flattened; a flat
    view (std < FLAT_STD grey levels) becomes zeros. Returns (views [k, n*n], flat [k])."""
    x = v.reshape(len(v), -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    sd = x.std(axis=1)
    flat = sd < FLAT_STD
    return x / np.where(flat, 1.0, sd)[:, None] * ~flat[:, None], flat


def similarity(va: np.ndarray, vb: np.ndarray) -> float:
    """Pixel similarity of two images' `image_views`: the largest normalised correlation (Pearson's r of the
    32x32 grey pixels) of A's full view with each of B's, or B's full view with each of A's, with B as it is
    or mirrored (the hash matches mirrors too). 1.0 = the same picture up to brightness and contrast; two flat
    (featureless) images count as 1.0, one flat image against a non-flat one as 0.0."""
    za, fa = _standardise(va)
    best = -1.0
    for b in (vb, vb[:, :, ::-1]):
        zb, fb = _standardise(b)
        if fa[0] and fb[0]:
            return 1.0
        n = za.shape[1]
        best = max(best, float(np.max(zb @ za[0]) / n), float(np.max(za @ zb[0]) / n))
    return best


def pixel_similarity(a: bytes, b: bytes) -> float:
    """`similarity` of two encoded images."""
    return similarity(image_views(a), image_views(b))


# ------------------------------------------------------------------------------------------ report


def find_leaks(items: dict[str, list[tuple]], max_distance: int = DEFAULT_MAX_DISTANCE, *,
               confirm: Callable[[list[tuple[tuple[str, str], tuple[str, str]]]], list[float | None]] | None = None,
               min_similarity: float = DEFAULT_MIN_SIMILARITY) -> dict:
    """Exact (same sha1) and near (hash distance <= max_distance, incl. mirrored) duplicates across every pair of splits.

    `items[split]` rows are (key, sha1, phash) or (key, sha1, phash, name): the name (a file path) is what the
    report shows for the image, else "<split>/<key>". `confirm`, given the near candidates as ((split, key),
    (split, key)) pairs, returns each pair's pixel similarity (`similarity`), or None where it could not be
    computed: a candidate counts as a near duplicate when its similarity is >= min_similarity or unknown
    (None: counted as such, and in "near_unchecked"); the others are reported ("near_unconfirmed",
    "unconfirmed_examples") but neither block nor drop. Without `confirm` every candidate counts (hash only).

    Returns {"max_distance", ["min_similarity"], "pairs": {"a|b": {"exact", "near", "near_unconfirmed"}},
    "exact", "near", "near_unconfirmed", "near_unchecked", "examples": [{"a", "b", "splits", "distance",
    ["similarity"]}] (up to 20, exact first), "unconfirmed_examples" (likewise), "drop": {split: [keys]},
    "drop_files": {split: [names]}} where drop lists the copies in the LATER split (train < val < test <
    others), so a drop policy keeps train's copy.
    """
    if max_distance < 0 or max_distance > 32:
        raise AttrdistError(f"leakage max_distance={max_distance}: out of range; use 0..32 (default {DEFAULT_MAX_DISTANCE})")
    splits = _split_order(items)
    arrays, names = {}, {}
    for s in splits:
        rows = items[s]
        keys = [r[0] for r in rows]
        sha = [r[1] for r in rows]
        h = np.array([int(r[2]) & ((1 << 64) - 1) for r in rows], dtype=np.uint64)
        arrays[s] = (keys, sha, h)
        names.update({(s, r[0]): str(r[3]) for r in rows if len(r) > 3 and r[3] is not None})
    name = lambda s, k: names.get((s, k), f"{s}/{k}")  # noqa: E731
    mirror = np.uint64(MIRROR_MASK)
    exact_pairs: dict[tuple[str, str], set] = {}
    near_pairs: list[tuple[str, str, int, int, int]] = []  # (x, y, i, j, distance)
    for x, y in itertools.combinations(splits, 2):
        kx, sx, hx = arrays[x]
        ky, sy, hy = arrays[y]
        by_sha: dict[str, list[int]] = {}
        for i, s in enumerate(sx):
            by_sha.setdefault(s, []).append(i)
        exact = set()
        for j, s in enumerate(sy):
            for i in by_sha.get(s, ()):
                exact.add((i, j))
        best: dict[tuple[int, int], int] = {}
        for hq in (hy, hy ^ mirror):
            ii, jj, dd = _near_pairs(hx, hq, max_distance)
            for i, j, dist in zip(ii.tolist(), jj.tolist(), dd.tolist()):
                if (i, j) not in exact and dist < best.get((i, j), 99):
                    best[(i, j)] = dist
        exact_pairs[(x, y)] = exact
        near_pairs += [(x, y, i, j, dist) for (i, j), dist in sorted(best.items())]
    sims: list[float | None] = [None] * len(near_pairs)
    if confirm is not None and near_pairs:
        sims = list(confirm([((x, arrays[x][0][i]), (y, arrays[y][0][j])) for x, y, i, j, _ in near_pairs]))
    report = {"max_distance": max_distance, **({"min_similarity": min_similarity} if confirm else {}), "pairs": {},
              "exact": 0, "near": 0, "near_unconfirmed": 0, "near_unchecked": 0}
    exact_ex, near_ex, unconf_ex = [], [], []
    drop: dict[str, set] = {}
    for x, y in itertools.combinations(splits, 2):
        kx, ky = arrays[x][0], arrays[y][0]
        exact = exact_pairs[(x, y)]
        near, unconf = [], []
        for (px, py, i, j, dist), sim in zip(near_pairs, sims):
            if (px, py) != (x, y):
                continue
            if confirm is None or sim is None or sim >= min_similarity:
                near.append((dist, i, j, sim))
                report["near_unchecked"] += confirm is not None and sim is None
            else:
                unconf.append((dist, i, j, sim))
        report["pairs"][f"{x}|{y}"] = {"exact": len(exact), "near": len(near), "near_unconfirmed": len(unconf)}
        report["exact"] += len(exact)
        report["near"] += len(near)
        report["near_unconfirmed"] += len(unconf)

        def ex(dist, i, j, sim):
            e = {"a": name(x, kx[i]), "b": name(y, ky[j]), "splits": f"{x}|{y}", "distance": int(dist)}
            return e if sim is None else {**e, "similarity": round(float(sim), 4)}

        exact_ex += [{**ex(0, i, j, None), "exact": True} for i, j in sorted(exact)[:MAX_EXAMPLES]]
        near_ex += [ex(*t) for t in sorted(near, key=lambda t: (t[0], -(t[3] or 0), t[1], t[2]))[:MAX_EXAMPLES]]
        unconf_ex += [ex(*t) for t in sorted(unconf, key=lambda t: (-t[3], t[0], t[1], t[2]))[:MAX_EXAMPLES]]
        if exact or near:
            drop.setdefault(y, set()).update(ky[j] for j in itertools.chain((j for _, j in exact),
                                                                           (t[2] for t in near)))
    near_ex.sort(key=lambda e: (e["distance"], -e.get("similarity", 1.0)))
    unconf_ex.sort(key=lambda e: -e["similarity"])
    report["examples"] = (exact_ex + near_ex)[:MAX_EXAMPLES]
    report["unconfirmed_examples"] = unconf_ex[:MAX_EXAMPLES]
    report["drop"] = {s: sorted(drop[s]) for s in splits if s in drop}
    report["drop_files"] = {s: [name(s, k) for k in keys] for s, keys in report["drop"].items()}
    return report


# Advice for a leak error (`apply_policy`, a pack format's `leak_advice`), by where the splits come from.
ADVICE_GIVEN_SPLITS = ("the splits are given by the input (its folders or lists), so remove or move one image of "
                       "each pair, or pass --on-leak=warn|drop (drop removes the copies from the later split)")
ADVICE_GROUPS = ("give each image and its copies the same group so they land in one split (--group-by csv with a "
                 "path,group file, or a shared file-name prefix with --group-by prefix), or pass --on-leak=warn|drop "
                 "(drop removes the copies from the later split)")
SHOW = 3  # pairs named in a message
LIST = 10  # dropped files named in the drop log line


def _pair(e: dict) -> str:
    how = "exact copy" if e.get("exact") else (f"distance {e.get('distance')}"
                                                + (f", similarity {e['similarity']:.3f}" if "similarity" in e else ""))
    return f"{e.get('a')} ~ {e.get('b')} ({how})"


def apply_policy(report: dict, policy: str, where: str, *, advice: str | None = None,
                 sheet: str | None = None) -> dict[str, set[str]]:
    """error: raise AttrdistError on any leak; warn: log it, return {}; drop: log the files, {split: keys to leave out}.

    The message names the first pairs (as `find_leaks` names them: file paths where it knew them), the contact
    sheet `sheet` if one was written, and for "error" `advice` (default ADVICE_GIVEN_SPLITS)."""
    if policy not in ("error", "warn", "drop"):
        raise AttrdistError(f"{where}: unknown leak policy {policy!r}; use --on-leak=error|warn|drop")
    exact, near = int(report.get("exact", 0)), int(report.get("near", 0))
    if exact + near == 0:
        return {}
    pairs = ", ".join(f"{k} {v['exact']} exact/{v['near']} near" for k, v in report.get("pairs", {}).items()
                      if v["exact"] or v["near"])
    rule = f"hash distance <= {report.get('max_distance')}"
    if "min_similarity" in report:
        rule += f" and pixel similarity >= {report['min_similarity']}"
    unconfirmed = int(report.get("near_unconfirmed", 0))
    if unconfirmed:
        rule += f"; {unconfirmed} more hash matches failed the pixel check and are ignored"
    ex = report.get("examples") or []
    shown = "; ".join(_pair(e) for e in ex[:SHOW])
    more = exact + near - min(len(ex), SHOW)
    msg = (f"{where}: {exact} exact and {near} near-duplicate images shared across splits ({pairs}; {rule})"
           + (f"; e.g. {shown}" + (f" and {more} more" if more > 0 else "") if shown else "")
           + (f"; side by side in {sheet}" if sheet else ""))
    log = logging.getLogger("attrdist")
    if policy == "error":
        raise AttrdistError(f"{msg}; {advice or ADVICE_GIVEN_SPLITS}")
    if policy == "warn":
        log.warning("%s; keeping them (--on-leak=warn)", msg)
        return {}
    drop = {s: set(keys) for s, keys in report.get("drop", {}).items()}
    files = [f for fs in (report.get("drop_files") or report.get("drop") or {}).values() for f in fs]
    counts = ", ".join(f"{s} {len(k)}" for s, k in drop.items())
    log.warning("%s; --on-leak=drop: dropping %d images from the later split (%s): %s%s", msg, len(files), counts,
                ", ".join(files[:LIST]), f" and {len(files) - LIST} more (all in the manifest's "
                                          f"report['leakage']['drop_files'])" if len(files) > LIST else "")
    return drop


def contact_sheet(rows: list[tuple[bytes | None, bytes | None, str, str, str]], thumb: int = 128) -> bytes:
    """A PNG of image pairs side by side: each row (bytes a, bytes b, label a, label b, caption) shows both
    images (fitted into thumb x thumb, small ones enlarged by a whole factor; None: a grey box) and, to their
    right, the two labels and the caption."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        font = ImageFont.load_default()
    pad, text_w, chars = 8, 560, 80
    row_h = thumb + pad
    sheet = Image.new("RGB", (2 * thumb + 3 * pad + text_w, pad + row_h * max(1, len(rows))), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (da, db, la, lb, caption) in enumerate(rows):
        y = pad + r * row_h
        for c, data in enumerate((da, db)):
            x = pad + c * (thumb + pad)
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=(200, 200, 200))
            if data is None:
                continue
            try:
                im = Image.open(io.BytesIO(data))
                im.draft("RGB", (thumb, thumb))
                im = im.convert("RGB")
                k = thumb // max(im.size)
                if k >= 2:  # a small image (a 64 px glyph): enlarged, pixels kept sharp
                    im = im.resize((im.width * k, im.height * k), Image.NEAREST)
                im.thumbnail((thumb, thumb))
                sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
            except Exception:  # noqa: BLE001 - a file that went bad since pass 1: the grey box says so
                pass
            draw.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=(120, 120, 120))
        x = 2 * thumb + 3 * pad
        for k, text in enumerate((f"A: {la}", f"B: {lb}", caption)):
            text = text if len(text) <= chars else "..." + text[-(chars - 3):]
            try:
                draw.text((x, y + 4 + 20 * k), text, fill="black", font=font)
            except UnicodeEncodeError:  # the bitmap font is latin-1 only
                draw.text((x, y + 4 + 20 * k), text.encode("ascii", "replace").decode(), fill="black", font=font)
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", SHEET_MARK)  # `is_leak_sheet`: only a sheet attrdist wrote is replaced or removed
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


SHEET_MARK = "attrdist leak contact sheet"


def is_leak_sheet(path: str | os.PathLike) -> bool:
    """`path` is a contact sheet a packer wrote (its PNG text says so), so a packer may replace or remove it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software") == SHEET_MARK
    except (OSError, ValueError, SyntaxError):
        return False


SHEET_PAIRS = 8  # pairs drawn in a leak's contact sheet


def sheet_path(out_dir: str | os.PathLike) -> Path | None:
    """Where a pack's leak contact sheet goes: beside the output directory, `<out_dir>.leaks.png` (never inside
    it, which may hold the previous pack); None where out_dir has no name (a file system root)."""
    p = Path(os.path.abspath(out_dir))
    return p.with_name(f"{p.name}.leaks.png") if p.name else None


def leak_sheet(report: dict, read: Callable[[str], bytes | None]) -> bytes:
    """The contact sheet (PNG, `contact_sheet`) of a `find_leaks` report's first SHEET_PAIRS duplicate pairs,
    exact copies first; `read(name)` gives an image's bytes (None: drawn as a grey box)."""
    def get(name):
        try:
            return read(name)
        except OSError:
            return None

    rows = []
    for e in report.get("examples", [])[:SHEET_PAIRS]:
        how = ("exact copy (same bytes)" if e.get("exact") else f"hash distance {e.get('distance')}"
               + (f", pixel similarity {e['similarity']:.3f}" if "similarity" in e else ""))
        rows.append((get(e["a"]), get(e["b"]), e["a"], e["b"], f"{how}; splits {e.get('splits', '?')}"))
    return contact_sheet(rows)
