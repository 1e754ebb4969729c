"""decode_image decodes JPEGs with libjpeg-turbo through simplejpeg: the pixels must be PIL's, bit for bit, at
every DCT scale, for every chroma subsampling, progressive and grey files; what simplejpeg does not take
(CMYK, files with libjpeg warnings) must come out as PIL decodes it, and what PIL refuses must still fail.
Real photos: ../shared/data/coco (else the demo's scenes)."""

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from attrdist.core.transforms import decode_image
from tests.conftest import SHARED_DATA


def pil_decode(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """PIL's path, as decode_image took it for every image before simplejpeg."""
    with Image.open(io.BytesIO(data)) as im:
        if min_side and im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))
        if im.mode != "RGB":
            im = im.convert("RGB")
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def photos(small_demo) -> list[Image.Image]:
    files = sorted((SHARED_DATA / "coco" / "images").glob("*.jpg"))[:4] or sorted(
        (small_demo / "images").rglob("*.jpg"))[:4]
    return [Image.open(f).convert("RGB") for f in files]


def encode(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def variants(small_demo) -> dict[str, bytes]:
    """Each photo enlarged to a shorter side of at least ~960 px (the shared 640x480 COCO photos: x2; the demo's
    80 px scenes, the fallback without ../shared: x12), so that the sides asked for below fall on every DCT
    scale (1/1, 1/2, 1/4, 1/8), with odd sides (scaled sizes round up)."""
    out = {}
    for i, im in enumerate(photos(small_demo)):
        f = max(2, -(-960 // min(im.size)))
        big = im.resize((im.width * f + 3, im.height * f + 1), Image.BICUBIC)
        out[f"{i} 4:2:0 q90"] = encode(big, quality=90)
        out[f"{i} 4:4:4 q95"] = encode(big, quality=95, subsampling=0)
        out[f"{i} 4:2:2 q75"] = encode(big, quality=75, subsampling=1)
        out[f"{i} progressive"] = encode(big, quality=85, progressive=True)
        out[f"{i} grey"] = encode(big.convert("L"), quality=90)
    return out


def test_simplejpeg_gives_pils_pixels_at_every_scale(small_demo, monkeypatch):
    sides = (None, 5000, 600, 317, 224, 100, 40)  # full decode (also when min_side > the image), then 1/2, 1/4, 1/8
    cases = {name: (data, Image.open(io.BytesIO(data)).size, [pil_decode(data, s) for s in sides])
             for name, data in variants(small_demo).items()}

    def no_pil(*a, **k):
        raise AssertionError("decode_image fell back to PIL for a JPEG that simplejpeg decodes")

    monkeypatch.setattr(Image, "open", no_pil)  # from here on, only simplejpeg can decode
    for name, (data, (w, h), wants) in cases.items():
        for min_side, want in zip(sides, wants):
            got = decode_image(data, min_side)
            assert got.dtype == torch.uint8 and got.shape == want.shape, (name, min_side)
            assert torch.equal(got, want), (name, min_side, (got.int() - want.int()).abs().max())
        assert decode_image(data, 40).shape[1:] == ((h + 7) // 8, (w + 7) // 8), name  # it did scale down


def test_what_simplejpeg_refuses_is_decoded_or_refused_as_pil_does(small_demo):
    im = photos(small_demo)[0]
    cmyk = encode(im.convert("CMYK"), quality=90)  # not YCbCr: PIL converts it
    assert torch.equal(decode_image(cmyk, 100), pil_decode(cmyk, 100))
    # 2 stray bytes before the scan: libjpeg warns "extraneous bytes before marker" (simplejpeg refuses,
    # strict), PIL decodes the picture anyway
    jpg = encode(im, quality=90)
    sos = jpg.index(b"\xff\xda")
    stray = jpg[:sos] + b"\x00\x00" + jpg[sos:]
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(stray)
    assert torch.equal(decode_image(stray), pil_decode(stray))
    # cut short: PIL refuses it (and so does decode_image), never a half-grey picture
    with pytest.raises(OSError, match="truncated"):
        pil_decode(jpg[: len(jpg) // 2])
    with pytest.raises(OSError, match="truncated"):
        decode_image(jpg[: len(jpg) // 2])
    png = io.BytesIO()
    im.save(png, format="PNG")
    assert torch.equal(decode_image(png.getvalue()), pil_decode(png.getvalue()))
