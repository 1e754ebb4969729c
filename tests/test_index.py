"""`attrdist index`: foreign WebDataset shards (webdataset.TarWriter, img2dataset-style keys, .cls and json
labels) indexed without a re-pack, trained on by a recipe, their bad samples and shards named and counted;
every pack's wids descriptor opened by wids itself."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from attrdist.core.config import DataConfig
from attrdist.data.reader import ShardReader, load_manifest
from attrdist.data.samples import IMAGE_KEYS, SampleDataset
from attrdist.errors import AttrdistError
from attrdist.pack.index import IMAGE_EXTS, index_shards
from attrdist.pack.writer import check_out_dir
from tests.conftest import FAST, ROOT, run_env, run_recipe

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 230, 40)]
CLASSES = ["red", "green", "blue", "yellow"]


def jpeg(cls: int, seed: int, size: int = 40) -> bytes:
    """A real JPEG: the class's colour with noise (a class a small net can learn in a few steps)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(COLOURS[cls]) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def foreign_sample(i: int, cls: int) -> dict:
    """As img2dataset names them (9-digit keys), with a .cls member and a json whose label is "label_id"."""
    return {"__key__": f"{i:09d}", "jpg": jpeg(cls, i), "cls": cls,
            "json": {"key": f"{i:09d}", "label_id": cls, "caption": f"a {CLASSES[cls]} square", "status": "success"}}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """train-00000.tar, train-00001.tar (24 samples each), val-00000.tar (16): {key: class}."""
    d = tmp_path_factory.mktemp("foreign") / "shards"
    d.mkdir()
    truth, i = {}, 100
    for name, n in (("train-00000.tar", 24), ("train-00001.tar", 24), ("val-00000.tar", 16)):
        samples = []
        for k in range(n):
            samples.append(foreign_sample(i, (i * 3 + i // 7) % 4))
            truth[samples[-1]["__key__"]] = samples[-1]["cls"]
            i += 1
        write_shard(d / name, samples)
    return d, truth


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


SPLITS = ["train=train-*.tar", "val=val-*.tar"]


def test_cls_and_json_labels_index_alike_and_reach_the_dataset(foreign, tmp_path):
    d, truth = foreign
    before = snapshot(d)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    m_cls, lines = index_shards(d, labels="cls", splits=SPLITS, classes=tmp_path / "classes.txt", out=tmp_path / "a")
    m_json, _ = index_shards(d, labels="json:label_id", splits=SPLITS, out=tmp_path / "b", workers=1)
    assert snapshot(d) == before  # the user's shards: read, never touched; nothing written beside them
    assert m_cls["attributes"] == CLASSES and m_json["attributes"] == [f"class_{k}" for k in range(4)]
    assert m_cls["labels_from"] == {"member": "cls"} and m_json["labels_from"] == {"member": "json", "field": "label_id"}
    assert m_cls["shard_base"] == str(d.resolve())
    for split, n in (("train", 48), ("val", 16)):
        a, b = m_cls["splits"][split], m_json["splits"][split]
        assert a["shards"] == b["shards"] and a["nsamples"] == n and a["unusable"] == 0
        for s in a["shards"]:
            data = (d / s["file"]).read_bytes()
            assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
        assert a["label_counts"] == b["label_counts"]
    keys = sorted(truth)
    assert m_cls["splits"]["train"]["label_counts"]["labels"] == [sum(truth[k] == c for k in keys[:48]) for c in range(4)]
    assert "one label per sample" in lines[-1] and "unusable" not in " ".join(lines[3:])
    cfg = DataConfig(image_size=32)
    for out in (tmp_path / "a", tmp_path / "b"):
        m = load_manifest(out)
        reader = ShardReader(m, "val")
        ds = SampleDataset(reader, len(m.attributes), m.label_fields, cfg, seed=0, train=False)
        for i in range(len(reader)):
            s = ds[(i, 0)]
            key = reader[i]["__key__"]
            assert s["valid"] and not s["corrupt"] and s["image"].shape == (3, 32, 32)
            assert s["labels/labels"].tolist() == [float(c == truth[key]) for c in range(4)]


def test_a_recipe_trains_and_evaluates_on_indexed_foreign_shards(foreign, tmp_path):
    """The CLI indexes (beside the shards: there is no manifest there yet) and the characters recipe
    (multiclass) trains on the index and evaluates on val."""
    d, _ = foreign
    shards = tmp_path / "copy"
    shards.mkdir()
    for p in d.iterdir():
        (shards / p.name).write_bytes(p.read_bytes())
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "index", str(shards), "--labels", "cls", "--quiet",
                        *[a for s in SPLITS for a in ("--split", s)]], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"wrote {shards / 'manifest.json'}, {shards / 'train.wids.json'}, {shards / 'val.wids.json'}" in p.stdout
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "characters.py"), "--profile", "demo", f"data.shards={shards}",
           f"run.run_dir={run_dir}", "data.batch_size=8", "data.num_workers=0", "run.epochs=2", "run.eval_every=1",
           "run.precision=fp32", "run.threads=1", "data.image_size=32"]
    p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 13)) and all(np.isfinite(r["loss"]) for r in train)
    assert len(evals) == 2 and 0 <= evals[-1]["val/labels/accuracy"] <= 1
    report = (run_dir / "report.md").read_text()
    assert "**Validation accuracy against `labels`:" in report and "| class_0 |" in report
    assert "skipped" not in (run_dir / "train.log").read_text()  # no sample was counted as corrupt


