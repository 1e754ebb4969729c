"""Text embeddings of names through an open_clip text tower (offline: never downloads).

    emb, source = encode_names(["red", "striped", "wooden"], "RN50", "none")        # random tower
    emb, source = encode_names(names, "RN50", "/models/RemoteCLIP-RN50.pt")           # local weights
    emb, source = encode_names(names, "RN50-quickgelu", "auto")   # OpenAI weights from the HF cache, else stop

`emb` is [len(names), embed_dim], L2-normalised, computed once under no_grad with the prompt
"a photo of something {name}." (underscores read as spaces). Without a checkpoint the tower has
random weights: the embeddings are then distinct but carry no meaning, and `source` says so.
OpenAI's CLIP weights need the `-quickgelu` variant of the architecture name (e.g. RN50-quickgelu).
"""

from __future__ import annotations

import logging

import torch

from attrdist.errors import AttrdistError

log = logging.getLogger("attrdist")
PROMPT = "a photo of something {}."


def cached_open_clip_file(arch: str) -> str | None:
    """An open_clip checkpoint for `arch` already in the local Hugging Face cache, or None. Never downloads.
    Only checkpoints trained with `arch`'s text activation count: open_clip lists OpenAI's QuickGELU weights
    under RN50 too, and loaded into RN50 (GELU) they give other text embeddings than they were trained to."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    quick = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    for tag in open_clip.list_pretrained_tags_by_model(arch):
        pcfg = open_clip.get_pretrained_cfg(arch, tag)
        if bool(pcfg.get("quick_gelu", False)) != quick:
            continue
        repo = (pcfg.get("hf_hub") or "").strip("/")
        for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, fname) if repo else None
            if isinstance(hit, str):
                return hit
    return None


def encode_names(names: list[str], arch: str, checkpoint: str = "") -> tuple[torch.Tensor, str]:
    import open_clip

    from attrdist.models.backbone import load_state_file

    try:
        model = open_clip.create_model(arch, pretrained=None)
    except RuntimeError as e:
        raise AttrdistError(f"model.text_encoder={arch!r}: {e}") from None
    if checkpoint == "auto":
        checkpoint = cached_open_clip_file(arch) or ""
        if not checkpoint:
            raise AttrdistError(f"model.text_pretrained=auto: no open_clip {arch} checkpoint in the local HF cache "
                                f"(HF_HOME; nothing is downloaded; OpenAI's weights need model.text_encoder="
                                f"RN50-quickgelu): pass model.text_pretrained=PATH, or model.text_pretrained=none for a "
                                f"random text tower, or model.attr_init=learned")
    elif checkpoint == "none":
        checkpoint = ""
    if checkpoint:
        state = load_state_file(checkpoint)
        result = model.load_state_dict(state, strict=False)
        text_missing = [k for k in result.missing_keys if not k.startswith("visual.")]
        if text_missing:
            raise AttrdistError(f"{checkpoint}: not an open_clip {arch} checkpoint (text tower keys missing, e.g. "
                                f"{text_missing[0]}); set model.text_pretrained to a matching file")
        source = f"text tower {arch} from {checkpoint}"
    else:
        log.info("model.text_pretrained=none: the %s text tower has random weights, which give distinct but "
                 "meaningless initial attribute embeddings", arch)
        source = f"text tower {arch}, random weights (model.text_pretrained=none)"
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    with torch.no_grad():
        tokens = tokenizer([PROMPT.format(n.replace("_", " ")) for n in names])
        emb = model.encode_text(tokens, normalize=True).float()
    return emb, source
