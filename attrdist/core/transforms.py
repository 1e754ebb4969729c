"""Pure image transforms: decode, train augmentation f(image, key), eval preprocessing.

Every random choice is drawn from `rng.generator(key)`; there is no hidden state, so
`train_transform(img, key, ...)` returns the same tensor for the same inputs in any process
or worker. Geometry (crop, flips, rotation), blur and erasing are torchvision's
(`transforms.v2.functional`); the colour jitter is one affine colour map (`colour_jitter`: brightness,
contrast, saturation and a YIQ hue rotation composed, clipped once); only the parameter sampling lives here.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from attrdist.core import rng as rnglib
from attrdist.core.config import AugmentConfig, DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MODES = {"bilinear": F.InterpolationMode.BILINEAR, "bicubic": F.InterpolationMode.BICUBIC,
          "nearest": F.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """The concrete preprocessing of a DataConfig: resolution, the eval crop, the resampling filter and
    the normalisation. A run resolves data.image_size / eval_resize / interpolation / mean / std from its
    model when it starts (attrdist.models.preprocess.resolve) and records them in config.json; `of` reads
    them. A value left unresolved (a DataConfig built directly, or a config.json written before these keys
    existed) means what attrdist always did before: 224 px, no eval margin, bilinear, ImageNet mean/std."""

    image_size: int = 224
    eval_resize: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @classmethod
    def of(cls, d: DataConfig) -> "Preprocess":
        return cls(image_size=d.image_size or 224, eval_resize=d.eval_resize or 1.0,
                   interpolation="bilinear" if d.interpolation == "auto" else d.interpolation,
                   mean=tuple(d.mean) or IMAGENET_MEAN, std=tuple(d.std) or IMAGENET_STD)

    @property
    def mode(self) -> F.InterpolationMode:
        return _MODES[self.interpolation]

    @property
    def decode_side(self) -> int:
        """Eval: the short side the image is resized to (what JPEG draft decoding may go down to)."""
        return max(self.image_size, int(round(self.image_size * self.eval_resize)))

# Refuse decompression bombs: more pixels than this raise PIL.Image.DecompressionBombError.
Image.MAX_IMAGE_PIXELS = 89_478_485


def decode_image(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 tensor [3, H, W].

    With `min_side`, JPEGs are decoded with DCT-domain downscaling (PIL `draft`'s choice: the largest
    of 1/2, 1/4, 1/8 whose sides stay >= min_side): much cheaper than decode-then-resize when the
    source is far larger than the training resolution.

    JPEGs in YCbCr or grey are decoded by libjpeg-turbo through simplejpeg, straight into the array
    (no PIL image, no copy out of it): the same pixels as PIL's decode, bit for bit, at every scale
    (tests/test_decode.py), 1.19-1.70x PIL's speed in bench/input.py's decode-only passes (decode_pil
    vs decode_attrdist).
    Anything else, and any JPEG that simplejpeg refuses (it stops at libjpeg's warnings, where PIL
    decodes what it can), takes PIL's path, so what decodes and what fails is PIL's call as before.
    """
    if data[:3] == b"\xff\xd8\xff":
        try:
            return _decode_jpeg(data, min_side)
        except _NotForSimplejpeg:
            pass
    return decode_with_pil(data, min_side)


def decode_with_pil(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """`decode_image` through PIL: its path for PNG, CMYK JPEGs and JPEGs with libjpeg warnings."""
    with Image.open(io.BytesIO(data)) as im:
        if im.size[0] * im.size[1] > Image.MAX_IMAGE_PIXELS:  # PIL itself only warns up to 2x its limit
            raise Image.DecompressionBombError(f"{im.size[0]}x{im.size[1]} pixels is more than the "
                                               f"{Image.MAX_IMAGE_PIXELS} allowed (a decompression bomb?)")
        if min_side and im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))
        if im.mode != "RGB":
            im = im.convert("RGB")
        arr = np.array(im)  # one copy out of PIL (asarray + copy made two, and convert of RGB a third)
    return torch.from_numpy(arr).permute(2, 0, 1)


