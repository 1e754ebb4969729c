"""Packing round trip (demo and real COCO photos), atomic publication, manifest errors."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from attrdist.pack.coco import SplitSource, load_coco, pack_coco_captions
from attrdist.errors import AttrdistError
from attrdist.data.reader import ShardReader, load_manifest
from attrdist.atomic import sha256_file
from attrdist.pack.vocab import load_vocabulary
from tests.conftest import DEMO_VOCAB, ROOT, SHARED_DATA


def test_round_trip_demo(small_demo, small_shards):
    m = load_manifest(small_shards)
    vocab = load_vocabulary(DEMO_VOCAB)
    assert m.attributes == list(vocab.names) and m.label_fields == ["labels", "true_labels"]
    assert {s: m.split(s)["nsamples"] for s in ("train", "val", "test")} == {"train": 96, "val": 32, "test": 32}
    assert len(m.split("train")["shards"]) == 3  # max_samples=40 -> 40 + 40 + 16
    for s in m.split("train")["shards"]:
        assert sha256_file(small_shards / s["file"]) == s["sha256"]
        with tarfile.open(small_shards / s["file"]) as t:  # plain tar, readable by any tool
            members = t.getmembers()
            assert len(members) == 2 * s["nsamples"]
            # webdataset's member conventions, a fixed mtime (same inputs, same bytes), no pax records
            assert all(x.mode == 0o444 and x.mtime == 0 and x.uname == "bigdata" and not x.pax_headers
                       for x in members)
        got = list(wds.WebDataset(str(small_shards / s["file"]), shardshuffle=False))  # webdataset reads them
        assert len(got) == s["nsamples"] and all(set(x) >= {"__key__", "jpg", "json"} for x in got)
    caps = load_coco(small_demo / "annotations" / "captions_train.json")
    inst = load_coco(small_demo / "annotations" / "instances_train.json")
    reader = ShardReader(m, "train")
    counts = [0] * len(vocab)
    for i in range(len(reader)):
        raw = reader[i]
        meta = json.loads(raw["json"])
        assert meta["index"] == i
        img = caps.imgs[meta["id"]]
        assert raw["jpg"] == (small_demo / "images" / img["file_name"]).read_bytes()  # copied through
        texts = [a["caption"] for a in caps.imgToAnns[meta["id"]]]
        assert meta["labels"] == [int(j) for j in vocab.labels(texts).nonzero()[0]]
        names = set(inst.imgs[meta["id"]]["attributes"]) | {a for ann in inst.imgToAnns[meta["id"]]
                                                              for a in ann["attributes"]}
        assert [vocab.names[j] for j in meta["true_labels"]] == sorted(names, key=vocab.names.index)
        assert set(meta["labels"]) <= set(meta["true_labels"])  # captions are weak but never wrong here
        for j in meta["labels"]:
            counts[j] += 1
    assert m.split("train")["label_counts"]["labels"] == counts
    assert m.data["report"]["train"]["caption_positives"] == dict(zip(vocab.names, counts))


@pytest.mark.skipif(not (SHARED_DATA / "coco").is_dir(), reason="../shared/data/coco not present")
def test_pack_real_coco_photos(tmp_path):
    """Real COCO JPEGs + a captions file in COCO's format (written here), one image missing."""
    inst = json.loads((SHARED_DATA / "coco/annotations/instances_sample.json").read_text())
    words = ["A person riding a red bicycle on the street", "A dog sitting on a wooden bench",
             "Two cats on a sofa indoors", "A plate of food on a table"]
    images = inst["images"][:8] + [{"id": 999999, "file_name": "missing.jpg", "width": 1, "height": 1}]
    caps = {"images": images, "annotations": [{"id": k, "image_id": im["id"], "caption": words[k % 4]}
                                              for k, im in enumerate(images)]}
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    vocab_path = ROOT / "recipes" / "coconut_vocab.json"
    m = pack_coco_captions(tmp_path / "out", [SplitSource("train", SHARED_DATA / "coco/images", tmp_path / "captions.json")],
                           load_vocabulary(vocab_path), vocab_path=vocab_path, progress=False, max_dropped=0.12)
    assert m["splits"]["train"]["nsamples"] == 8
    assert m["report"]["train"]["dropped"]["missing_image"] == 1
    reader = ShardReader(load_manifest(tmp_path / "out"), "train")
    meta = json.loads(reader[0]["json"])
    assert meta["width"] > 100 and reader[0]["jpg"][:2] == b"\xff\xd8"