def test_a_multilabel_recipe_trains_on_json_label_lists(tmp_path):
    """img2dataset-style json with a list of tags per sample -> index in --out -> the coconut recipe
    (multilabel, cross-modal queries over the class names) trains and reports mAP on val."""
    d = tmp_path / "tags"
    d.mkdir()
    for name, start, n in (("00000.tar", 0, 48), ("00001.tar", 48, 16)):
        write_shard(d / name, [{"__key__": f"{i:09d}", "jpg": jpeg(i % 4, i),
                                "json": {"tags": sorted({i % 4, (i + 1) % 4} if i % 3 else {i % 4}), "caption": "x"}}
                               for i in range(start, start + n)])
    m, lines = index_shards(d, labels="json:tags", splits=["train=00000.tar", "val=00001.tar"], out=tmp_path / "idx")
    assert m["splits"]["train"]["label_counts"]["labels"] == [20, 20, 20, 20]  # 12 as i % 4, 8 as (i + 1) % 4
    assert f"several labels per sample: train a multilabel recipe, e.g. python recipes/coconut.py " \
           f"data.shards={tmp_path / 'idx'}" == lines[-1]
    run_dir = tmp_path / "run"
    run_recipe(["--profile", "demo", f"data.shards={tmp_path / 'idx'}", f"run.run_dir={run_dir}",
                "data.eval_labels=labels", *FAST])
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 2 and 0 <= evals[-1]["val/labels/mAP"] <= 1 and "val/labels/mAP:prior" in evals[-1]
    assert "**Validation mAP against `labels`:" in (run_dir / "report.md").read_text()


