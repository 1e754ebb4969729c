"""Demo data, written in the real formats and packed by the real packers (`packs`).

  scenes       procedural COCO-format scenes with true attributes and captions
  cocottributes   simulated COCO Attributes votes on the scenes' objects (a real-format pickle)
  characters   A-Z rendered from the machine's fonts, offline-augmented copies
  aerial       procedural aerial scenes in DIOR's layout
  clip_pretrain   the tiny CLIP pretrained on the aerial demo (stands in for RemoteCLIP offline)
"""