class _NotForSimplejpeg(Exception):
    pass


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a YCbCr or grey JPEG whose header libjpeg-turbo (simplejpeg) reads, within PIL's
    decompression-bomb limit; None for anything else (CMYK, YCCK, a header it refuses, a bomb: PIL decides)."""
    try:
        h, w, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colourspace not in ("YCbCr", "Gray") or w * h > Image.MAX_IMAGE_PIXELS:
        return None
    return h, w


def _decode_jpeg(data: bytes, min_side: int | None) -> torch.Tensor:
    size = jpeg_size(data)
    if size is None:
        raise _NotForSimplejpeg
    h, w = size
    scale = draft_scale(h, w, min_side)
    try:  # simplejpeg picks the smallest scale M/8 with sides >= these: exactly 1/scale
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-w // scale), min_height=-(-h // scale))
    except ValueError:  # a libjpeg warning (strict) or error: PIL decides
        raise _NotForSimplejpeg from None
    return torch.from_numpy(arr).permute(2, 0, 1)


def draft_scale(h: int, w: int, min_side: int | None) -> int:
    """The factor `decode_image(data, min_side)` scales an h x w JPEG down by in the DCT domain: PIL's draft,
    the largest power of 2 <= min(w // min_side, h // min_side), at most 8 (1 without `min_side`). The
    decoded image is ceil(h / scale) x ceil(w / scale)."""
    if not min_side:
        return 1
    fits = min(w // min_side, h // min_side)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


# Hue rotation in YIQ space: a 3x3 colour matrix, ~18x cheaper than torchvision's HSV round trip at
# 224 px (0.12 vs 2.1 ms, bench/input.py found adjust_hue ~60 % of the augmentation time).
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_YIQ_INV = torch.linalg.inv(_YIQ)


_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)


def colour_matrix(brightness: float, contrast: float, saturation: float, hue: float) -> tuple[torch.Tensor, float]:
    """(M, c): brightness, contrast, saturation and hue jitter composed into one affine colour map
    x -> M @ x + c * luma_mean(x) (RGB, any scale). The steps are torchvision's ColorJitter steps in
    this fixed order (brightness scales, contrast blends towards the mean grey, saturation towards each
    pixel's grey, hue turns chroma about the grey axis), without clipping in between."""
    eye = torch.eye(3, dtype=torch.float64)
    grey = torch.ones(3, 1, dtype=torch.float64) @ _LUMA.view(1, 3)  # x -> its grey, in all 3 channels
    t = 2 * math.pi * hue
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(t), -math.sin(t)], [0.0, math.sin(t), math.cos(t)]],
                       dtype=torch.float64)
    m = (_YIQ_INV @ rot @ _YIQ) @ (saturation * eye + (1 - saturation) * grey) * (contrast * brightness)
    # contrast's pull towards the mean grey of the brightened image: a grey offset, which saturation and
    # hue leave as it is (they keep grey)
    return m, (1 - contrast) * brightness


def colour_jitter(img_u8: torch.Tensor, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0,
                  hue: float = 0.0) -> torch.Tensor:
    """uint8 [3, H, W] -> float [0, 1] with the jitter applied as one affine map (`colour_matrix`) and
    clamped once (the per-step uint8 -> float -> uint8 round trips cost more than the decode:
    bench/input.py). The same map a training batch goes through (`photometric`, which fuses it with the
    normalisation)."""
    m, c = colour_matrix(brightness, contrast, saturation, hue)
    colour = torch.cat([m, torch.full((3, 1), c, dtype=torch.float64)], dim=1).float()
    return _colour_map(img_u8[None].float(), colour[None])[0].div_(255)


