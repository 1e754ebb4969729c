"""data.decode=device: a batch's JPEGs decoded and cropped on the run's device, with the workers' keys.

Workers do everything but the decode (`samples.SampleDataset`): read the sample, check it, read its JPEG
header (`device_decodable`: the full-size height and width), draw the augmentation with the sample's key
exactly as the worker path draws it (`transforms.draw_full_size_params`: `draw_train_params` at the size
the workers would decode at, the crop box scaled to full-size pixels), and hand over the bytes. `pack_jpegs` packs a batch's bytes into one flat uint8 tensor and their lengths (one storage
through shared memory and pinning). Where the batch lands, `device_images` decodes them with one
`torchvision.io.decode_jpeg` call (nvJPEG on CUDA; libjpeg-turbo on a CPU device) and applies each
sample's crop, flips, rotation and blur there (`transforms.apply_geometry`; eval: `eval_geometry`).

nvJPEG decodes at full size (no DCT-domain downscaling as in the workers' `decode_image`): the same box of
the image is resampled from more pixels, and nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's.
Device-decoded pixels therefore differ slightly from the worker path's while every parameter is the same
(on a CPU device, where the workers decode at full size too, they are the same pixels; at 1/2 scale a mean
of <= 1.4 grey levels: tests/test_device_decode.py).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from attrdist.core.transforms import Preprocess, apply_geometry, decode_image, eval_geometry, jpeg_size


def device_decodable(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device decodes: YCbCr or grey as libjpeg-turbo's header reader
    (simplejpeg) sees it, within PIL's decompression-bomb limit, ending at its end-of-image marker. None for
    anything else (PNG, CMYK/YCCK, a header simplejpeg refuses, a bomb, a file cut short or with bytes after
    its end): the worker decodes those as in data.decode=workers, so what fails there fails the same way (a
    file cut short is corrupt there whatever a GPU decoder would make of it). Reads the header only: 0.14 ms
    a COCO photo with the parameter draw, against 1.5 ms to decode and crop it (one core)."""
    if data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return None
    return jpeg_size(data)


def pack_jpegs(jpegs: list[bytes | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's JPEG bytes (None: a sample decoded in its worker) -> (uint8 [total bytes], int64 [B]
    lengths, 0 for None). One flat tensor rather than a list of B tensors (which collate and pin_memory
    would pass on too: torch's `pin_memory` walks lists): a DataLoader worker sends each tensor's storage as
    its own shared-memory file, and 32 COCO JPEGs (70 kB each) took 13.6-17.5 ms per batch to arrive as 32
    tensors against 2.0-3.2 ms as one (one worker, this 2-core machine)."""
    lens = [len(j) if j is not None else 0 for j in jpegs]
    flat = torch.empty(sum(lens), dtype=torch.uint8)
    buf, at = flat.numpy(), 0
    for j, n in zip(jpegs, lens):
        if n:
            buf[at:at + n] = np.frombuffer(j, dtype=np.uint8)
            at += n
    return flat, torch.tensor(lens, dtype=torch.int64)


def device_images(batch: dict, device: torch.device, pre: Preprocess) -> tuple[list, dict[int, str]]:
    """The device stage of a data.decode=device batch (`samples.collate`'s "jpeg", "jpeg_len", train:
    "geometry"): ([B] uint8 [3, size, size] images on `device`, None where a sample failed; {i: why sample
    i failed}). Samples with no bytes (decoded in their worker) are None here too and not in the failures:
    the caller takes their image from the batch. Train: each sample's `apply_geometry` on its decoded
    image; eval: `eval_geometry` (short side to size * eval_resize, centre crop)."""
    lens = batch["jpeg_len"].tolist()
    todo = [i for i, n in enumerate(lens) if n]
    views = torch.split(batch["jpeg"], lens)
    decoded = decode_jpegs([views[i] for i in todo], device)
    geometry = batch["geometry"].tolist() if "geometry" in batch else None
    out: list = [None] * len(lens)
    failed: dict[int, str] = {}
    for i, img in zip(todo, decoded):
        try:
            if isinstance(img, Exception):
                raise img
            if geometry is not None:
                h, w = int(geometry[i][0]), int(geometry[i][1])
                if tuple(img.shape[1:]) != (h, w):  # the crop box was drawn for the header's size
                    raise ValueError(f"decoded to {img.shape[2]}x{img.shape[1]} pixels, its header says {w}x{h}")
                out[i] = apply_geometry(img, geometry[i], pre.image_size, pre.interpolation)
            else:
                out[i] = eval_geometry(img, pre.image_size, pre.eval_resize, pre.interpolation)
        except Exception as e:  # noqa: BLE001: any failure of one sample is that sample's (named, counted)
            failed[i] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
    return out, failed


def decode_jpegs(views: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """JPEG bytes (1-D uint8 CPU tensors) -> uint8 RGB [3, H, W] on `device`, or the exception of the one
    that could not be decoded. One batched `torchvision.io.decode_jpeg` call; if that raises (it returns
    nothing when any image fails), one call per image; an image the device refuses is decoded on the CPU
    (`decode_image`: libjpeg-turbo, or PIL for what simplejpeg refuses) and moved to `device`."""
    if not views:
        return []
    try:
        return _decode_on(views, device)
    except Exception:  # noqa: BLE001: find the culprits one by one
        pass
    out: list = []
    for v in views:
        try:
            out.append(_decode_on([v], device)[0])
        except Exception:  # noqa: BLE001: the device refused it: the CPU's decoder decides
            try:
                out.append(decode_image(v.numpy().tobytes()).to(device))
            except Exception as e:  # noqa: BLE001
                out.append(e)
    return out


def _decode_on(views: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """`torchvision.io.decode_jpeg` of a list on `device`, RGB (grey JPEGs too), uint8 [3, H, W] each.

    On CUDA it runs with a side stream current, then the caller's stream waits for it and each output is
    recorded on the caller's stream. torchvision's decoder allocates its outputs on the current stream but
    writes them on a private one without waiting for the current stream, so with the caller's stream
    current it can be handed a block that kernels still queued there will read (torchvision PR #9606, the
    same race fixed in torchcodec PR #1634). Blocks of the side stream's pool are free only once the
    caller's stream is past every use of them (record_stream), so the decode may overlap queued compute
    without that race and without a host sync of the compute stream. torchvision 0.29 deprecates its image
    decoding (for TorchCodec) with a DeprecationWarning per call, silenced here; 0.26 does not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if device.type != "cuda":
            return decode_jpeg(views, mode=ImageReadMode.RGB, device=device)
        compute = torch.cuda.current_stream(device)
        side = _side_stream(device)
        with torch.cuda.stream(side):
            out = decode_jpeg(views, mode=ImageReadMode.RGB, device=device)
    compute.wait_stream(side)
    for img in out:
        img.record_stream(compute)
    return out


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream JPEGs are decoded under on `device` (one per device and process)."""
    return torch.cuda.Stream(device=device)


def decode_device(device) -> torch.device:
    """The device a batch is decoded on: `device` with its index made explicit on CUDA (the rank's own
    GPU; nvJPEG's decoder is built for one device, and torchvision compares devices with their index)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
