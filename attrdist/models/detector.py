"""Open-vocabulary detector: a CLIP ResNet image tower inside torchvision's Faster R-CNN, regions
classified by cosine similarity against the frozen CLIP text embeddings of class prompts.

    from attrdist.pack.dior import PROMPTS                        # "a satellite image of an airplane", ...
    model = build_detector(DetectorConfig(), base_prompts, clip="RN50",             # full size, 800 px
                           checkpoint="/models/RemoteCLIP-RN50.pt")
    model = build_detector(DetectorConfig.tiny(), base_prompts, clip="tiny")      # CPU demo, 128 px
    losses = model(images, targets)          # train(): list of [3, H, W] in 0..1 + torchvision targets
    model.set_classes(PROMPTS, novel=NOVEL)  # all classes, novel ones included (only their prompts)
    model.eval(); detections = model(images) # [{"boxes" xyxy, "labels" 1..C, "scores"}] per image
    model.param_counts()                     # {"total", "trainable", "text", "image", "heads", "crops"}

Architecture (torchvision `FasterRCNN`, so its forward contract, losses and post-processing):

    image (0..1, CLIP mean/std: models/preprocess.py, resized by GeneralizedRCNNTransform to min_size/max_size)
      -> CLIP ModifiedResNet trunk (3-conv stem, layer1..4; the attention pool is not used)
      -> FPN over cfg.fpn_layers (+ a max-pool level), torchvision `BackboneWithFPN`
      -> RPN (anchors: one size per FPN level, cfg.anchor_sizes) -> MultiScaleRoIAlign 7x7
      -> TwoMLPHead -> `TextEmbeddingPredictor`:
           class logits = exp(logit_scale) * cos(proj(roi), [background; text embeddings]) [N, C+1]
           box deltas: class-agnostic (4 per RoI), repeated over the C+1 classes

With pretrained weights (`cfg.clip_crops`, default: iff a checkpoint was loaded) a frozen copy of the
whole CLIP image tower, attention pool included, is kept as `crop_scorer`: in evaluation the RPN's
`cfg.crop_topk` best proposals are classified by ViLD's ensemble (Gu et al. 2022) of the region
classifier and CLIP's own view of a square crop around each regressed box,

    score_c = p_det(c)^(1 - w_c) * p_clip(c)^w_c,   w_c = crop_weight_novel for novel classes, else crop_weight_base

because a novel class never had a training box: the region classifier learnt those objects as
background, while the frozen CLIP still knows them by name. Training is unchanged (the crop scorer
has no gradient and costs nothing there).

The text embeddings are a non-persistent buffer filled by `set_classes(prompts)` with the frozen
text tower (requires_grad False, always in eval mode), so class lists can change between training
(base classes) and evaluation (all classes) and are not part of checkpoints. Labels 1..C index the
current prompt list; 0 is background. The image tower trains (frozen_stages freezes the stem
and the first stages); the projection, background embedding and logit scale are learned.

Weights never come from the network. `checkpoint` is a local open_clip state dict such as
RemoteCLIP-RN50.pt (`.pt`/`.pth` loaded with weights_only=True, or `.safetensors`; possibly nested
under "state_dict"); `load_clip_checkpoint` logs a table of missing / unexpected / shape-mismatched
keys and refuses a file of which nothing matches. BatchNorm in the trunk is frozen (torchvision's
practice for small detection batches) when weights were loaded (`cfg.freeze_bn=None`), trained
otherwise: frozen at random init it would zero every residual branch (open_clip zero-inits bn3).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops, roi_align

from attrdist.core.config import DetectorConfig
from attrdist.core.detection_eval import COCO_MAX_DETS
from attrdist.errors import AttrdistError

log = logging.getLogger("attrdist")

TINY = "tiny"
# The CPU demo's CLIP: ModifiedResNet of width 16 with one bottleneck per stage (trunk channels 64,
# 128, 256, 512), a 2-layer text transformer of width 64 on CLIP's BPE vocabulary, 64-d embeddings.
TINY_CLIP = {"embed_dim": 64,
             "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 32, "image_size": 128},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
STEM = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")


# ----------------------------------------------------------------------------------------------
# CLIP towers
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What `load_clip_checkpoint` did: key lists and a printable table."""

    path: str
    loaded: list[str]
    missing: list[str]  # in the model, not in the file (they keep their random init)
    unexpected: list[str]  # in the file, not in the model
    mismatched: list[tuple[str, tuple, tuple]]  # (key, shape in file, shape in model)

    def table(self, limit: int = 8) -> str:
        rows = [f"{self.path}: {len(self.loaded)} tensors loaded"]
        groups = [("missing (random init)", [(k, "", "") for k in self.missing]),
                  ("unexpected (ignored)", [(k, "", "") for k in self.unexpected]),
                  ("shape mismatch (file vs model)", [(k, str(tuple(a)), str(tuple(b))) for k, a, b in self.mismatched])]
        for title, items in groups:
            if items:
                rows.append(f"  {title}: {len(items)}")
                rows += [f"    {k:<48} {a} {b}".rstrip() for k, a, b in items[:limit]]
                if len(items) > limit:
                    rows.append(f"    ... and {len(items) - limit} more")
        return "\n".join(rows)


