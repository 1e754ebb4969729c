"""Data order, per-rank slicing, and augmentation determinism across workers and processes."""

import numpy as np
import pytest
import torch

from attrdist.core.config import AugmentConfig, DataConfig
from hypothesis import given, settings
from hypothesis import strategies as st

from attrdist.core.order import BatchPlan, StreamPlan, epoch_order, first_samples, stream_count
from attrdist.data.samples import SampleDataset, batch_images, collate
from attrdist.data.loader import make_loader
from attrdist.core.rng import fold
from attrdist.data.reader import ShardReader, load_manifest
from attrdist.core.transforms import decode_image, train_geometry, train_transform


def test_epoch_order_is_a_pure_permutation():
    a, b = epoch_order(100, 0, 3), epoch_order(100, 0, 3)
    assert np.array_equal(a, b) and sorted(a) == list(range(100))
    assert not np.array_equal(a, epoch_order(100, 0, 4))
    assert not np.array_equal(a, epoch_order(100, 1, 3))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_partition_each_global_batch(world):
    n, B = 103, 8
    one = list(BatchPlan(n, B, 1, 0, seed=5, epoch=2, shuffle=True, drop_last=True))
    per_rank = [list(BatchPlan(n, B, world, r, seed=5, epoch=2, shuffle=True, drop_last=True)) for r in range(world)]
    assert all(len(p) == len(one) == n // B for p in per_rank)
    for step, full in enumerate(one):
        merged = [x for r in range(world) for x in per_rank[r][step]]
        assert merged == full  # same samples in the same global step, whatever the world size


def test_eval_plan_pads_and_covers_every_sample_once():
    n, B, W = 37, 8, 2
    seen = []
    lens = set()
    for r in range(W):
        batches = list(BatchPlan(n, B, W, r, 0, 0, shuffle=False, drop_last=False))
        lens.add(len(batches))
        seen += [i for b in batches for i, _ in b]
    assert len(lens) == 1  # every rank runs the same number of steps (no straggler hang)
    real = sorted(i for i in seen if i >= 0)
    assert real == list(range(n)) and seen.count(-1) == 5 * 8 - 37


def test_resume_start_skips_exactly():
    full = list(BatchPlan(64, 8, 1, 0, 1, 0, True, True))
    assert list(BatchPlan(64, 8, 1, 0, 1, 0, True, True, start=3)) == full[3:]


def stream_batches(lengths, B, W, start=0, epoch=3, **kw) -> list[list[int]]:
    """The global batches of the windowed order, rank slices joined in rank order."""
    ranks = [list(StreamPlan(np.asarray(lengths), B, W, r, 0, epoch, start=start, **kw)) for r in range(W)]
    assert len({len(r) for r in ranks}) == 1  # every rank takes the same number of steps
    return [[i for rk in ranks for i, _ in rk[b]] for b in range(len(ranks[0]))]


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=25), B=st.sampled_from([2, 4, 6, 8, 12, 16, 24]),
       streams=st.sampled_from([1, 2, 4, 6, 8, 64]), window=st.integers(1, 5), start_frac=st.floats(0, 1),
       epoch=st.integers(0, 3))
def test_windowed_order_is_world_size_independent_and_resumes_exactly(lengths, B, streams, window, start_frac, epoch):
    """Any shard sizes, batch, stream count and window: floor(n/B) batches of distinct samples of the split;
    the same global batches at every world size dividing the streams; a resume at batch k is the rest."""
    n = sum(lengths)
    kw = dict(streams=streams, window=window, epoch=epoch)
    one = stream_batches(lengths, B, 1, **kw)
    flat = [i for b in one for i in b]
    assert len(one) == n // B and all(len(b) == B for b in one)
    assert len(set(flat)) == len(flat) and all(0 <= i < n for i in flat)
    S = stream_count(streams, B)
    for W in (2, 3, 4, 8):
        if S % W == 0:
            assert stream_batches(lengths, B, W, **kw) == one, W
    k = int(start_frac * len(one))
    assert stream_batches(lengths, B, max(w for w in (1, 2) if S % w == 0), start=k, **kw) == one[k:]