def test_crashed_pack_leaves_previous_pack_intact(small_demo, tmp_path):
    vocab = load_vocabulary(DEMO_VOCAB)
    ann = small_demo / "annotations"
    good = [SplitSource("train", small_demo / "images", ann / "captions_train.json")]
    out = tmp_path / "pack"
    first = pack_coco_captions(out, good, vocab, progress=False)
    before = sorted(p.name for p in out.iterdir())
    bad_caps = tmp_path / "bad.json"
    data = json.loads((ann / "captions_val.json").read_text())
    data["images"][5]["file_name"] = "../../etc/passwd"  # refused half-way through the split
    bad_caps.write_text(json.dumps(data))
    bad = good + [SplitSource("val", small_demo / "images", bad_caps)]
    with pytest.raises(AttrdistError, match=r"contains '\.\.'"):
        pack_coco_captions(out, bad, vocab, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert load_manifest(out).data["created"] == first["created"]
    staging = tmp_path / ".pack.staging"  # kept for a resume, and never mistaken for a pack
    assert not (staging / "manifest.json").exists()


def test_manifest_errors(tmp_path, small_shards):
    with pytest.raises(AttrdistError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttrdistError, match="no manifest.json"):
        load_manifest(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(small_shards, broken)
    (broken / "train-000001.tar").unlink()
    with pytest.raises(AttrdistError, match="train-000001.tar: shard listed in manifest.json is missing"):
        load_manifest(broken)


def _samples(n):
    return [(f"k{i:04d}", {"jpg": bytes([i % 256]) * 50, "json": {"id": i, "labels": [i % 3]}}) for i in range(n)]


def test_interrupted_pack_resumes_without_redoing_finished_shards(tmp_path):
    from attrdist.pack.writer import PackWriter

    out = tmp_path / "out"
    kw = dict(dataset="t", attributes=["a", "b", "c"], label_fields=["labels"], max_samples=10, job={"x": 1})
    with pytest.raises(RuntimeError):
        with PackWriter(out, **kw) as w:
            for i, (k, s) in enumerate(_samples(30)):
                if i == 25:
                    raise RuntimeError("killed")
                w.add("train", k, s)
    assert not out.exists()
    finished = sorted(p.name for p in (tmp_path / ".out.staging").glob("*.tar"))
    mtimes = {n: (tmp_path / ".out.staging" / n).stat().st_mtime_ns for n in finished[:2]}
    with PackWriter(out, **kw) as w:
        assert w.done("train") == 20  # two finished shards kept; the partial third is redone
        for k, s in _samples(30):
            w.add("train", k, s)
        w.commit(sources=[], options={})
    m = load_manifest(out)
    assert m.split("train")["nsamples"] == 30 and len(m.split("train")["shards"]) == 3
    assert {n: (out / n).stat().st_mtime_ns for n in finished[:2]} == mtimes  # not rewritten
    assert m.split("train")["label_counts"]["labels"] == [10, 10, 10]
    reader = ShardReader(m, "train")
    assert [json.loads(reader[i]["json"])["id"] for i in range(30)] == list(range(30))
    # fresh pack of the same samples: identical shard bytes
    with PackWriter(tmp_path / "fresh", **{**kw, "dataset": "t"}) as w:
        for k, s in _samples(30):
            w.add("train", k, s)
        w.commit(sources=[], options={})
    for s in m.split("train")["shards"]:
        assert (out / s["file"]).read_bytes() == (tmp_path / "fresh" / s["file"]).read_bytes()


def test_resume_refuses_changed_inputs(tmp_path):
    from attrdist.pack.writer import PackWriter

    kw = dict(dataset="t", attributes=["a", "b", "c"], label_fields=["labels"], max_samples=10)
    with pytest.raises(RuntimeError):
        with PackWriter(tmp_path / "out", **kw) as w:
            for k, s in _samples(15):
                w.add("train", k, s)
            raise RuntimeError("killed")
    with PackWriter(tmp_path / "out", **kw) as w:
        with pytest.raises(AttrdistError, match="inputs changed"):
            for k, s in _samples(30)[1:]:
                w.add("train", k, s)


def test_shard_writer_writes_what_tarfile_writes_byte_for_byte(tmp_path):
    """TarShardWriter builds headers from a template and writes in a thread: the shard must be exactly the
    archive `tarfile` writes for the same members (long and non-ASCII names take tarfile's pax header), and
    its sha256 the file's."""
    import hashlib

    from attrdist.pack.writer import TarShardWriter, member_header

    rng = np.random.default_rng(0)
    samples = [(f"{i:012d}", {"jpg": rng.bytes(int(rng.integers(0, 3000))), "json": b'{"labels": []}'})
               for i in range(40)]
    samples += [("k" * 120, {"jpg": b"x" * 511}), ("caf\u00e9", {"png": b"y" * 512})]
    w = TarShardWriter(tmp_path / "ours.tar")
    for key, sample in samples:
        w.add(key, sample)
    sha = w.close()
    with tarfile.open(tmp_path / "theirs.tar", "w", format=tarfile.PAX_FORMAT) as t:
        for key, sample in samples:
            for ext in sorted(sample):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(sample[ext]), 0, 0o444, "bigdata", "bigdata"
                t.addfile(info, io.BytesIO(sample[ext]))
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == (tmp_path / "theirs.tar").read_bytes()
    assert sha == hashlib.sha256(ours).hexdigest()
    for name in ("a.jpg", "x" * 96 + ".jpg", "x" * 97 + ".jpg"):
        for size in (0, 1, 511, 512, 8 ** 11 - 1, 8 ** 11):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
            assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_shard_writer_raises_its_thread_s_write_error(tmp_path):
    """A write that fails in the writer thread (a full disk: /dev/full) surfaces in the packing thread at a
    later add, before the shard could be taken for finished."""
    import errno

    from attrdist.pack.writer import TarShardWriter

    w = TarShardWriter(Path("/dev/full"))
    with pytest.raises(OSError) as e:
        for i in range(1000):
            w.add(f"{i:08d}", {"jpg": b"z" * 100_000})
    assert e.value.errno == errno.ENOSPC
    w.abort()
    w = TarShardWriter(Path("/dev/full"))
    w.add("k", {"jpg": b"z" * 10})  # buffered: the error comes with close's flush, and the file is closed
    with pytest.raises(OSError):
        w.close()
    assert w._file.closed


def test_large_local_split_is_indexed_lazily_with_the_same_samples_and_warnings(small_shards, tmp_path, caplog,
                                                                                 monkeypatch):
    """A split of more than ShardReader.EAGER_MAX_SHARDS local shards (here: any, with the bound set to 0) is
    not indexed up front: each shard is indexed when first read, gives the same samples as the eager reader,
    is reported then when damaged, and at most `max_indexed` shard indexes are kept (least recently used
    dropped, re-indexed when read again)."""
    import shutil

    from attrdist.data.reader import ShardReader, load_manifest

    root = tmp_path / "pack"
    shutil.copytree(small_shards, root)
    eager = ShardReader(load_manifest(root), "train")
    want = [eager[i] for i in range(len(eager))]
    monkeypatch.setattr(ShardReader, "EAGER_MAX_SHARDS", 0)
    lazy = ShardReader(load_manifest(root), "train", max_indexed=2)
    assert lazy.lazy and lazy.index == [None] * len(lazy.paths)
    assert [lazy[i] for i in range(len(lazy))] == want
    assert sum(x is not None for x in lazy.index) == 2  # 3 shards read, the index of 2 kept
    assert lazy[0] == want[0] and lazy.index[0] is not None  # dropped, then indexed again
    full = (root / "train-000001.tar").read_bytes()
    (root / "train-000001.tar").write_bytes(full[:len(full) // 2])
    with caplog.at_level("WARNING", logger="attrdist"):
        lazy = ShardReader(load_manifest(root), "train")
        assert not [r for r in caplog.records if "train-000001.tar" in r.getMessage()]  # nothing read yet
        lazy[0]
        assert not [r for r in caplog.records if "train-000001.tar" in r.getMessage()]
        got = lazy[40]  # the first sample of the cut shard is whole
    (line,) = [r.getMessage() for r in caplog.records if "train-000001.tar" in r.getMessage()]
    assert "of its 40 samples" in line and "restore the shard or re-pack" in line
    assert got["jpg"] == want[40]["jpg"]