def _colour_map(x: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] on 0..255 -> each image's map x -> M @ x + c * (its luma mean), clamped to
    0..255 (a new tensor): one batched matmul and one fused add + clamp."""
    b, _, h, w = x.shape
    grey = x.mean(dim=(2, 3)) @ _LUMA.to(x.device, torch.float32)  # [B]: each image's mean luma
    y = torch.bmm(colour[:, :, :3], x.reshape(b, 3, h * w))
    return y.add_((colour[:, :, 3] * grey[:, None]).unsqueeze(2)).clamp_(0, 255).view(b, 3, h, w)


def rotate_hue(img_u8: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of a uint8 [3, H, W] image by `shift` turns (torchvision's hue_factor scale, -0.5..0.5)
    about the YIQ luma axis: luma is kept, chroma turns by 2*pi*shift."""
    t = 2 * math.pi * shift
    c, s = math.cos(t), math.sin(t)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)
    m = (_YIQ_INV @ rot @ _YIQ).float()
    y = torch.einsum("ij,jhw->ihw", m, img_u8.float())
    return y.round_().clamp_(0, 255).to(torch.uint8)


def eval_geometry(img_u8: torch.Tensor, size: int, resize: float = 1.0, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize the short side to size*resize (antialiased, `interpolation`: bilinear, bicubic or nearest),
    centre-crop size x size: uint8 [3, size, size]. 1/resize is timm's crop_pct."""
    short = max(size, int(round(size * resize)))
    x = F.resize(img_u8, [short], interpolation=_MODES[interpolation], antialias=True)
    return F.center_crop(x, [size, size]).contiguous()


def eval_transform(img_u8: torch.Tensor, pre: Preprocess = Preprocess()) -> torch.Tensor:
    """`eval_geometry` then normalisation, both as `pre` says: float [3, size, size]."""
    x = eval_geometry(img_u8, pre.image_size, pre.eval_resize, pre.interpolation)
    return photometric(x[None], mean=pre.mean, std=pre.std)[0]


def _crop_params(g: np.random.Generator, h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, height, width), torchvision's algorithm, explicit RNG."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * g.uniform(scale[0], scale[1])
        aspect = math.exp(g.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(g.integers(0, h - ch + 1))
            left = int(g.integers(0, w - cw + 1))
            return top, left, ch, cw
    # fallback: central crop at the nearest allowed aspect ratio
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass(frozen=True)
class TrainParams:
    """Every random choice of one sample's training augmentation, for a source image of `source` (h, w):
    the spatial steps (`geometry`, applied by `apply_geometry` wherever the pixels are) and the pixel-wise
    ones (`colour`, `erase`, applied by `photometric`)."""

    source: tuple[int, int]  # (height, width) of the image the crop box is in
    crop: tuple[int, int, int, int]  # (top, left, height, width) in the source image
    hflip: bool
    vflip: bool
    angle: float  # degrees; 0 = no rotation
    sigma: float  # Gaussian blur's sigma; 0 = no blur
    colour: torch.Tensor  # float32 [3, 4]: the map x -> M @ x + c * grey mean on 0..255 pixels, as [M | c]
    erase: tuple[int, int, int, int]  # (top, left, height, width) in the output; height 0 = none

    def geometry(self) -> torch.Tensor:
        """The spatial steps as one float64 row [10]: source h, w, crop top, left, h, w, hflip, vflip, angle,
        sigma (float64 holds the integers and the drawn floats exactly, so `apply_geometry` of the row is
        `apply_geometry` of these parameters, bit for bit)."""
        return torch.tensor([*self.source, *self.crop, float(self.hflip), float(self.vflip), self.angle, self.sigma],
                            dtype=torch.float64)


def draw_train_params(key: int, h: int, w: int, size: int, aug: AugmentConfig) -> TrainParams:
    """The augmentation's parameters for a source image of h x w pixels and a size x size output: a pure
    function of (key, h, w, size, aug). The one place they are drawn, for the workers' decode
    (`train_geometry`) and the device's (data.decode=device: `draw_full_size_params`, the same draw).

    The stream layout is fixed: crop (torchvision's rejection loop), 6 uniforms (hflip, vflip, blur, erase
    and 2 spare), 4 jitters, the angle when aug.rotate, sigma when blurred, the erasing box when erased; every
    one of these draws happens whatever their probabilities, so the stream never depends on the config
    beyond that."""
    g = rnglib.generator(key)
    crop = _crop_params(g, h, w, aug.crop_scale, aug.crop_ratio)
    u = g.uniform(size=6)
    jitter = g.uniform(-1.0, 1.0, size=4)
    angle = float(g.uniform(-aug.rotate, aug.rotate)) if aug.rotate else 0.0
    m, c = colour_matrix(1.0 + aug.brightness * float(jitter[0]), 1.0 + aug.contrast * float(jitter[1]),
                         1.0 + aug.saturation * float(jitter[2]), aug.hue * float(jitter[3]))
    sigma = float(g.uniform(0.1, 2.0)) if u[2] < aug.blur else 0.0
    box = _erase_box(g, size, size, aug.erase_scale) if u[3] < aug.erase else (0, 0, 0, 0)
    colour = torch.cat([m, torch.full((3, 1), c, dtype=torch.float64)], dim=1).float()
    return TrainParams(source=(h, w), crop=crop, hflip=bool(u[0] < aug.hflip), vflip=bool(u[1] < aug.vflip),
                       angle=angle, sigma=sigma, colour=colour, erase=box)


def draw_full_size_params(key: int, h: int, w: int, size: int, aug: AugmentConfig, min_side: int) -> TrainParams:
    """What the workers draw for an h x w JPEG they decode with `decode_image(data, min_side)` (at
    1/`draft_scale`), for the same image decoded at full size (data.decode=device): the same draw (every
    parameter the same) with the crop box scaled up to full-size pixels (cut at the image's edge, where the
    reduced image's last pixel covered a partial block). Drawing at full size instead would change the crop
    loop's rounding and with it, where a candidate box is accepted in one size and not the other, every
    later draw: 7.4 % of the keys for 80 px demo images at size 24 (scale 1/2)."""
    s = draft_scale(h, w, min_side)
    p = draw_train_params(key, -(-h // s), -(-w // s), size, aug)
    top, left, ch, cw = p.crop
    return replace(p, source=(h, w), crop=(top * s, left * s, min(ch * s, h - top * s), min(cw * s, w - left * s)))


def apply_geometry(img_u8: torch.Tensor, geometry, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The spatial steps of `TrainParams.geometry()` (a float64 row or its list) on a uint8 [3, h, w] image on
    any device: the resized crop (antialiased, `interpolation`), flips, rotation, then the blur (spatial and
    linear: before the colour map, which commutes with it up to its clamp). uint8 [3, size, size]."""
    _, _, top, left, ch, cw, hflip, vflip, angle, sigma = (geometry.tolist() if isinstance(geometry, torch.Tensor)
                                                           else geometry)
    x = F.resized_crop(img_u8, int(top), int(left), int(ch), int(cw), [size, size], interpolation=_MODES[interpolation],
                       antialias=True)
    if hflip:
        x = F.horizontal_flip(x)
    if vflip:
        x = F.vertical_flip(x)
    if angle:
        x = F.rotate(x, angle)
    if sigma:
        k = max(3, int(2 * round(3 * sigma) + 1))
        x = F.gaussian_blur(x, [k, k], [sigma, sigma])
    return x.contiguous()


def train_geometry(img_u8: torch.Tensor, key: int, size: int, aug: AugmentConfig,
                   interpolation: str = "bilinear") -> dict[str, torch.Tensor]:
    """The worker's half of the augmentation, a pure function of (image, key): the spatial steps (crop,
    flips, rotation, blur) done on uint8 pixels, and the parameters of the pixel-wise steps (colour map,
    erasing box) drawn but not applied (`draw_train_params` then `apply_geometry`). `photometric` applies
    them to a whole batch where the batch lands (the training process, on its device): workers ship uint8
    images, 4x fewer bytes than float, and the per-pixel float work runs once per batch, vectorised
    (bench/input.py).

    Returns {"image": uint8 [3, size, size], "colour": float32 [3, 4] (the map x -> M @ x + c * grey mean,
    on 0..255 pixels, as [M | c]), "erase": int64 [4] (top, left, height, width; height 0 = none)}."""
    _, h, w = img_u8.shape
    p = draw_train_params(key, h, w, size, aug)
    return {"image": apply_geometry(img_u8, p.geometry(), size, interpolation), "colour": p.colour,
            "erase": torch.tensor(p.erase, dtype=torch.int64)}


IDENTITY_COLOUR = torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1)
NO_ERASE = torch.zeros(4, dtype=torch.int64)
@lru_cache(maxsize=16)
def _normaliser(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device = torch.device("cpu")
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, shift, luma weights) on `device`: 0..255 pixels -> normalised as x * scale - shift, per channel.
    Cached per device: a copy of a small CPU tensor to a GPU is synchronous (pageable memory), so copying these
    per batch would make the host wait for the device every step (run.host_sync=lagged exists to avoid that)."""
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    return tuple(t.to(device) for t in (1.0 / (255.0 * s), m / s, _LUMA.to(torch.float32)))


def photometric(images: torch.Tensor, colour: torch.Tensor | None = None, erase: torch.Tensor | None = None,
                memory_format=torch.contiguous_format, *, mean: tuple[float, ...] = IMAGENET_MEAN,
                std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """The pixel-wise half, on a batch wherever it is (CPU or GPU): uint8 [B, 3, H, W] -> float32 images,
    each sample's colour map applied and clamped once, normalised with `mean`/`std` (on the 0..1 scale:
    the run's data.mean/std, `Preprocess`), then its erasing box (host tensor [B, 4]: top, left, height,
    width; height 0 = none) set to 0, the mean colour. Without `colour`/`erase`: normalisation only (eval).

    The colour map and the normalisation are both affine, so they run as one `baddbmm` (the map's rows
    scaled by 1/(255 std), its offset shifted by mean/std) and one clamp to each channel's normalised
    [0, 255] range: 2 passes over the float pixels instead of 5 (bench/input.py; the same values as
    `colour_jitter` then normalising, up to float rounding: tests/test_data.py)."""
    x = images.float()
    dev = x.device
    scale, shift, luma = _normaliser(tuple(mean), tuple(std), dev)
    if colour is None:
        x = x.mul_(scale.view(1, 3, 1, 1)).sub_(shift.view(1, 3, 1, 1))
    else:
        b, _, h, w = x.shape
        colour = colour.to(dev, torch.float32)
        grey = x.mean(dim=(2, 3)) @ luma  # [B]: each image's mean luma
        m = colour[:, :, :3] * scale.view(1, 3, 1)
        bias = colour[:, :, 3] * grey[:, None] * scale.view(1, 3) - shift.view(1, 3)
        y = torch.baddbmm(bias.unsqueeze(2), m, x.reshape(b, 3, h * w))
        x = y.clamp_(min=(-shift).view(1, 3, 1), max=(255.0 * scale - shift).view(1, 3, 1)).view(b, 3, h, w)
    if erase is not None:
        for i, (top, left, eh, ew) in enumerate(erase.tolist()):
            if eh:
                x[i, :, top:top + eh, left:left + ew] = 0.0
    return x.contiguous(memory_format=memory_format)


def train_transform(img_u8: torch.Tensor, key: int, size: int, aug: AugmentConfig,
                    pre: Preprocess = Preprocess()) -> torch.Tensor:
    """Augment one image: a pure function of (image, key) -> normalised float [3, size, size];
    `train_geometry` then `photometric`, exactly as a training batch gets them."""
    g = train_geometry(img_u8, key, size, aug, pre.interpolation)
    return photometric(g["image"][None], g["colour"][None], g["erase"][None], mean=pre.mean, std=pre.std)[0]


def _erase_box(g: np.random.Generator, h: int, w: int, scale) -> tuple[int, int, int, int]:
    """Random erasing's box (top, left, height, width), torchvision's algorithm, explicit RNG;
    (0, 0, 0, 0) when no box fits in 10 tries."""
    for _ in range(10):
        target = h * w * g.uniform(scale[0], scale[1])
        aspect = math.exp(g.uniform(math.log(0.3), math.log(3.3)))
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            i = int(g.integers(0, h - eh + 1))
            j = int(g.integers(0, w - ew + 1))
            return i, j, eh, ew
    return 0, 0, 0, 0
