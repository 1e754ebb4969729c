"""The contributor guide, executable: how to add a dataset format.

A new source format is one `PackFormat` subclass (in attrdist/pack/<format>.py, with its CLI in
shards/<format>.py): it lists the images and turns one image into samples; `attrdist.pack.pipeline.pack`
does the rest (verify, leak check, write, commit). This test defines a toy format here, with the
public interface only, packs it, and reads it back as training does.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from PIL import Image

from attrdist.data.reader import ShardReader, load_manifest
from attrdist.pack.pipeline import ImageItem, PackFormat, Tally, pack


class CsvFormat(PackFormat):
    """A toy format: <root>/<split>.csv, one `image path,label` per line (paths relative to root)."""

    def __init__(self, root: Path, classes: list[str]):
        self.root = root
        self.dataset, self.attributes, self.splits = "csv-toy", classes, ["train", "val"]
        self.tally = Tally(self.splits)  # what is not packed, counted by reason per split

    def images(self) -> list[ImageItem]:
        out = []
        for split in self.splits:
            with open(self.root / f"{split}.csv", newline="") as f:
                for path, label in csv.reader(f):
                    out.append(ImageItem(split, key=Path(path).stem, path=str(self.root / path),
                                         info=self.attributes.index(label)))
        return out

    def samples(self, image, meta, task, result):
        data, ext, (w, h), crc = result  # the default pass 2 (load_image_item): the bytes, copied through
        sample = {"id": image.key, "labels": [image.info], "width": w, "height": h}
        yield image.key, {ext: data, "json": sample}, {ext: crc}


def _jpeg(colour: tuple[int, int, int], size: int) -> bytes:
    """A real photo-like JPEG (noise, so no two are near-duplicates for the leak check)."""
    import numpy as np

    rng = np.random.default_rng(sum(colour) + size)
    pixels = np.clip(rng.normal(colour, 60, (size, size + 8, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_add_a_dataset_format(tmp_path):
    root = tmp_path / "toy"
    (root / "img").mkdir(parents=True)
    rows = {"train": [("img/a1.jpg", "cat"), ("img/a2.jpg", "dog"), ("img/a3.jpg", "cat"), ("img/gone.jpg", "dog")],
            "val": [("img/b1.jpg", "dog"), ("img/b2.jpg", "cat")]}
    written = {}
    for i, (split, lines) in enumerate(rows.items()):
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(lines)
        for j, (path, _) in enumerate(lines):
            if "gone" not in path:  # listed, but the file is missing: counted, not fatal
                written[Path(path).stem] = _jpeg((40 * j, 200 - 50 * i, 90 + 30 * j), 48 + 8 * j)
                (root / path).write_bytes(written[Path(path).stem])

    out = tmp_path / "shards"
    manifest = pack(CsvFormat(root, ["cat", "dog"]), out, max_samples=2, workers=2, progress=False)

    assert manifest["report"]["train"] == {"packed": 3, "dropped": {"missing_image": 1}}
    assert manifest["report"]["val"] == {"packed": 2, "dropped": {}}
    assert manifest["report"]["leakage"]["exact"] == manifest["report"]["leakage"]["near"] == 0
    m = load_manifest(out)
    assert m.attributes == ["cat", "dog"] and m.label_fields == ["labels"]
    assert m.split("train")["label_counts"] == {"labels": [2, 1]} and m.split("val")["nsamples"] == 2
    for split, lines in rows.items():
        reader = ShardReader(m, split)
        got = [reader[i] for i in range(len(reader))]
        expected = [(Path(p).stem, label) for p, label in lines if "gone" not in p]
        assert [s["__key__"] for s in got] == [k for k, _ in expected]  # listed order, split by split
        for s, (key, label) in zip(got, expected):
            meta = json.loads(s["json"])
            assert meta["id"] == key and meta["labels"] == [m.attributes.index(label)]
            assert s["jpg"] == written[key]  # the file's bytes, copied through
            assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(s["jpg"])).size
