"""Issue 8, item 9: the config and annotation readers under fuzzing (hypothesis). Whatever the input, each
reader returns a result or raises attrdist's own AttrdistError (one line, naming the file or the key):
never another exception, never a hang. Inputs are random and mutated real files: the override parser,
saved config.json, the shard manifest and the shards themselves, COCO captions/instances/panoptic JSON,
the COCO Attributes pickle, DIOR XML and split files, vocabularies and image-folder group CSVs.

Each target runs 200 examples in the default suite and 2000 under `slow` (the end-to-end packer target a
quarter of that); `-s` prints how many inputs each one tried.
"""

from __future__ import annotations

import json
import pickle
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attrdist.errors import AttrdistError

pytestmark = pytest.mark.reliability

# examples per target: (default suite, slow)
BUDGET = [pytest.param(200, id="quick"), pytest.param(2000, id="long", marks=pytest.mark.slow)]
TRIED: dict[str, int] = {}


def fuzz(n: int, strategy, check, name: str) -> None:
    """Run `check` on `n` examples of `strategy` (no example database: nothing written beside the tests)."""
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(x):
        TRIED[name] = TRIED.get(name, 0) + 1
        check(x)
    run()
    print(f"\n{name}: {TRIED[name]} inputs tried")


def ours(fn, *args, names: str | None = None):
    """fn(*args), or None when it raised AttrdistError with a one-line message (naming `names` if given)."""
    try:
        return fn(*args)
    except AttrdistError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        if names is not None:
            assert names in msg, (names, msg)
        return None


json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=5), max_leaves=25)


def mutate(data):
    """Strategy: `data` (JSON-like) with one leaf or container replaced by a random JSON value."""
    def paths(x, prefix=()):
        yield prefix
        if isinstance(x, dict):
            for k, v in x.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                yield from paths(v, prefix + (i,))

    all_paths = list(paths(data))

    def put(path, value):
        if not path:
            return value
        out = json.loads(json.dumps(data))
        node = out
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return out

    return st.builds(put, st.sampled_from(all_paths), json_values)


def flip(data: bytes):
    """Strategy: `data` with a few bytes changed, cut short, or both."""
    @st.composite
    def go(draw):
        b = bytearray(data)
        for _ in range(draw(st.integers(0, 4))):
            if b:
                b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            b = b[:draw(st.integers(0, len(b)))]
        return bytes(b)
    return go()


# ------------------------------------------------------------------------------------------------
# Config: key=value overrides and saved config.json
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", BUDGET)
def test_config_overrides(n):
    from attrdist.core.config import Config, apply_overrides, flatten

    keys = sorted(flatten(Config()))
    value = (st.text(max_size=30) | st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "-1", "1e300", "true", "none",
                                                      "", "()", "[1,2]", "0.5,1.0", "1" * 5000, "0x10", "1_000"]))
    item = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(keys), value) | st.text(max_size=40)
    fuzz(n, st.lists(item, max_size=4), lambda items: ours(apply_overrides, Config(), items), "config overrides")


@pytest.mark.parametrize("n", BUDGET)
def test_saved_config_json(n):
    from attrdist.core.config import Config, from_dict, to_dict

    def check(d):
        cfg = ours(from_dict, Config, d, "run/config.json", names="run/config.json")
        assert cfg is None or isinstance(cfg, Config)
    fuzz(n, mutate(to_dict(Config())) | json_values, check, "saved config.json")