def test_unusable_samples_and_damaged_shards_are_named_and_counted(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    good = [foreign_sample(i, i % 4) for i in range(6)]
    no_image = {k: v for k, v in foreign_sample(6, 1).items() if k != "jpg"}
    no_cls = {k: v for k, v in foreign_sample(7, 2).items() if k != "cls"}
    out_of_range = {**foreign_sample(8, 1), "cls": 7}
    not_a_number = {**foreign_sample(9, 1), "cls": "seven"}
    write_shard(d / "a-00000.tar", [*good[:3], no_image, no_cls, *good[3:], out_of_range, not_a_number])
    write_shard(d / "a-00001.tar", good)
    whole = (d / "a-00001.tar").read_bytes()
    (d / "a-00002.tar").write_bytes(whole[:len(whole) // 2 + 100])  # cut inside a member
    (d / "a-00003.tar").write_bytes(b"this is not a tar file at all" * 40)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    m, lines = index_shards(d, labels="cls", splits=["train=a-*.tar"], classes=tmp_path / "classes.txt",
                            out=tmp_path / "idx")
    text = "\n".join(lines)
    info = m["splits"]["train"]
    assert [s["file"] for s in info["shards"]] == ["a-00000.tar", "a-00001.tar"]  # the damaged two left out
    assert info["nsamples"] == 10 + 6 and info["unusable"] == 4  # unusable samples stay (positions)
    assert m["report"]["unusable"] == {"no image": 1, "no label member": 1, "label out of range": 1,
                                       "unreadable label": 1}
    assert "unusable samples: 4 (label out of range 1, no image 1, no label member 1, unreadable label 1)" in text
    assert "set data.max_corrupt above 4 x the epochs" in text
    assert "000000006 in a-00000.tar: the sample has no image member (jpg/jpeg/png/webp; it has: cls, json)" in text
    assert "000000007 in a-00000.tar: the sample has no .cls member (its labels; it has: jpg, json)" in text
    assert "000000008 in a-00000.tar: its .cls member holds label 7, outside the 4 classes (0-3)" in text
    assert "000000009 in a-00000.tar: its .cls member b'seven' is not an integer class index" in text
    assert "damaged shards left out of the index: 2" in text
    assert f"{d / 'a-00002.tar'} (train): " in text and "cut short" in text
    assert f"{d / 'a-00003.tar'} (train): the tar header at byte 0 is damaged" in text
    assert [x["file"] for x in m["report"]["damaged_shards"]] == ["a-00002.tar", "a-00003.tar"]
    assert info["label_counts"]["labels"] == [4, 4, 2, 2]  # the 12 usable samples only
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "inspect", str(tmp_path / "idx")], cwd=ROOT,
                       env=run_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"index of WebDataset shards in {d.resolve()} (attrdist index; labels from .cls)" in p.stdout
    assert "unusable samples: 4 (label out of range 1" in p.stdout and "damaged shards left out of the index: 2" in p.stdout
    assert "000000009 in a-00000.tar: its .cls member b'seven' is not an integer class index" in p.stdout
    # training meets the same verdicts: the unusable samples come out corrupt, with the reason indexing gave
    man = load_manifest(tmp_path / "idx")
    ds = SampleDataset(ShardReader(man, "train"), 4, ["labels"], DataConfig(image_size=32), seed=0, train=True)
    got = [ds[(i, 0)] for i in range(16)]
    bad = {s["error"].key: s["error"].reason for s in got if s["corrupt"]}
    assert sorted(bad) == ["000000006", "000000007", "000000008", "000000009"]
    assert "no image member" in bad["000000006"] and "outside the 4 classes" in bad["000000008"]
    assert sum(s["valid"] for s in got) == 12


def test_refusals_are_one_line_and_nothing_is_replaced(foreign, tmp_path):
    d, _ = foreign
    beside = tmp_path / "beside"
    beside.mkdir()
    for p in d.iterdir():
        (beside / p.name).write_bytes(p.read_bytes())
    (beside / "manifest.json").write_text('{"mine": true}')
    with pytest.raises(AttrdistError, match="manifest.json: already exists beside the shards.*pass --out DIR"):
        index_shards(beside, labels="cls", splits=SPLITS)
    assert (beside / "manifest.json").read_text() == '{"mine": true}' and not (beside / "train.wids.json").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(AttrdistError, match="busy: holds 1 files attrdist index did not write \\(notes.txt\\)"):
        index_shards(d, labels="cls", splits=SPLITS, out=busy)
    (busy / "notes.txt").unlink()
    (busy / "manifest.json").write_text('{"format": "attrdist-shards-v1"}')
    with pytest.raises(AttrdistError, match="busy/manifest.json: not an index written by attrdist index --out"):
        index_shards(d, labels="cls", splits=SPLITS, out=busy)
    with pytest.raises(AttrdistError, match="no file matches 'test-\\*.tar' for split 'test'"):
        index_shards(d, labels="cls", splits=[*SPLITS, "test=test-*.tar"], out=tmp_path / "o")
    with pytest.raises(AttrdistError, match="--labels 'json': a JSON member needs a field"):
        index_shards(d, labels="json", out=tmp_path / "o")
    with pytest.raises(AttrdistError, match="matched by the globs of splits 'train' and 'all'"):
        index_shards(d, labels="cls", splits=["train=train-*", "all=*.tar"], out=tmp_path / "o")
    with pytest.raises(AttrdistError, match="no sample has usable labels in its .json member \\(first: 000000100: its .json member has no field 'nope'\\)"):
        index_shards(d, labels="json:nope", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # refused before writing anything
    # an index may be redone in its own --out folder; a stale split's descriptor goes with it
    index_shards(d, labels="cls", splits=SPLITS, out=tmp_path / "again")
    index_shards(d, labels="cls", splits=["train=train-*.tar"], out=tmp_path / "again")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["manifest.json", "train.wids.json"]
    # an index beside foreign shards makes that folder no pack the packer may replace (it would delete them)
    idx = tmp_path / "indexed"
    idx.mkdir()
    for p in d.iterdir():
        (idx / p.name.replace("-00", "-0000")).write_bytes(p.read_bytes())  # names a pack's shards could have
    index_shards(idx, labels="cls", splits=["train=train-*.tar", "val=val-*.tar"])
    with pytest.raises(AttrdistError, match="holds an index of WebDataset shards that attrdist did not write"):
        check_out_dir(idx, overwrite=True)
    # a damaged index manifest: one line from the reader
    m = json.loads((tmp_path / "again" / "manifest.json").read_text())
    for bad, msg in (({"shard_base": 3}, "'shard_base' is not the path of the shards' folder"),
                     ({"labels_from": {"member": "json"}}, "a JSON member needs a field"),
                     ({"labels_from": {"member": "../x"}}, "'labels_from' does not name a sample member")):
        (tmp_path / "again" / "manifest.json").write_text(json.dumps({**m, **bad}))
        with pytest.raises(AttrdistError, match=f"again/manifest.json: {msg}.*; the manifest is damaged"):
            load_manifest(tmp_path / "again")
    # the CLI: one line, exit status 2
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "index", str(d), "--labels", "cls", "--split", "x"],
                       cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "attrdist: error: --split 'x': expected NAME=GLOB, e.g. --split train='train-*.tar' (NAME: letters, digits, _ or -)"]


def test_image_members_are_the_datasets():
    assert IMAGE_EXTS == IMAGE_KEYS


def _same_samples_through_wids(descriptor: Path, reader: ShardReader, cache: Path) -> None:
    import wids

    ds = wids.ShardListDataset(str(descriptor), cache_dir=str(cache), transformations=lambda s: s)
    assert len(ds) == len(reader) > 0
    for i in range(len(reader)):
        ours, theirs = reader[i], ds[i]
        assert theirs["__key__"] == ours["__key__"]
        exts = {k[1:] for k in theirs if k.startswith(".")}
        assert exts == {k for k in ours if k != "__key__"}
        assert all(theirs[f".{e}"].getvalue() == ours[e] for e in exts)  # wids: io.BytesIO per member
    ds.close()


def test_every_pack_has_a_wids_descriptor_that_wids_opens(small_shards, tmp_path):
    m = load_manifest(small_shards)
    for split in ("train", "val", "test"):
        desc = json.loads((small_shards / f"{split}.wids.json").read_text())
        assert desc["__kind__"] == "wids-shard-index-v1" and desc["wids_version"] == 1
        assert desc["name"] == f"test-demo-{split}"
        assert desc["shardlist"] == [{"url": s["file"], "nsamples": s["nsamples"], "filesize": s["bytes"]}
                                     for s in m.split(split)["shards"]]  # relative: the pack moves as a whole
    _same_samples_through_wids(small_shards / "train.wids.json", ShardReader(m, "train"), tmp_path / "cache")


def test_an_indexed_foreign_packs_wids_descriptor_opens_where_the_shards_are(foreign, tmp_path):
    d, _ = foreign
    index_shards(d, labels="cls", splits=SPLITS, out=tmp_path / "idx")
    desc = json.loads((tmp_path / "idx" / "val.wids.json").read_text())
    assert desc["shardlist"][0]["url"] == f"{d.resolve()}/val-00000.tar"
    m = load_manifest(tmp_path / "idx")
    for split in ("train", "val"):
        _same_samples_through_wids(tmp_path / "idx" / f"{split}.wids.json", ShardReader(m, split),
                                   tmp_path / f"cache-{split}")


def test_png_and_webp_images_are_used(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    samples = []
    for i, fmt in enumerate(("PNG", "WEBP", "JPEG")):
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpeg(i, i))).save(buf, fmt)
        samples.append({"__key__": f"{i:09d}", {"JPEG": "jpg"}.get(fmt, fmt.lower()): buf.getvalue(), "cls": i})
    write_shard(d / "00000.tar", samples)
    m, lines = index_shards(d, labels="cls")
    assert m["splits"]["train"]["unusable"] == 0 and m["attributes"] == ["class_0", "class_1", "class_2"]
    man = load_manifest(d)
    ds = SampleDataset(ShardReader(man, "train"), 3, ["labels"], DataConfig(image_size=32), seed=0, train=False)
    got = [ds[(i, 0)] for i in range(3)]
    assert all(s["valid"] for s in got)
    assert [s["labels/labels"].argmax().item() for s in got] == [0, 1, 2]
    # the colour survives each format: red, green, blue in the image's mean
    assert [int(s["image"].float().mean((1, 2)).argmax()) for s in got] == [0, 1, 2]