def load_clip_checkpoint(clip: nn.Module, path: str | Path) -> LoadReport:
    """Load an open_clip/RemoteCLIP state dict into `clip` where names and shapes match; log a table
    of the rest; raise AttrdistError when nothing matches."""
    from attrdist.models.backbone import load_state_file

    state = {k.removeprefix("module."): v for k, v in load_state_file(path).items()}
    own = clip.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = LoadReport(str(path), sorted(usable), sorted(k for k in own if k not in state),
                        sorted(k for k in state if k not in own),
                        [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sorted(state.items())
                         if k in own and own[k].shape != v.shape])
    if not usable:
        raise AttrdistError(f"{path}: no tensor matches the open_clip image/text towers (not an open_clip "
                            f"checkpoint of this architecture?); set model.checkpoint to a matching file")
    clip.load_state_dict(usable, strict=False)
    partial = report.missing or report.unexpected or report.mismatched
    (log.warning if partial else log.info)("CLIP weights:\n%s", report.table())
    return report


def build_clip(arch: str, checkpoint: str = "") -> tuple[nn.Module, LoadReport | None]:
    """(open_clip CLIP model, load report or None): `arch` built offline ("tiny" or an open_clip ResNet
    CLIP such as RN50), weights from the local file `checkpoint` if given ('auto': the local HF cache)."""
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet

    if checkpoint == "auto":
        from attrdist.models.text import cached_open_clip_file

        checkpoint = "" if arch == TINY else (cached_open_clip_file(arch) or "")
        if not checkpoint:
            raise AttrdistError(f"model.pretrained=auto: no open_clip {arch} checkpoint in the local HF cache (HF_HOME; "
                                f"nothing is downloaded): pass model.pretrained=PATH (a local RemoteCLIP/open_clip file, "
                                f"e.g. RemoteCLIP-RN50.pt), or model.pretrained=none for a random CLIP")
    elif checkpoint == "none":
        checkpoint = ""
    if arch == TINY:
        c = TINY_CLIP
        clip = open_clip.model.CLIP(c["embed_dim"], open_clip.model.CLIPVisionCfg(**c["vision_cfg"]),
                                    open_clip.model.CLIPTextCfg(**c["text_cfg"]))
    else:
        try:
            clip = open_clip.create_model(arch, pretrained=None)
        except RuntimeError as e:
            raise AttrdistError(f"model.backbone={arch!r}: {e}") from None
    if not isinstance(clip.visual, ModifiedResNet):
        raise AttrdistError(f"model.backbone={arch!r}: its image tower is not a CLIP ResNet (use RN50, RN101, ... or tiny)")
    if not checkpoint:
        log.info("detector: CLIP %s with random weights (model.pretrained=none; a local RemoteCLIP/open_clip file: "
                 "model.pretrained=PATH)", arch)
        return clip, None
    return clip, load_clip_checkpoint(clip, checkpoint)


def clip_trunk_channels(visual: nn.Module) -> list[int]:
    """Output channels of layer1..layer4 of a ModifiedResNet."""
    return [layer[-1].conv3.out_channels for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)]


def freeze_trunk(body: nn.Module, frozen_stages: int) -> None:
    """requires_grad=False for the stem and layer1..frozen_stages (0: nothing)."""
    if not 0 <= frozen_stages <= 4:
        raise AttrdistError(f"model.frozen_stages={frozen_stages}: expected 0..4 (stem + layer1..k)")
    if frozen_stages == 0:
        return
    names = STEM + tuple(f"layer{i}" for i in range(1, frozen_stages + 1))
    for name in names:
        if hasattr(body, name):  # IntermediateLayerGetter keeps only the stages up to the last FPN input
            getattr(body, name).requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------


