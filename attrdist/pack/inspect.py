"""`attrdist inspect SHARDS`: summary of a packed dataset, and an optional contact sheet PNG."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

from attrdist.errors import AttrdistError
from attrdist.data.foreign import LabelError, sample_meta
from attrdist.data.reader import ShardReader, load_manifest


FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def _short(h: str | None) -> str:
    return (h or "")[:12]


def summary(root: str | os.PathLike) -> str:
    m = load_manifest(root)
    d = m.data
    out = [f"dataset: {d.get('dataset')}  (attrdist {d.get('attrdist_version')}, created {d.get('created')})",
           f"path: {m.root}", "splits:"]
    for name, info in d["splits"].items():
        out.append(f"  {name:<8} {info['nsamples']:>8} samples  {len(info['shards']):>4} shards")
    out.append(f"attributes: {len(m.attributes)}; label fields: {', '.join(m.label_fields)}")
    split = default_split(m)
    if split:
        info = d["splits"][split]
        n = max(1, info["nsamples"])
        for f, counts in info.get("label_counts", {}).items():
            ranked = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
            fmt = lambda idx: ", ".join(f"{m.attributes[i]} {counts[i]} ({counts[i] / n:.1%})" for i in idx)  # noqa: E731
            out.append(f"label frequencies [{split}/{f}] top: {fmt(ranked[:10])}")
            out.append(f"label frequencies [{split}/{f}] bottom: {fmt(ranked[::-1][:10])}")
    if "labels_from" in d:  # an index of foreign shards (attrdist index): no packer's report or drops
        from attrdist.pack.index import inspect_lines

        return "\n".join(out + inspect_lines(m))
    report = d.get("report") or {}
    for name, r in report.items():
        if name in ("leakage", "drops") or not isinstance(r, dict):
            continue
        dropped = {k: v for k, v in (r.get("dropped") or {}).items() if v}
        extra = {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "dropped"}
        out.append(f"report [{name}]: " + ", ".join(f"{k} {v}" for k, v in extra.items())
                   + f"; dropped: {', '.join(f'{k} {v}' for k, v in dropped.items()) or 'none'}")
    leak = report.get("leakage")
    if leak:
        pairs = ", ".join(f"{k} {v['exact']} exact/{v['near']} near" for k, v in leak.get("pairs", {}).items())
        out.append(f"leakage (distance <= {leak.get('max_distance')}): {leak.get('exact', 0)} exact, "
                   f"{leak.get('near', 0)} near ({pairs or 'no split pairs'})")
        for e in leak.get("examples", [])[:5]:
            out.append(f"  {e['a']} ~ {e['b']} (distance {e['distance']})")
        if leak.get("near_unconfirmed"):
            out.append(f"  {leak['near_unconfirmed']} more hash matches whose pixels differ (not duplicates; "
                       f"similarity < {leak.get('min_similarity')})")
        if leak.get("contact_sheet"):
            out.append(f"  contact sheet of the pairs: {leak['contact_sheet']}")
        if leak.get("policy"):
            out.append(f"  policy: {leak['policy']}")
    out += drop_lines(m.root)
    out.append("sources:")
    for s in d.get("sources", []):
        out.append(f"  {s.get('path')}  {s.get('bytes', '?')} bytes  sha256 {_short(s.get('sha256'))}")
    return "\n".join(out)


def read_drops(root: str | os.PathLike) -> list[dict] | None:
    """The records of the pack's drops.jsonl (every sample and box the packer left out), or None for a pack
    made before attrdist wrote it."""
    path = Path(root) / "drops.jsonl"
    if not path.is_file():
        return None
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise AttrdistError(f"{path}: unreadable ({type(e).__name__}: {e}); re-pack to write it again") from None


def drop_lines(root: str | os.PathLike, n: int = 3) -> list[str]:
    """Per split, what was dropped, by reason, with the first `n` names of each; and where the whole list is."""
    from attrdist.pack.pipeline import describe_drops

    records = read_drops(root)
    if records is None:
        return ["drops: not recorded (packed before attrdist wrote drops.jsonl)"]
    if not records:
        return ["drops: none: every listed sample and box was packed"]
    out = []
    for split in dict.fromkeys(r["split"] for r in records):
        for what in ("sample", "box"):
            rs = [r for r in records if r["split"] == split and r["what"] == what]
            if rs:
                out.append(f"  {split}: {what}s dropped: {describe_drops(rs, n)}")
    return ["drops (first names of each reason):", *out, f"every drop, named: {Path(root) / 'drops.jsonl'}"]


def finish_lines(manifest: dict, out_dir: str | os.PathLike) -> list[str]:
    """What every packer prints after its own summary: the drops by split (first names) and what it wrote."""
    return [*drop_lines(out_dir), f"wrote {Path(out_dir) / 'manifest.json'}"]


def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "DejaVuSansCondensed.ttf"):
        try:
            return ImageFont.truetype(str(FONT_DIR / name), size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size)
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        t = f"{cur} {word}".strip()
        if draw.textlength(t, font=font) <= width or not cur:
            cur = t
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    return lines


def default_split(manifest) -> str | None:
    """The split `inspect` shows by default: train when there is one, else the first."""
    names = list(manifest.data["splits"])
    return "train" if "train" in names else (names[0] if names else None)


def contact_sheet(root: str | os.PathLike, out: str | os.PathLike, *, n: int = 32, split: str | None = None,
                  seed: int = 0, tile: int = 224, cols: int = 8) -> tuple[int, int]:
    """Write a PNG of n random samples of `split` (seeded); returns its (width, height)."""
    from PIL import Image, ImageDraw

    from attrdist import atomic

    m = load_manifest(root)
    split = split or default_split(m)
    if not m.has_split(split):
        raise AttrdistError(f"{m.root}: no split {split!r} (have: {', '.join(m.data['splits'])}); pass --split with one of them")
    reader = ShardReader(m, split)
    idx = sorted(random.Random(seed).sample(range(len(reader)), min(n, len(reader))))
    names = m.attributes
    cats = m.data.get("categories") or names
    font, small = _font(13), _font(11)
    text_h = 86
    cols = max(1, min(cols, len(idx)))
    rows = max(1, (len(idx) + cols - 1) // cols)
    pad = 6
    W, H = cols * (tile + pad) + pad, rows * (tile + text_h + pad) + pad
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(idx):
        s = reader[i]
        try:
            meta = sample_meta(s, reader.labels_from, len(names))
        except LabelError:  # a foreign shard's sample without usable labels (attrdist index counted it)
            meta = {}
        data = next((s[e] for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
        x0, y0 = pad + (k % cols) * (tile + pad), pad + (k // cols) * (tile + text_h + pad)
        if data is None:
            draw.text((x0, y0), "no image", fill=(200, 0, 0), font=font)
            continue
        im = Image.open(io.BytesIO(data)).convert("RGB")
        scale = tile / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
        sheet.paste(im, (x0, y0))
        blabels = meta.get("box_labels") or []
        for b, box in enumerate(meta.get("boxes") or []):
            bx, by, bw, bh = (float(v) * scale for v in box[:4])
            draw.rectangle([x0 + bx, y0 + by, x0 + bx + bw, y0 + by + bh], outline=(255, 0, 255), width=2)
            if b < len(blabels):
                li = blabels[b]
                name = cats[li] if isinstance(li, int) and 0 <= li < len(cats) else str(li)
                tw = draw.textlength(name, font=small)
                ty = max(y0, y0 + by - 14)
                draw.rectangle([x0 + bx, ty, x0 + bx + tw + 4, ty + 14], fill=(255, 0, 255))
                draw.text((x0 + bx + 2, ty), name, fill=(255, 255, 255), font=small)
        lab = lambda f: ", ".join(names[a] for a in meta.get(f, []) if 0 <= a < len(names))  # noqa: E731
        lines = [f"#{i} {meta.get('id', '')}"]
        lines += _wrap(draw, "labels: " + (lab("labels") or "-"), small, tile)
        if "true_labels" in meta:
            lines += [f"\x00{t}" for t in _wrap(draw, "true: " + (lab("true_labels") or "-"), small, tile)]
        ty = y0 + tile + 2
        for line in lines[:6]:
            colour = (0, 110, 0) if line.startswith("\x00") else (0, 0, 0)
            draw.text((x0, ty), line.lstrip("\x00"), fill=colour, font=small if ty > y0 + tile + 2 else font)
            ty += 14
    with atomic.atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return W, H