def test_many_unusable_samples_are_all_counted_and_the_first_named(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    tiny = jpeg(0, 0, size=8)
    write_shard(d / "00000.tar", [{"__key__": f"{i:09d}", "jpg": tiny, "cls": 0} for i in range(5)]
                + [{"__key__": f"{i:09d}", "jpg": tiny, "txt": "no label"} for i in range(5, 135)])
    m, lines = index_shards(d, labels="cls", out=tmp_path / "idx")
    assert m["splits"]["train"]["nsamples"] == 135 and m["splits"]["train"]["unusable"] == 130
    assert m["report"]["unusable"] == {"no label member": 130} and len(m["report"]["unusable_samples"]) == 100
    named = [x for x in lines if x.startswith("  0000")]
    assert len(named) == 20 and named[0] == "  000000005 in 00000.tar: the sample has no .cls member (its labels; it has: jpg, txt)"
    assert f"  ... and 110 more (the first 100 in {tmp_path / 'idx' / 'manifest.json'}, \"report\")" in lines


# ---------------------------------------------------------------- foreign shards at a URL (real nginx and moto servers)


@pytest.fixture(scope="module")
def foreign_served(foreign, tmp_path_factory):
    """The foreign shards at /shards/ of two nginx servers on 127.0.0.1: one with directory listings
    (autoindex on; also an empty /empty/ folder), one without (nginx's default: a folder is a 403)."""
    from tests.test_remote import Nginx

    d, _ = foreign
    www = tmp_path_factory.mktemp("www")
    (www / "shards").mkdir()
    (www / "empty").mkdir()
    for p in d.iterdir():
        (www / "shards" / p.name).write_bytes(p.read_bytes())
    listed = Nginx(www, tmp_path_factory.mktemp("nginx-listed"), autoindex=True)
    try:
        unlisted = Nginx(www, tmp_path_factory.mktemp("nginx-unlisted"))
    except BaseException:
        listed.stop()
        raise
    yield listed, unlisted
    listed.stop()
    unlisted.stop()


def _same_index(remote_m: dict, local_m: dict) -> None:
    for split, info in local_m["splits"].items():
        assert remote_m["splits"][split]["shards"] == info["shards"]  # file, nsamples, bytes, sha256: the local files'
        assert remote_m["splits"][split]["label_counts"] == info["label_counts"]
    assert remote_m["attributes"] == local_m["attributes"] and remote_m["labels_from"] == local_m["labels_from"]


def _same_reads(url_index: Path, local_index: Path, cache: Path) -> None:
    from tests.test_remote import Cache, assert_nothing_half_written

    m, local = load_manifest(url_index, Cache(cache)), load_manifest(local_index)
    assert m.cache is not None and local.cache is None
    for split in m.data["splits"]:
        a, b = ShardReader(m, split), ShardReader(local, split)
        assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]
        da = SampleDataset(a, 4, ["labels"], DataConfig(image_size=32), seed=0, train=False)
        db = SampleDataset(b, 4, ["labels"], DataConfig(image_size=32), seed=0, train=False)
        for i in range(len(a)):
            x, y = da[(i, 0)], db[(i, 0)]
            assert x["valid"] and bool((x["image"] == y["image"]).all())
            assert x["labels/labels"].tolist() == y["labels/labels"].tolist()
    assert_nothing_half_written(cache, m)