class TextEmbeddingPredictor(nn.Module):
    """RoI features [N, F] -> (class logits [N, C+1], box deltas [N, 4 (C+1)]), background = class 0."""

    def __init__(self, in_features: int, embed_dim: int, temperature: float):
        super().__init__()
        self.proj = nn.Linear(in_features, embed_dim)
        self.bbox_pred = nn.Linear(in_features, 4)
        self.background = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.register_buffer("class_embeddings", torch.zeros(0, embed_dim), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        region = F.normalize(self.proj(x).float(), dim=-1)
        weights = torch.cat([F.normalize(self.background.float(), dim=0)[None], self.class_embeddings.float()])
        logits = self.logit_scale.float().exp().clamp(max=100.0) * region @ weights.T
        return logits, self.bbox_pred(x).float().repeat(1, weights.shape[0])


class CropScorer(nn.Module):
    """The frozen CLIP image tower, attention pool included, classifying a square crop around each box
    against the class text embeddings: the CLIP half of ViLD's ensemble. Novel classes never had a
    training box, so the detector's own region classifier learnt them as background; the crop score
    is what CLIP itself sees there."""

    def __init__(self, visual: nn.Module, margin: float):
        super().__init__()
        self.visual = visual.requires_grad_(False).eval().to(memory_format=torch.channels_last)  # ~2x on CPU (measured)
        size = visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.margin = margin

    def crops(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], boxes: list[torch.Tensor]) -> torch.Tensor:
        """[sum K, 3, S, S]: per image (normalised, padded [B, 3, H, W]) and box (xyxy [K, 4]), the square
        of side margin x longest box side around its centre, shifted inside the image (as `clip_pretrain`
        cropped its training pairs), resampled to the CLIP's input size."""
        squares = []
        for b, (h, w) in zip(boxes, image_sizes):
            side = ((b[:, 2:] - b[:, :2]).amax(1) * self.margin).clamp(min=1.0, max=float(min(h, w)))
            centre = (b[:, :2] + b[:, 2:]) / 2
            lo = torch.minimum((centre - side[:, None] / 2).clamp(min=0), b.new_tensor([w, h]) - side[:, None])
            squares.append(torch.cat([lo, lo + side[:, None]], 1))
        return roi_align(images, squares, output_size=self.size, spatial_scale=1.0, sampling_ratio=0, aligned=True)

    @torch.no_grad()
    def forward(self, images, image_sizes, boxes: list[torch.Tensor], text: torch.Tensor, logit_scale: torch.Tensor,
                chunk: int = 32) -> torch.Tensor:
        """CLIP class probabilities [sum K, C] of the crops around `boxes` (softmax over the C classes at
        CLIP's own temperature; no background: that stays the detector's call)."""
        crops = self.crops(images, image_sizes, boxes).contiguous(memory_format=torch.channels_last)
        if len(crops) == 0:
            return crops.new_zeros(0, len(text))
        emb = torch.cat([F.normalize(self.visual(c).float(), dim=-1) for c in crops.split(chunk)])
        return (logit_scale.float().exp().clamp(max=100.0) * emb @ text.T).softmax(-1)

    def train(self, mode: bool = True) -> CropScorer:
        return super().train(False)  # frozen: BatchNorm keeps CLIP's statistics