def test_windowed_order_reads_a_contiguous_share_of_the_shards_per_rank():
    """100 shards of 50, 8 ranks: each rank's samples come from ~1/8 of the shards (its part of the epoch's
    shard sequence, plus at most the two it shares with its neighbours), a window of 2 shards per stream
    at a time; the epoch reshuffles which shards a rank gets; the windows cover what the rank reads."""
    lengths, B, W = [50] * 100, 64, 8
    shard_of = np.repeat(np.arange(100), 50)
    got = {}
    for epoch in (0, 1):
        for r in range(W):
            plan = StreamPlan(np.asarray(lengths), B, W, r, 0, epoch, streams=16, window=2)
            seen = {int(shard_of[i]) for b in plan for i, _ in b}
            assert len(seen) <= 100 // W + 2
            assert seen <= {s for _, _, shards in plan.schedule() for s in shards}
            got[epoch, r] = seen
    assert got[0, 0] != got[1, 0]
    plan = StreamPlan(np.asarray(lengths), B, 1, 0, 0, 0, streams=16, window=2)
    first = plan.schedule()[:16]
    assert all(f == 0 and len(shards) <= 2 for f, _, shards in first)  # 16 streams open 1 window each


def test_windowed_order_is_keyed_and_mixes_streams():
    lengths = np.asarray([40, 40, 16])
    a = stream_batches(lengths, 8, 1, epoch=0)
    assert a == stream_batches(lengths, 8, 1, epoch=0)
    assert a != stream_batches(lengths, 8, 1, epoch=1)
    assert list(StreamPlan(lengths, 8, 1, 0, seed=1, epoch=0)) != list(StreamPlan(lengths, 8, 1, 0, seed=0, epoch=0))
    with pytest.raises(ValueError, match="do not divide the 4 canonical streams"):
        StreamPlan(lengths, 12, 3, 0, 0, 0, streams=64)  # gcd(64, 12) = 4 streams, 3 ranks


def test_first_samples_cuts_the_shard_list():
    assert first_samples([40, 40, 16], 50).tolist() == [40, 10]
    assert first_samples([40, 40, 16], 40).tolist() == [40]
    assert first_samples([40, 40, 16], 96).tolist() == [40, 40, 16]
    assert first_samples([40, 40, 16], 500).tolist() == [40, 40, 16]


def test_train_transform_is_pure(small_shards):
    reader = ShardReader(load_manifest(small_shards), "train")
    img = decode_image(reader[0]["jpg"])
    aug = AugmentConfig(hue=0.05, rotate=10, blur=0.5, vflip=0.5)
    a = train_transform(img, fold(0, 1, 0, 0), 48, aug)
    b = train_transform(img.clone(), fold(0, 1, 0, 0), 48, aug)
    c = train_transform(img, fold(0, 1, 1, 0), 48, aug)
    assert a.shape == (3, 48, 48) and torch.equal(a, b) and not torch.equal(a, c)


def test_a_batch_gets_each_samples_own_augmentation(small_shards):
    """Workers do the spatial half on uint8 and ship each sample's colour map and erasing box; the
    batched pixel-wise half must give every sample exactly what `train_transform` gives it alone."""
    reader = ShardReader(load_manifest(small_shards), "train")
    aug = AugmentConfig(hue=0.1, saturation=0.4, erase=0.7, blur=0.3)
    imgs = [decode_image(reader[i]["jpg"]) for i in range(6)]
    keys = [fold(3, 1, 0, i) for i in range(6)]
    parts = [train_geometry(img, k, 40, aug) for img, k in zip(imgs, keys)]
    batch = {k: torch.stack([p[k] for p in parts]) for k in ("image", "colour", "erase")}
    got = batch_images(batch, "cpu", torch.channels_last)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
    for i, (img, k) in enumerate(zip(imgs, keys)):
        assert torch.allclose(got[i], train_transform(img, k, 40, aug), atol=1e-6)
    erased = [p for p in parts if p["erase"][2] > 0]
    assert erased, "erase=0.7 over 6 samples drew no box"
    for i, p in enumerate(parts):
        t, l, h, w = p["erase"].tolist()
        assert (got[i, :, t:t + h, l:l + w] == 0).all()
    # eval batches carry no parameters: normalisation only
    x = batch["image"]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(batch_images({"image": x}, "cpu"), (x.float() / 255 - mean) / std, atol=1e-5)