@pytest.mark.remote
def test_shards_served_over_http_are_indexed_and_read_through_the_node_cache(foreign, foreign_served, tmp_path):
    d, _ = foreign
    listed, unlisted = foreign_served
    local, _ = index_shards(d, labels="cls", splits=SPLITS, out=tmp_path / "local")
    # the CLI, from nginx's directory listing
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "index", f"{listed.url}/shards/", "--labels", "cls",
                        "--quiet", "--out", str(tmp_path / "http"), *[a for s in SPLITS for a in ("--split", s)]],
                       cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert f"indexed {listed.url}/shards: 3 shards, 64 samples" in p.stdout
    m = json.loads((tmp_path / "http" / "manifest.json").read_text())
    assert m["shard_base"] == f"{listed.url}/shards" and m["dataset"] == "shards"
    _same_index(m, local)
    for name in ("train-00000.tar", "train-00001.tar", "val-00000.tar"):
        assert listed.gets(name) == 1  # downloaded once to be scanned
    assert not list(tmp_path.glob(".attrdist-index-*"))  # the temp copies are gone
    desc = json.loads((tmp_path / "http" / "val.wids.json").read_text())
    assert desc["shardlist"][0]["url"] == f"{listed.url}/shards/val-00000.tar"
    _same_reads(tmp_path / "http", tmp_path / "local", tmp_path / "cache")
    for name in ("train-00000.tar", "train-00001.tar", "val-00000.tar"):
        assert listed.gets(name) == 2  # and once more by the node cache, which the reads above came from
    # the index itself served: with a URL "shard_base" it reads the same; with a local one, one line
    from tests.test_remote import Cache

    for name in ("idx-url", "idx-local"):
        (listed.root / name).mkdir()
    (listed.root / "idx-url" / "manifest.json").write_bytes((tmp_path / "http" / "manifest.json").read_bytes())
    (listed.root / "idx-local" / "manifest.json").write_bytes((tmp_path / "local" / "manifest.json").read_bytes())
    served_idx = load_manifest(f"{listed.url}/idx-url/", Cache(tmp_path / "cache2"))
    assert served_idx.cache.url == f"{listed.url}/shards"
    assert ShardReader(served_idx, "val")[3] == ShardReader(load_manifest(tmp_path / "local"), "val")[3]
    with pytest.raises(AttrdistError, match=r"idx-local/manifest.json: an `attrdist index --out` manifest \(its shards "
                                            r"are in '/.*'\) cannot be read from a server"):
        load_manifest(f"{listed.url}/idx-local/", Cache(tmp_path / "cache2"))
    # a server without listings: one line, then the shards named by a brace pattern
    with pytest.raises(AttrdistError, match=r"/shards/: cannot list the files there through the server's directory "
                                            r"listing .*403.*name the shards with a brace pattern instead"):
        index_shards(f"{unlisted.url}/shards/", labels="cls", out=tmp_path / "x")
    m2, lines = index_shards(f"{unlisted.url}/shards/train-{{00000..00001}}.tar", labels="cls", out=tmp_path / "brace")
    assert m2["shard_base"] == f"{unlisted.url}/shards" and list(m2["splits"]) == ["train"]
    assert m2["splits"]["train"]["shards"] == local["splits"]["train"]["shards"]
    assert f"data.shards={tmp_path / 'brace'}" in lines[-1]
    one, _ = index_shards(f"{unlisted.url}/shards/val-00000.tar", labels="cls", out=tmp_path / "one")
    assert one["splits"]["train"]["shards"] == local["splits"]["val"]["shards"]  # a single shard's URL: that shard
    # a damaged shard at the URL: left out and named by its URL, as a local one is
    (listed.root / "bad").mkdir()
    whole = (d / "train-00000.tar").read_bytes()
    (listed.root / "bad" / "a.tar").write_bytes(whole)
    (listed.root / "bad" / "b.tar").write_bytes(whole[:len(whole) // 2 + 100])
    bad, lines = index_shards(f"{listed.url}/bad/", labels="cls", out=tmp_path / "bad")
    assert [s["file"] for s in bad["splits"]["train"]["shards"]] == ["a.tar"]
    assert any(x.startswith(f"  {listed.url}/bad/b.tar (train): ") and "cut short" in x for x in lines)
    # bad input: one line each, nothing written
    with pytest.raises(AttrdistError, match=r"/empty/: no files found through the server's directory listing"):
        index_shards(f"{listed.url}/empty/", labels="cls", out=tmp_path / "x")
    with pytest.raises(AttrdistError, match=r"/shards/train-00002\.tar: not found on the server \(FileNotFoundError"):
        index_shards(f"{unlisted.url}/shards/train-{{00000..00002}}.tar", labels="cls", out=tmp_path / "x", workers=1)
    with pytest.raises(AttrdistError, match=r"shards/: no file matches 'test-\*.tar' for split 'test'"):
        index_shards(f"{listed.url}/shards/", labels="cls", splits=["test=test-*.tar"], out=tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".attrdist-index-*"))
    p = subprocess.run([sys.executable, "-m", "attrdist.cli", "index", f"{listed.url}/shards/", "--labels", "cls"],
                       cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"attrdist: error: {listed.url}/shards/: --out DIR is required for a URL (the index is written into a local "
        f"folder; the shards stay on the server); pass --out DIR"]


@pytest.mark.remote
def test_a_recipe_trains_on_an_index_of_shards_served_over_http(foreign, foreign_served, tmp_path):
    from tests.test_remote import cached_files

    listed, _ = foreign_served
    index_shards(f"{listed.url}/shards", labels="cls", splits=SPLITS, out=tmp_path / "idx")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "characters.py"), "--profile", "demo",
           f"data.shards={tmp_path / 'idx'}", f"data.cache_dir={tmp_path / 'cache'}", f"run.run_dir={run_dir}",
           "data.batch_size=8", "data.num_workers=0", "run.epochs=1", "run.eval_every=1", "run.precision=fp32",
           "run.threads=1", "data.image_size=32"]
    p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "train"] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) for r in recs if r["type"] == "train")
    assert len([r for r in recs if r["type"] == "eval"]) == 1
    assert {"train-00000.tar", "train-00001.tar", "val-00000.tar"} == {f.name for f in cached_files(tmp_path / "cache")}
    assert "Traceback" not in p.stdout + p.stderr