# ------------------------------------------------------------------------------------------------
# Shards: the manifest and the tar files
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards_copy(small_shards, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "shards"
    shutil.copytree(small_shards, root)
    return root


@pytest.mark.parametrize("n", BUDGET)
def test_manifest(n, shards_copy):
    from attrdist.data.reader import MANIFEST, ShardReader, load_manifest

    path = shards_copy / MANIFEST
    good = path.read_bytes()
    real = json.loads(good)

    def check(x):
        path.write_bytes(x if isinstance(x, bytes) else json.dumps(x).encode())
        try:
            m = ours(load_manifest, shards_copy, names=str(shards_copy))
            if m is not None:  # a manifest that loads: every split opens, every sample reads or is a ShardError
                for split in m.data["splits"]:
                    reader = ShardReader(m, split)
                    m.label_prior(split, m.label_fields[0]) if m.label_fields else None
                    for i in range(0, len(reader), 7):
                        ours(reader.__getitem__, i, names=".tar")
        finally:
            path.write_bytes(good)
    fuzz(n, mutate(real) | flip(good) | json_values, check, "manifest.json")


@pytest.mark.parametrize("n", BUDGET)
def test_shard_bytes(n, shards_copy):
    """Random damage to a real shard (bytes changed anywhere, cut short): the reader and the dataset give
    samples or count them as corrupt; nothing else."""
    from attrdist.core.config import DataConfig
    from attrdist.data.samples import SampleDataset
    from attrdist.data.reader import ShardReader, load_manifest

    shard = shards_copy / "train-000002.tar"
    good = shard.read_bytes()
    m = load_manifest(shards_copy)

    def check(data):
        shard.write_bytes(data)
        try:
            ds = SampleDataset(ShardReader(m, "train"), len(m.attributes), ["labels"], DataConfig(image_size=16), 0,
                               train=False)
            for i in range(80, 96, 3):
                s = ds[(i, 0)]
                assert s["valid"] != s["corrupt"] and (not s["corrupt"] or "train-000002.tar" in s["error"])
        finally:
            shard.write_bytes(good)
    fuzz(n, flip(good) | st.binary(max_size=3000), check, "shard bytes")


# ------------------------------------------------------------------------------------------------
# Packer annotation readers
# ------------------------------------------------------------------------------------------------


COCO = {"images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 12], "area": 120, "iscrowd": 0,
                         "caption": "a red car"}],
        "categories": [{"id": 3, "name": "car", "supercategory": "vehicle"}, {"id": 4, "name": "bus"}]}
PANOPTIC = {**COCO, "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [
    {"id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0}]}]}


@pytest.mark.parametrize("n", BUDGET)
def test_coco_json(n, tmp_path_factory):
    from attrdist.pack.coco import load_coco, load_detections

    path = tmp_path_factory.mktemp("coco") / "instances.json"

    def check(x):
        path.write_bytes(x if isinstance(x, bytes) else json.dumps(x).encode())
        ours(load_coco, path, names=str(path))
        det = ours(load_detections, path, names=str(path))
        if det is not None:
            for image_id in det.imgs:
                det.anns_of(image_id)
    fuzz(n, mutate(COCO) | mutate(PANOPTIC) | flip(json.dumps(COCO).encode()) | json_values, check, "COCO json")


@pytest.mark.parametrize("n", BUDGET)
def test_coco_packers_end_to_end(n, tmp_path_factory):
    """The three COCO packers on mutated captions / instances / panoptic JSON over two real images: a pack
    (with what it could not use counted) or one AttrdistError naming a file."""
    from PIL import Image

    from attrdist.pack.coco import AnnSource, SplitSource, pack_coco_captions, pack_coco_images, pack_coco_objects
    from attrdist.pack.vocab import Vocabulary

    d = tmp_path_factory.mktemp("cocopack")
    images = d / "images"
    images.mkdir()
    for k, name in enumerate(("a.jpg", "b.jpg")):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / name)
    ann = d / "ann.json"
    vocab = Vocabulary("v", ("red", "car"), ("colour", "object"), (("red",), ("car",)))
    kw = dict(workers=1, progress=False, on_leak="warn", overwrite=True)

    def check(x):
        ann.write_text(json.dumps(x))
        for run in (lambda: pack_coco_captions(d / "out", [SplitSource("train", images, ann, None)], vocab, **kw),
                    lambda: pack_coco_images(d / "out", [AnnSource("train", images, ann)], **kw),
                    lambda: pack_coco_objects(d / "out", [AnnSource("train", images, ann)], min_size=1, **kw)):
            m = ours(run, names=str(d))  # the annotation file, or the output it could not write
            TRIED["packed"] = TRIED.get("packed", 0) + (m is not None)
            assert m is None or m["splits"].get("train", {"nsamples": 0})["nsamples"] <= 4
    fuzz(max(4, n // 4), mutate(COCO) | mutate(PANOPTIC), check, "COCO packers end to end")
    print("packs published:", TRIED["packed"])


def _pickle_of(x, protocol: int) -> bytes:
    return pickle.dumps(x, protocol=protocol)


PICKLE_DATA = {"ann_vecs": {1: np.array([1.0, 0.0, np.nan], dtype=np.float32), 2: np.zeros(3)},
               "patch_id_to_ann_id": {1: 10, 2: 11}, "split": {1: "train2014", 2: "val2014"},
               "attributes": [{"id": 0, "name": "red"}, {"id": 1, "name": "wet"}, {"id": 2, "name": "old"}]}


@pytest.mark.parametrize("n", BUDGET)
def test_cocottributes_pickle(n, tmp_path_factory):
    from attrdist.pack.cocottributes import load_cocottributes

    path = tmp_path_factory.mktemp("pkl") / "cocottributes_eccv_version.pkl"
    leaves = json_scalars | st.binary(max_size=10) | st.builds(np.asarray, st.lists(st.floats(), max_size=4))
    objects = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.tuples(c, c)
                           | st.dictionaries(st.integers() | st.text(max_size=5) | st.binary(max_size=5), c, max_size=4),
                           max_leaves=20)
    structured = st.builds(lambda k, v: {**PICKLE_DATA, k: v}, st.sampled_from(sorted(PICKLE_DATA)), objects)
    raw = st.builds(_pickle_of, structured | objects, st.integers(0, 5))
    good = [pickle.dumps(PICKLE_DATA, protocol=p) for p in (0, 2, 5)]

    def check(data):
        path.write_bytes(data)
        ours(load_cocottributes, path, names=str(path))
    fuzz(n, raw | st.sampled_from(good).flatmap(flip) | st.binary(max_size=200), check, "cocottributes pickle")


def dior_xml():
    tag = st.sampled_from(["annotation", "filename", "size", "width", "height", "object", "name", "bndbox", "xmin",
                           "ymin", "xmax", "ymax", "robndbox", "x_left_top", "y_left_top", "polygon", "x1", "y1", "junk"])
    text = st.sampled_from(["", "12", "-3", "1e9", "nan", "inf", "airplane", "golffield", "x", "../a.jpg", "/etc/passwd",
                            "00001.jpg", "&amp;", "é"]) | st.text(max_size=6)
    el = st.recursive(st.tuples(tag, text, st.just(())),
                      lambda c: st.tuples(tag, text, st.lists(c, max_size=4).map(tuple)), max_leaves=20)

    def render(e):
        name, body, kids = e
        from xml.sax.saxutils import escape
        return f"<{name}>{escape(body)}{''.join(render(k) for k in kids)}</{name}>"
    return st.builds(lambda e: render(("annotation", "", (e,))).encode(), el)


REAL_XML = (b"<annotation><filename>00001.jpg</filename><size><width>800</width><height>800</height></size><object>"
            b"<name>golffield</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox>"
            b"</object></annotation>")
BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                             for i in range(1, 10))
                  + b']><annotation><filename>&lol9;</filename></annotation>')
