"""Each recipe's demo dataset: generated in real formats and packed by the real packer, once, into the
cache (`attrdist.cache.cache_dir`), under a file lock so concurrent ranks and runs build it once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from filelock import FileLock

from attrdist.cache import cache_dir
from attrdist.core.config import Config


def _lock() -> FileLock:
    cache_dir().mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir() / "demo.lock"))


def characters_demo_shards(spec=None) -> Path:
    """The characters demo: an image folder (with offline-augmented copies) packed by the image-folder packer."""
    from attrdist.demo.characters import CharactersSpec, ensure_characters
    from attrdist.pack.imagefolder import pack_imagefolder

    spec = spec or CharactersSpec()
    with _lock():
        root = ensure_characters(None, spec)
        out = root.with_name(root.name + "-shards")
        if not (out / "manifest.json").is_file():
            # group by source (`A0012_aug1.png` -> `A0012`): augmented copies never straddle splits
            pack_imagefolder(root, out, val=0.2, test=0.1, seed=spec.seed, group_by="prefix", group_sep="_",
                             group_parts=1, dataset="characters-demo", progress=True)
    return out


def demo_shards(vocab_path: Path, spec=None) -> Path:
    """The demo dataset, generated (COCO formats) and packed (COCO packer) once into the cache."""
    from attrdist.demo import scenes as demo
    from attrdist.pack.coco import SplitSource, pack_coco_captions
    from attrdist.pack.vocab import load_vocabulary

    spec = spec or demo.DemoSpec()
    with _lock():
        root = demo.ensure_demo(None, spec)
        out = root / f"shards-{vocab_path.stem}"
        if not (out / "manifest.json").is_file():
            ann = root / "annotations"
            splits = [SplitSource(s, root / "images", ann / f"captions_{s}.json", ann / f"instances_{s}.json")
                      for s in ("train", "val", "test")]
            pack_coco_captions(out, splits, load_vocabulary(vocab_path), dataset="coconut-demo",
                               vocab_path=vocab_path, max_samples=1000, progress=True)
    return out


def cocottributes_demo_shards(spec=None) -> Path:
    """Object crops of the demo scenes with simulated COCO Attributes votes, packed by the real
    COCO Attributes packer from a real-format pickle (attrdist.demo.cocottributes)."""
    from attrdist.demo import scenes as demo
    from attrdist.pack.cocottributes import pack_cocottributes
    from attrdist.demo.cocottributes import write_pickle

    spec = spec or demo.DemoSpec()
    with _lock():
        root = demo.ensure_demo(None, spec)
        out = root / "shards-cocottributes"
        if not (out / "manifest.json").is_file():
            pkl = write_pickle(root, root / "annotations" / "cocottributes_demo.pkl", seed=spec.seed)
            ann = root / "annotations"
            pack_cocottributes(out, pkl, [ann / "instances_train.json", ann / "instances_val.json"], [root / "images"],
                               dataset="cocottributes-demo", min_size=12, max_samples=2000, progress=True)
    return out


def aerial_demo_data() -> Path:
    """Procedural aerial scenes in DIOR's layout, packed by the real DIOR packer (attrdist.demo.aerial)."""
    from attrdist.demo.aerial import aerial_demo_shards

    return aerial_demo_shards()


def demo_clip(cfg: Config) -> Config:
    """model.pretrained=demo-clip: the tiny CLIP pretrained (once, cached) on the demo shards' box crops
    and their class captions, standing in for RemoteCLIP's weights offline (attrdist.demo.clip_pretrain)."""
    if cfg.model.pretrained != "demo-clip":
        return cfg
    from attrdist.demo.clip_pretrain import demo_clip_checkpoint

    path = demo_clip_checkpoint(Path(cfg.data.shards))
    return replace(cfg, model=replace(cfg.model, pretrained=str(path)))