def ensemble(det: torch.Tensor, clip: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ViLD's ensemble of the detector's probabilities `det` [N, C+1] (background first) and CLIP's crop
    probabilities `clip` [N, C]: class c scores det_c^(1-w_c) * clip_c^w_c, the background keeps the
    rest of the mass. Returns log-probabilities [N, C+1], so that torchvision's post-processing (a
    softmax, thresholds, per-class NMS) ranks the ensembled scores."""
    fg = det[:, 1:].clamp_min(1e-12) ** (1 - weight) * clip.clamp_min(1e-12) ** weight
    total = fg.sum(1, keepdim=True)
    probs = torch.cat([(1 - total).clamp_min(0), fg], 1) / total.clamp_min(1.0)
    return probs.clamp_min(1e-12).log()


class OpenVocabDetector(FasterRCNN):
    """Faster R-CNN over a CLIP image tower, classifying regions against frozen text embeddings.

    Construct with `build_detector(cfg, prompts)`; `OpenVocabDetector(clip, cfg, prompts)` takes an
    open_clip CLIP (from `build_clip`) and consumes it: its image trunk becomes `backbone.body`, the
    rest becomes the frozen `text` tower (the image tower's attention pool is dropped).
    """

    def __init__(self, clip: nn.Module, cfg: DetectorConfig, prompts: list[str], frozen_bn: bool = False,
                 frozen_stages: int = 0, clip_crops: bool = False):
        from open_clip.utils import freeze_batch_norm_2d

        from attrdist.models.preprocess import CLIP_MEAN, CLIP_STD  # what config.json records (data.mean/std)

        levels = len(cfg.fpn_layers) + 1
        if len(cfg.anchor_sizes) != levels:
            raise AttrdistError(f"model.anchor_sizes has {len(cfg.anchor_sizes)} sizes; the FPN over layers "
                                f"{list(cfg.fpn_layers)} has {levels} levels (one size per level, pool level last)")
        if not set(cfg.fpn_layers) <= {1, 2, 3, 4}:
            raise AttrdistError(f"model.fpn_layers={list(cfg.fpn_layers)}: stages are 1..4")
        visual, embed_dim = clip.visual, clip.text_projection.shape[1]
        clip.visual = None
        scorer = CropScorer(copy.deepcopy(visual), cfg.crop_margin) if clip_crops else None
        channels = clip_trunk_channels(visual)
        backbone = BackboneWithFPN(visual, {f"layer{i}": str(k) for k, i in enumerate(cfg.fpn_layers)},
                                   [channels[i - 1] for i in cfg.fpn_layers], cfg.fpn_channels)
        if frozen_bn:
            freeze_batch_norm_2d(backbone.body)
        freeze_trunk(backbone.body, frozen_stages)
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * levels)
        roi_pool = MultiScaleRoIAlign([str(k) for k in range(len(cfg.fpn_layers))], output_size=7, sampling_ratio=2)
        box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.box_head_dim)
        super().__init__(
            backbone, num_classes=None, min_size=cfg.min_size, max_size=cfg.max_size,
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
            rpn_anchor_generator=anchors, rpn_batch_size_per_image=cfg.rpn_batch_size,
            rpn_pre_nms_top_n_train=cfg.proposals_train, rpn_post_nms_top_n_train=cfg.proposals_train,
            rpn_pre_nms_top_n_test=cfg.proposals_test, rpn_post_nms_top_n_test=cfg.proposals_test,
            box_roi_pool=roi_pool, box_head=box_head,
            box_predictor=TextEmbeddingPredictor(cfg.box_head_dim, embed_dim, cfg.temperature),
            box_batch_size_per_image=cfg.roi_batch_size, box_score_thresh=cfg.score_thresh,
            box_detections_per_img=cfg.detections_per_img or COCO_MAX_DETS)  # None: the task fits it to the data
        self.text = clip.requires_grad_(False).eval()
        self.crop_scorer = scorer
        self.crop_topk = cfg.crop_topk
        self.crop_weights = (cfg.crop_weight_base, cfg.crop_weight_novel)
        self.register_buffer("crop_weight", torch.zeros(0), persistent=False)
        self.prompts: list[str] = []
        self.set_classes(prompts)

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    def train(self, mode: bool = True) -> OpenVocabDetector:
        super().train(mode)
        self.text.eval()  # frozen: no dropout, no statistics updates
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised frozen text embeddings [len(prompts), D] (float32, on the model's device)."""
        import open_clip

        if not prompts:
            raise AttrdistError("detector: the class prompt list is empty; give at least one class")
        device = self.roi_heads.box_predictor.class_embeddings.device
        tokens = open_clip.get_tokenizer("RN50")(prompts).to(device)  # CLIP's BPE vocab, shipped with open_clip
        return self.text.encode_text(tokens, normalize=True).float()

    def set_classes(self, prompts: list[str], novel: list[str] | tuple[str, ...] = ()) -> None:
        """Classify against these prompts from now on: labels 1..len(prompts), 0 = background. `novel`:
        those of them no training box had (their CLIP crop score weighs crop_weight_novel)."""
        embeddings = self.encode_prompts(list(prompts))
        self.roi_heads.box_predictor.class_embeddings = embeddings
        base, novel_w = self.crop_weights
        self.crop_weight = embeddings.new_tensor([novel_w if p in novel else base for p in prompts])
        self.prompts = list(prompts)

    def forward(self, images, targets=None):
        """torchvision's contract (train: losses; eval: detections). In eval mode with the crop scorer,
        the RPN's `crop_topk` best proposals are classified by the ensemble of the region classifier
        and the frozen CLIP's view of a crop around each (regressed) box."""
        if self.training or self.crop_scorer is None:
            return super().forward(images, targets)
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, _ = self.transform(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        proposals = [p[: self.crop_topk] for p in proposals]  # sorted by objectness (the RPN's NMS order)
        heads = self.roi_heads
        logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes)))
        boxes = heads.box_coder.decode(deltas[:, :4], proposals)[:, 0]  # class-agnostic regression
        boxes = [box_ops.clip_boxes_to_image(b, s) for b, s in zip(boxes.split([len(p) for p in proposals]), batch.image_sizes)]
        clip = self.crop_scorer(batch.tensors, batch.image_sizes, boxes, heads.box_predictor.class_embeddings,
                                self.text.logit_scale)
        logits = ensemble(logits.softmax(-1), clip, self.crop_weight)
        boxes, scores, labels = heads.postprocess_detections(logits, deltas, proposals, batch.image_sizes)
        detections = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: total, trainable, and by part (frozen text tower, image trunk + FPN, heads)."""
        def count(m: nn.Module, trainable: bool = False) -> int:
            return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)

        return {"total": count(self), "trainable": count(self, True), "text": count(self.text),
                "image": count(self.backbone), "heads": count(self.rpn) + count(self.roi_heads),
                "crops": count(self.crop_scorer) if self.crop_scorer is not None else 0}


def layout_of(state: dict) -> dict[str, bool]:
    """The choices a detector checkpoint's keys fix: frozen BatchNorm (FrozenBatchNorm2d keeps no
    batch counter) and the crop scorer."""
    return {"frozen_bn": not any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state),
            "clip_crops": any(k.startswith("crop_scorer.") for k in state)}


def build_detector(cfg: DetectorConfig, prompts: list[str], *, clip: str = "RN50", checkpoint: str = "",
                   frozen_stages: int = 0, state: dict | None = None) -> OpenVocabDetector:
    """The detector for `prompts` (labels 1..len(prompts)) over the CLIP `clip` (weights from the local
    file `checkpoint`; stem + layer1..frozen_stages frozen); logs its parameter counts. `state`: a
    checkpoint of this detector that the caller loads next (its keys fix the layout; no weights needed)."""
    arch = clip
    if state is not None:
        clip, _ = build_clip(arch, "")
        return OpenVocabDetector(clip, cfg, prompts, frozen_stages=frozen_stages, **layout_of(state))
    clip, report = build_clip(arch, checkpoint)
    frozen_bn = report is not None if cfg.freeze_bn is None else cfg.freeze_bn
    if frozen_bn and report is None:
        raise AttrdistError("model.detector.freeze_bn=true needs model.pretrained: BatchNorm frozen at random init "
                            "zeroes every residual branch; set model.pretrained or model.detector.freeze_bn=null")
    crops = report is not None if cfg.clip_crops is None else cfg.clip_crops
    if crops and report is None:
        log.warning("detector: model.detector.clip_crops=true with a random CLIP: its crop scores are noise "
                    "(set model.pretrained, or clip_crops=null)")
    model = OpenVocabDetector(clip, cfg, prompts, frozen_bn=frozen_bn, frozen_stages=frozen_stages, clip_crops=crops)
    model.weights_source = f"CLIP {report.path}" if report else "random CLIP (no model.pretrained)"
    counts = model.param_counts()
    log.info("detector: CLIP %s, %d classes, %.1fM parameters (%.1fM trainable; frozen text tower %.1fM, frozen "
             "crop-scoring image tower %.1fM), BatchNorm %s", arch, model.num_classes, counts["total"] / 1e6,
             counts["trainable"] / 1e6, counts["text"] / 1e6, counts["crops"] / 1e6, "frozen" if frozen_bn else "trained")
    return model
