"""The demo's RemoteCLIP stand-in: contrastive pretraining on aerial crops + captions learns (loss falls,
zero-shot val accuracy far above chance), its checkpoint loads into a fresh CLIP through the detector's
loader, and it is a pure function of the seed (the cached demo checkpoint reproduces it bit for bit)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from attrdist.demo import clip_pretrain as cp
from attrdist.demo.aerial import AerialSpec, ensure_aerial
from attrdist.pack.dior import pack_dior
from attrdist.models.detector import build_clip, load_clip_checkpoint

pytestmark = pytest.mark.recipes
SPEC = cp.ClipPretrainSpec(epochs=20, batch_size=32)  # ~166 train boxes; ~11 s; val accuracy 0.70-0.84
SHORT = cp.ClipPretrainSpec(epochs=2, batch_size=32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("aerial")
    root = ensure_aerial(tmp / "root", AerialSpec(seed=1, n_train=48, n_val=32, n_test=8), progress=False)
    pack_dior(root, tmp / "shards", dataset="dior-aerial-test", workers=1, progress=False)
    return tmp / "shards"


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    return cp.pretrain_clip(shards, out, SPEC, progress=False), out


def test_pretraining_learns_text_aligned_classes(run):
    result, _ = run
    losses = np.asarray(result["losses"])
    assert len(result["classes"]) == 12 and result["val_boxes"] >= 60
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses
    assert result["zero_shot_val"] > 3 / 12, result["zero_shot_val"]  # chance: 1/12


def test_checkpoint_loads_into_a_fresh_clip(run, shards, tmp_path):
    result, out = run
    clip, _ = build_clip("tiny")
    report = load_clip_checkpoint(clip, out)
    assert not (report.missing or report.unexpected or report.mismatched)
    saved = load_file(str(out))
    assert all(torch.equal(v, saved[k]) for k, v in clip.state_dict().items())
    crops, labels = cp.eval_crops(cp.load_boxes(shards, "val", result["classes"]), 128, SPEC)
    tokenizer = open_clip.get_tokenizer("RN50")
    assert cp.zero_shot_accuracy(clip, tokenizer, crops, labels, result["classes"]) == result["zero_shot_val"]
    cp.save_state(clip, tmp_path / "clip.pt")  # the .pt form, as RemoteCLIP-RN50.pt ships
    again, _ = build_clip("tiny")
    load_clip_checkpoint(again, tmp_path / "clip.pt")
    assert all(torch.equal(v, saved[k]) for k, v in again.state_dict().items())


def test_the_detectors_crop_scorer_sees_what_pretraining_saw(run, shards):
    """The detector's CLIP crop scores (roi_align crops of the whole normalised image, the frozen copy
    of the pretrained tower) classify the val boxes as well as the pretraining's own PIL crops did."""
    from attrdist.models.detector import CropScorer

    result, out = run
    clip, _ = build_clip("tiny")
    load_clip_checkpoint(clip, out)
    clip.eval()
    scorer = CropScorer(clip.visual, margin=float(np.mean(SPEC.margin)))
    val = cp.load_boxes(shards, "val", result["classes"])
    text = cp.class_embeddings(clip, open_clip.get_tokenizer("RN50"), result["classes"])
    hits = 0
    for i, image in enumerate(val.images):
        mine = np.flatnonzero(val.image_index == i)
        if not len(mine):
            continue
        xywh = torch.as_tensor(val.boxes[mine], dtype=torch.float32)
        probs = scorer(cp.to_tensor([np.asarray(image)]), [image.size[::-1]], [torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)],
                       text, clip.logit_scale)
        assert probs.shape == (len(mine), 12) and torch.allclose(probs.sum(1), torch.ones(len(mine)), atol=1e-5)
        hits += int((probs.argmax(1) == torch.from_numpy(val.labels[mine])).sum())
    accuracy = hits / len(val)
    print(f"crop scorer accuracy {accuracy:.3f}, pretraining's zero-shot {result['zero_shot_val']:.3f}")
    assert abs(accuracy - result["zero_shot_val"]) < 0.1 and accuracy > 3 / 12


def test_same_seed_same_weights_and_the_demo_cache(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRDIST_CACHE", str(tmp_path / "cache"))
    cp.pretrain_clip(shards, tmp_path / "clip.safetensors", SHORT, progress=False)
    path = cp.demo_clip_checkpoint(shards, SHORT, progress=False)
    assert path.parent == tmp_path / "cache" and path.with_suffix(".json").is_file()
    first, cached = load_file(str(tmp_path / "clip.safetensors")), load_file(str(path))
    assert first.keys() == cached.keys() and all(torch.equal(first[k], cached[k]) for k in first)
    mtime = path.stat().st_mtime_ns
    assert cp.demo_clip_checkpoint(shards, SHORT, progress=False) == path and path.stat().st_mtime_ns == mtime
    other = cp.demo_clip_checkpoint(shards, replace(SHORT, seed=1), progress=False)
    assert other != path and not torch.equal(load_file(str(other))["text_projection"], first["text_projection"])


def test_unknown_checkpoint_suffix_is_refused(shards, tmp_path):
    with pytest.raises(cp.AttrdistError, match="unknown checkpoint format"):
        cp.pretrain_clip(shards, tmp_path / "clip.bin", SPEC, progress=False)