XXE = b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation><filename>&x;</filename></annotation>'


@pytest.mark.parametrize("n", BUDGET)
def test_dior_xml_and_split_files(n, tmp_path_factory):
    from attrdist.pack.dior import parse_dior_xml, read_split_ids

    d = tmp_path_factory.mktemp("dior")
    xml, ids = d / "00001.xml", d / "train.txt"

    def check(data):
        xml.write_bytes(data)
        ours(parse_dior_xml, xml, names=str(xml))
        ids.write_bytes(data)
        ours(read_split_ids, ids, names=str(ids))
    strategy = dior_xml() | flip(REAL_XML) | st.binary(max_size=300) | st.sampled_from([BILLION_LAUGHS, XXE])
    fuzz(n, strategy, check, "DIOR xml / split file")
    for hostile in (BILLION_LAUGHS, XXE):  # refused as malformed, never expanded nor fetched
        xml.write_bytes(hostile)
        with pytest.raises(AttrdistError, match=r"00001\.xml: malformed XML"):
            parse_dior_xml(xml)


@pytest.mark.parametrize("n", BUDGET)
def test_vocabulary_and_group_csv(n, tmp_path_factory):
    from attrdist.pack.imagefolder import read_group_csv
    from attrdist.pack.vocab import load_vocabulary

    d = tmp_path_factory.mktemp("vocab")
    vocab, csv = d / "vocab.json", d / "groups.csv"
    real = {"name": "v", "attributes": [{"name": "red", "group": "colour", "keywords": ["red", "crimson"]},
                                        {"name": "fire hydrant", "keywords": ["fire hydrant", "hydrant"]}]}

    def check(x):
        vocab.write_bytes(x if isinstance(x, bytes) else json.dumps(x).encode())
        v = ours(load_vocabulary, vocab, names=str(vocab))
        if v is not None:
            v.labels(["a red fire-hydrant", string.printable])
        csv.write_bytes(x if isinstance(x, bytes) else json.dumps(x).encode())
        ours(read_group_csv, csv, names=str(csv))
    csv_text = st.lists(st.lists(st.text(max_size=8) | st.sampled_from(["path", "group", "../x.jpg", "/a"]),
                                 max_size=3).map(",".join), max_size=5).map(lambda rows: "\n".join(rows).encode())
    fuzz(n, mutate(real) | flip(json.dumps(real).encode()) | json_values | csv_text, check, "vocabulary / groups csv")
