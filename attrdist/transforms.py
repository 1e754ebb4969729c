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

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from attrdist import rng as rnglib
from attrdist.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Refuse decompression bombs: more pixels than this raise PIL.Image.DecompressionBombError.
Image.MAX_IMAGE_PIXELS = 89_478_485


def decode_image(data: bytes, min_side: int | None = None) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 tensor [3, H, W].

    With `min_side`, JPEGs are decoded with DCT-domain downscaling (PIL `draft`) to the
    smallest scale whose sides stay >= min_side: much cheaper than decode-then-resize when the
    source is far larger than the training resolution.
    """
    with Image.open(io.BytesIO(data)) as im:
        if min_side and im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))
        if im.mode != "RGB":
            im = im.convert("RGB")
        arr = np.array(im)  # one copy out of PIL (asarray + copy made two, and convert of RGB a third)
    return torch.from_numpy(arr).permute(2, 0, 1)


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
    clamped once: one pass over the pixels instead of a uint8 -> float -> uint8 round trip per step
    (bench/input.py: the per-step version cost more than the decode)."""
    x = img_u8.float()
    if (brightness, contrast, saturation, hue) == (1.0, 1.0, 1.0, 0.0):
        return x.div_(255)
    m, c = colour_matrix(brightness, contrast, saturation, hue)
    m = m.float() / 255
    y = torch.einsum("ij,jhw->ihw", m, x)
    if c:
        y += c * float((_LUMA.float() @ x.mean(dim=(1, 2)))) / 255
    return y.clamp_(0, 1)


def rotate_hue(img_u8: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of a uint8 [3, H, W] image by `shift` turns (torchvision's hue_factor scale, -0.5..0.5)
    about the YIQ luma axis: luma is kept, chroma turns by 2*pi*shift."""
    t = 2 * math.pi * shift
    c, s = math.cos(t), math.sin(t)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)
    m = (_YIQ_INV @ rot @ _YIQ).float()
    y = torch.einsum("ij,jhw->ihw", m, img_u8.float())
    return y.round_().clamp_(0, 255).to(torch.uint8)


def normalize(img_u8: torch.Tensor) -> torch.Tensor:
    x = F.to_dtype(img_u8, torch.float32, scale=True)
    return F.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(img_u8: torch.Tensor, size: int, resize: float = 1.0) -> torch.Tensor:
    """Resize the short side to size*resize, centre-crop size x size, normalise."""
    short = max(size, int(round(size * resize)))
    x = F.resize(img_u8, [short], antialias=True)
    x = F.center_crop(x, [size, size])
    return normalize(x)


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


def train_transform(img_u8: torch.Tensor, key: int, size: int, aug: AugmentConfig) -> torch.Tensor:
    """Augment one image: a pure function of (image, key) -> normalised float [3, size, size]."""
    g = rnglib.generator(key)
    _, h, w = img_u8.shape
    top, left, ch, cw = _crop_params(g, h, w, aug.crop_scale, aug.crop_ratio)
    x = F.resized_crop(img_u8, top, left, ch, cw, [size, size], antialias=True)
    # Draw every parameter unconditionally so the stream layout never depends on the config.
    u = g.uniform(size=6)
    jitter = g.uniform(-1.0, 1.0, size=4)
    angle = float(g.uniform(-aug.rotate, aug.rotate)) if aug.rotate else 0.0
    if u[0] < aug.hflip:
        x = F.horizontal_flip(x)
    if u[1] < aug.vflip:
        x = F.vertical_flip(x)
    if angle:
        x = F.rotate(x, angle)
    x = colour_jitter(x, 1.0 + aug.brightness * float(jitter[0]), 1.0 + aug.contrast * float(jitter[1]),
                      1.0 + aug.saturation * float(jitter[2]), aug.hue * float(jitter[3]))  # float [0, 1]
    if u[2] < aug.blur:
        sigma = float(g.uniform(0.1, 2.0))
        k = max(3, int(2 * round(3 * sigma) + 1))
        x = F.gaussian_blur(x, [k, k], [sigma, sigma])
    x = F.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    if u[3] < aug.erase:
        x = _erase(x, g, aug.erase_scale)
    return x


def _erase(x: torch.Tensor, g: np.random.Generator, scale) -> torch.Tensor:
    """Random erasing (zero = the mean colour after normalisation), explicit RNG."""
    _, h, w = x.shape
    for _ in range(10):
        target = h * w * g.uniform(scale[0], scale[1])
        aspect = math.exp(g.uniform(math.log(0.3), math.log(3.3)))
        eh = int(round(math.sqrt(target * aspect)))
        ew = int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            i = int(g.integers(0, h - eh + 1))
            j = int(g.integers(0, w - ew + 1))
            return F.erase(x, i, j, eh, ew, torch.zeros(1, 1, 1), inplace=False)
    return x