def test_cpu_workers_finish_the_images_exactly_as_the_device_would(small_shards):
    """pixels_in_workers (CPU device): the workers run the pixel-wise stage per sample; an accelerator
    gets uint8 + parameters and runs it batched. Both give the same images."""
    m = load_manifest(small_shards)
    cfg = DataConfig(image_size=40, augment=AugmentConfig(hue=0.05, erase=0.5))
    for train in (True, False):
        dev = SampleDataset(ShardReader(m, "train"), len(m.attributes), ["labels"], cfg, seed=2, train=train)
        cpu = SampleDataset(ShardReader(m, "train"), len(m.attributes), ["labels"], cfg, seed=2, train=train,
                            pixels_in_workers=True)
        items = [(i, 3) for i in range(8)] + [(-1, 3)]  # and a padding blank
        a = batch_images(collate([dev[it] for it in items]), "cpu")
        b = collate([cpu[it] for it in items])
        assert b["image"].dtype == torch.float32 and "colour" not in b
        assert torch.allclose(a, batch_images(b, "cpu"), atol=1e-5)


def _collect(ds, plan, workers):
    out = {}
    for batch in make_loader(ds, plan, workers):
        assert batch["image"].dtype == torch.uint8  # batches cross the process boundary as uint8
        for i, x in zip(batch["index"].tolist(), batch_images(batch, "cpu")):
            out[i] = x
    return out


def test_augmentation_identical_across_worker_and_process_counts(small_shards):
    m = load_manifest(small_shards)
    cfg = DataConfig(image_size=48, augment=AugmentConfig(hue=0.05, erase=0.5))
    ds = SampleDataset(ShardReader(m, "train"), len(m.attributes), ["labels"], cfg, seed=7, train=True)
    n = 48
    ref = _collect(ds, BatchPlan(n, 8, 1, 0, 7, 1, True, True), workers=0)
    assert len(ref) == n
    for workers in (1, 2):
        got = _collect(ds, BatchPlan(n, 8, 1, 0, 7, 1, True, True), workers)
        assert all(torch.equal(ref[i], got[i]) for i in ref)
    # two "ranks" with two workers each see the same augmented samples as one process
    merged = {}
    for r in range(2):
        merged.update(_collect(ds, BatchPlan(n, 8, 2, r, 7, 1, True, True), workers=2))
    assert merged.keys() == ref.keys() and all(torch.equal(ref[i], merged[i]) for i in ref)
    # and a different epoch gives different augmentations of the same samples
    other = _collect(ds, BatchPlan(n, 8, 1, 0, 7, 2, True, True), workers=0)
    assert sum(not torch.equal(ref[i], other[i]) for i in ref) > n // 2


def test_rotate_hue_keeps_luma_and_grey_and_turns_full_circle():
    from attrdist.core.transforms import rotate_hue

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)
    assert torch.equal(rotate_hue(x, 0.0), x) and torch.equal(rotate_hue(x, 1.0), x)
    grey = torch.full((3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(rotate_hue(grey, 0.3), grey)
    mid = torch.tensor([120, 90, 60], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 4).contiguous()
    y = rotate_hue(mid, 0.25).float()
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert abs((luma @ y[:, 0, 0]) - (luma @ mid[:, 0, 0].float())) < 1.0  # brightness kept
    assert not torch.equal(y.to(torch.uint8), mid)  # the colour did turn


def test_colour_jitter_is_torchvisions_steps_in_one_affine_map():
    from torchvision.transforms.v2 import functional as F

    from attrdist.core.transforms import colour_jitter

    g = torch.Generator().manual_seed(1)
    x = (torch.rand(3, 32, 32, generator=g) * 180 + 30).to(torch.uint8)  # away from 0/255: no clipping
    assert torch.equal(colour_jitter(x), x.float() / 255)
    for b, c, s in [(1.2, 1.0, 1.0), (1.0, 0.7, 1.0), (1.0, 1.0, 0.6), (1.1, 0.9, 1.2)]:
        ref = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x.float() / 255, b), c), s)
        assert (colour_jitter(x, b, c, s) - ref).abs().max() < 1e-4, (b, c, s)  # float rounding only


