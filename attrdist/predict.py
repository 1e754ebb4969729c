"""Inference from a checkpoint: top attributes with probabilities for each image.

    attrdist predict runs/coconut-demo-20261123-101500 image1.jpg image2.jpg --top 5
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from attrdist import checkpoint
from attrdist.config import Config, from_dict
from attrdist.errors import AttrdistError
from attrdist.models import build_model
from attrdist.tasks import make_task
from attrdist.transforms import decode_image, eval_transform


def load_for_inference(path: str | Path, device: str = "cpu"):
    ckpt = checkpoint.resolve(path, "best")
    meta = checkpoint.verify(ckpt)
    cfg: Config = from_dict(Config, meta["config"])
    # every weight comes from the checkpoint: no pretrained file, no text tower needed
    model_cfg = replace(cfg.model, pretrained="", attr_init="learned")
    model = build_model(model_cfg, len(meta["attributes"]))
    model.load_state_dict(checkpoint.load_model_state(ckpt))
    model.eval().to(device)
    return model, cfg, meta["attributes"], ckpt


@torch.no_grad()
def predict_images(model, cfg: Config, attributes: list[str], images: list[str], top: int = 5,
                   device: str = "cpu") -> list[list[tuple[str, float]]]:
    out = []
    for path in images:
        p = Path(path)
        if not p.is_file():
            raise AttrdistError(f"{p}: image not found")
        try:
            img = decode_image(p.read_bytes(), int(cfg.data.image_size * cfg.data.eval_resize))
        except Exception as e:
            raise AttrdistError(f"{p}: cannot decode image ({type(e).__name__})") from None
        x = eval_transform(img, cfg.data.image_size, cfg.data.eval_resize).unsqueeze(0).to(device)
        probs = make_task(cfg.data.task).probs(model(x)["logits"])[0]
        k = min(top, len(attributes))
        vals, idx = probs.topk(k)
        out.append([(attributes[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())])
    return out