@pytest.mark.remote
def test_shards_in_s3_are_indexed_and_read_through_the_node_cache(foreign, tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (requirements/test.txt)")
    import boto3

    from tests.test_remote import free_port, wait_port

    d, _ = foreign
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_port(port)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
        s3.create_bucket(Bucket="foreign")
        for p in d.iterdir():
            s3.upload_file(str(p), "foreign", f"shards/{p.name}")
        s3.put_object(Bucket="foreign", Key="shards/sub/other.tar", Body=b"not listed: a deeper folder")
        local, _ = index_shards(d, labels="cls", splits=SPLITS, out=tmp_path / "local")
        m, _ = index_shards("s3://foreign/shards/", labels="cls", splits=SPLITS, out=tmp_path / "s3")
        assert m["shard_base"] == "s3://foreign/shards"
        _same_index(m, local)
        _same_reads(tmp_path / "s3", tmp_path / "local", tmp_path / "cache")
        with pytest.raises(AttrdistError, match=r"s3://foreign/nothing/: no files found through its objects"):
            index_shards("s3://foreign/nothing/", labels="cls", out=tmp_path / "x")
        with pytest.raises(AttrdistError, match=r"s3://foreign/shards/val-00001\.tar: not found on the server"):
            index_shards("s3://foreign/shards/val-{00000..00001}.tar", labels="cls", out=tmp_path / "x")
        assert not (tmp_path / "x").exists()
    finally:
        server.stop()
