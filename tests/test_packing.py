"""The packers' shared machinery (attrdist/pack/pipeline.py): the ordered parallel map, the one-decode verify pass,
and pass 2's check that a file did not change since pass 1. Real JPEG bytes from the demo and real worker
processes and threads."""

import hashlib
import io
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from attrdist.errors import AttrdistError
from attrdist.pack.leakage import perceptual_hash
from attrdist.pack.pipeline import ItemError, ItemFailure, parallel_map, read_checked, verify_bytes
from tests.conftest import ROOT


def _square_or_fail(x: int) -> int:  # module level: pickled into worker processes
    if x % 7 == 3:
        raise ItemFailure("bad_item", f"item {x}")
    if x == -1:
        raise AttrdistError("a fatal error stops the map")
    return x * x


def _expected(x: int):
    return ItemError("bad_item", f"item {x}") if x % 7 == 3 else x * x


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 8])
def test_parallel_map_keeps_order_and_counts_failures_in_place(threads, chunk):
    items = list(range(103))  # not a multiple of any chunk size: the last task is short
    got = list(parallel_map(_square_or_fail, iter(items), 2, chunk=chunk, threads=threads))
    assert got == [_expected(x) for x in items]
    assert list(parallel_map(_square_or_fail, items, 1)) == got  # in this process: the same results


@pytest.mark.parametrize("threads", [False, True])
def test_parallel_map_raises_a_fatal_error(threads):
    with pytest.raises(AttrdistError, match="fatal"):
        list(parallel_map(_square_or_fail, [1, 2, -1, 4], 2, chunk=3, threads=threads))


def _jpeg(small_demo) -> tuple[bytes, str]:
    path = sorted((small_demo / "images").rglob("*.jpg"))[0]
    return path.read_bytes(), str(path)


def test_verify_bytes_fingerprints_what_the_leak_check_reads(small_demo):
    data, path = _jpeg(small_demo)
    v = verify_bytes(data, path)
    w, h = Image.open(io.BytesIO(data)).size
    assert v == {"format": "JPEG", "width": w, "height": h, "sha1": hashlib.sha1(data).hexdigest(),
                 "phash": perceptual_hash(data)}
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, format="PNG")
    vp = verify_bytes(png.getvalue(), "x.png")
    assert (vp["format"], vp["width"], vp["height"]) == ("PNG", w, h)


def test_verify_decodes_jpegs_to_pils_grey_draft_pixels(small_demo, monkeypatch):
    """The verify pass decodes YCbCr/grey JPEGs through simplejpeg: the grey image must be PIL's
    draft("L") image, bit for bit (so the perceptual hash is PIL's), for every subsampling, progressive and
    grey files and sizes at each DCT scale; CMYK and files libjpeg warns about go to PIL as before."""
    from attrdist.pack.leakage import DRAFT_SIZE
    from attrdist.pack.pipeline import _gray_draft
    from tests.test_decode import encode, photos, variants

    cases = dict(variants(small_demo))
    im = photos(small_demo)[0]
    for side in (60, 100, 130, 200, 257, 500, 520):  # every scale PIL's draft picks, and each one's edges
        cases[f"{side}px"] = encode(im.resize((side + 3, side)), quality=90)
    for name, data in cases.items():
        pil = Image.open(io.BytesIO(data))
        pil.draft("L", DRAFT_SIZE)
        want = np.asarray(pil.convert("L"))
        got = _gray_draft(data, DRAFT_SIZE)
        assert got is not None and got.dtype == np.uint8 and np.array_equal(got, want), name
        assert verify_bytes(data, name)["phash"] == perceptual_hash(data), name
    cmyk = encode(im.convert("CMYK"), quality=90)
    jpg = encode(im, quality=90)
    sos = jpg.index(b"\xff\xda")
    stray = jpg[:sos] + b"\x00\x00" + jpg[sos:]  # libjpeg warns: simplejpeg refuses, PIL decodes it
    assert _gray_draft(cmyk, DRAFT_SIZE) is None and _gray_draft(stray, DRAFT_SIZE) is None
    assert verify_bytes(stray, "stray")["phash"] == perceptual_hash(stray)
    assert verify_bytes(cmyk, "cmyk")["phash"] == perceptual_hash(cmyk)


def test_verify_bytes_refuses_broken_images(small_demo):
    data, path = _jpeg(small_demo)
    cases = {"truncated JPEG": (data[: len(data) // 2], "corrupt_image"),
             "header cut short": (data[:300], "corrupt_image"),
             "not an image": (b"just some text, not pixels" * 20, "not_an_image")}
    for what, (bad, reason) in cases.items():
        with pytest.raises(ItemFailure) as e:
            verify_bytes(bad, path)
        assert e.value.reason == reason, what
        assert path in str(e.value), what  # the message names the file


def test_read_checked_catches_a_file_changed_between_the_passes(small_demo, tmp_path):
    data, _ = _jpeg(small_demo)
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    sha1 = hashlib.sha1(data).hexdigest()
    assert read_checked(str(p), sha1) == data
    p.write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ItemFailure) as e:
        read_checked(str(p), sha1)
    assert e.value.reason == "changed_during_pack"
    p.unlink()
    with pytest.raises(ItemFailure) as e:
        read_checked(str(p), sha1)
    assert e.value.reason == "changed_during_pack"


def test_packing_imports_no_torch(small_demo, tmp_path):
    """A pack needs no torch (~600 MB of RSS and ~2 s to import; bench/memory.py): the shards are written with
    the standard library's tarfile. A real pack, in a fresh interpreter."""
    ann = small_demo / "annotations" / "instances_train.json"
    code = ("import sys\nfrom pathlib import Path\nfrom attrdist.pack.coco import AnnSource, pack_coco_images\n"
            f"m = pack_coco_images(Path({str(tmp_path / 'out')!r}), [AnnSource('train', Path({str(small_demo / 'images')!r}), "
            f"Path({str(ann)!r}))], workers=2, progress=False)\n"
            "assert m['splits']['train']['nsamples'] == 96, m['splits']\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'webdataset')))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]", p.stdout


@pytest.mark.parametrize("packer", ["imagefolder", "dior"])
def test_pass_2_of_every_packer_refuses_a_file_changed_since_pass_1(packer, small_demo, tmp_path):
    import importlib

    encode = importlib.import_module(f"attrdist.pack.{packer}")._encode
    data, _ = _jpeg(small_demo)
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    sha1 = hashlib.sha1(data).hexdigest()
    stored, ext, w, h, crc = encode((str(p), sha1, 0, 90))
    assert (stored, ext, (w, h)) == (data, "jpg", Image.open(io.BytesIO(data)).size)  # copied through as it is
    assert crc == zlib.crc32(data)  # the sample's checksum, taken in the pass-2 thread
    p.write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ItemFailure) as e:
        encode((str(p), sha1, 0, 90))
    assert e.value.reason == "changed_during_pack"