@pytest.mark.parametrize("norm", ["imagenet", "lite0", "clip"])
def test_photometric_is_the_colour_map_clamped_then_normalised_then_erased(norm):
    """`photometric` fuses the colour map with the normalisation (one baddbmm, one per-channel clamp): the
    same images as `colour_jitter` followed by torchvision's normalize and erasing, up to float rounding,
    clipping included (strong contrast and brightness push pixels past 0 and 255); with the run's mean/std
    (ImageNet's the default, mean = std = 0.5 for tf_efficientnet_lite0, OpenAI CLIP's)."""
    from torchvision.transforms.v2 import functional as F

    from attrdist.core.transforms import IMAGENET_MEAN, IMAGENET_STD, colour_jitter, colour_matrix, photometric
    from attrdist.models.preprocess import CLIP_MEAN, CLIP_STD

    mean, std = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "lite0": ((0.5,) * 3, (0.5,) * 3),
                 "clip": (tuple(CLIP_MEAN), tuple(CLIP_STD))}[norm]

    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (4, 3, 24, 20), generator=g, dtype=torch.uint8)
    params = [(1.0, 1.0, 1.0, 0.0), (1.6, 1.8, 0.5, 0.1), (0.4, 0.6, 1.4, -0.2), (1.2, 2.5, 1.0, 0.05)]
    colour = torch.stack([torch.cat([m, torch.full((3, 1), c, dtype=torch.float64)], dim=1).float()
                          for m, c in (colour_matrix(*p) for p in params)])
    erase = torch.tensor([[0, 0, 0, 0], [2, 3, 5, 4], [0, 0, 0, 0], [10, 1, 3, 9]])
    got = photometric(x, colour, erase, mean=mean, std=std) if norm != "imagenet" else photometric(x, colour, erase)
    assert (got - photometric(x, colour, erase, mean=mean, std=std)).abs().max() == 0
    for i, p in enumerate(params):
        ref = F.normalize(colour_jitter(x[i], *p), list(mean), list(std))
        top, left, h, w = erase[i].tolist()
        ref[:, top:top + h, left:left + w] = 0.0
        assert (got[i] - ref).abs().max() < 1e-5, (p, (got[i] - ref).abs().max())
    clipped = colour_jitter(x[3], *params[3])
    assert (clipped == 0).any() and (clipped == 1).any()  # the clamp was exercised


@pytest.mark.reliability
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_refused_before_decoding():
    """PIL only warns between 1x and 2x Image.MAX_IMAGE_PIXELS and decodes in full (a 10000x10000 PNG:
    ~300 MB per worker); decode_image refuses anything over 1x from the header alone."""
    import struct
    import zlib

    from PIL import Image

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    w = h = 10_000  # 100 M pixels: over the limit (89.5 M), under PIL's own error threshold (179 M)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(Image.DecompressionBombError, match="10000x10000 pixels is more than the 89478485 allowed"):
        decode_image(png)


def test_prefetching_asks_for_each_window_before_its_first_batch():
    """The loader's plan wrapper: every shard a rank reads is in the set handed to `prefetch` before the batch
    that reads it, no more than one window's span of batches ahead; a finished window leaves the set; a resumed
    epoch never asks for the windows it passed."""
    from attrdist.data.loader import Prefetching

    lengths = np.asarray([30] * 20)
    shard_of = np.repeat(np.arange(20), 30)
    for start in (0, 40):
        plan = StreamPlan(lengths, 8, 2, 1, 0, 0, streams=4, window=2, start=start)
        windows = plan.schedule()
        span = max(last - first + 1 for first, last, _ in windows)
        asked: list[list[int]] = []
        for b, batch in enumerate(Prefetching(plan, asked.append), start=start):
            assert {int(shard_of[i]) for i, _ in batch} <= set(asked[-1]), b
            assert set(asked[-1]) == {s for first, last, shards in windows if first < b + span and last >= b
                                      for s in shards}, b
        assert {s for req in asked for s in req} == {s for _, _, shards in windows for s in shards}
        if start:
            full = StreamPlan(lengths, 8, 2, 1, 0, 0, streams=4, window=2).schedule()
            assert len(windows) < len(full)


def test_a_world_size_that_does_not_divide_the_streams_is_one_line(small_shards):
    """The trainer refuses, before any step, a world size for which the windowed order cannot give the same
    batches (it does not divide gcd(data.streams, batch)), saying which world sizes work and the ways out;
    data.order=permutation takes it."""
    from attrdist.core.config import Config, apply_overrides
    from attrdist.errors import AttrdistError
    from attrdist.train.trainer import build_data

    m = load_manifest(small_shards)
    cfg = apply_overrides(Config(), [f"data.shards={small_shards}", "data.batch_size=12"])  # 4 streams
    with pytest.raises(AttrdistError, match=r"^data.order=windowed: 3 processes do not divide the 4 canonical streams "
                                            r"\(gcd of data.streams=64 and data.batch_size=12\); use a world size "
                                            r"dividing 4, or data.streams a multiple of 3"):
        build_data(cfg, m, world=3)
    assert build_data(cfg, m, world=2).batches_per_epoch == 96 // 12
    perm = apply_overrides(cfg, ["data.order=permutation"])
    assert build_data(perm, m, world=3).batches_per_epoch == 96 // 12
