"""The contributor guide (README: "Contributing"), executable: how to add a dataset format, a task and a recipe.

- A new source format is one `PackFormat` subclass (in attrdist/pack/<format>.py, with its CLI in
  shards/<format>.py): it lists the images and turns one image into samples; `attrdist.pack.pipeline.pack`
  does the rest (verify, leak check, write, commit). `test_add_a_dataset_format` defines a toy format here,
  with the public interface only, packs it, and reads it back as training does.
- A new task is one module defining `Task` (attrdist/tasks/<kind>.py, or any importable module named by
  `data.task`); `test_add_a_task` writes a toy one (attribute-count regression) and trains it end to end.
- A new recipe is one file calling `attrdist.recipe.main`; `test_add_a_recipe` writes a toy one and runs it
  the way a user does.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from attrdist.data.reader import ShardReader, load_manifest
from attrdist.errors import AttrdistError
from attrdist.pack.pipeline import ImageItem, PackFormat, Tally, pack


class CsvFormat(PackFormat):
    """A toy format: <root>/<split>.csv, one `image path,label` per line (paths relative to root)."""

    def __init__(self, root: Path, classes: list[str]):
        self.root = root
        self.dataset, self.attributes, self.splits = "csv-toy", classes, ["train", "val"]
        self.tally = Tally(self.splits)  # what is not packed, counted by reason per split

    def images(self) -> list[ImageItem]:
        out = []
        for split in self.splits:
            with open(self.root / f"{split}.csv", newline="") as f:
                for path, label in csv.reader(f):
                    out.append(ImageItem(split, key=Path(path).stem, path=str(self.root / path),
                                         info=self.attributes.index(label)))
        return out

    def samples(self, image, meta, task, result):
        data, ext, (w, h), crc = result  # the default pass 2 (load_image_item): the bytes, copied through
        sample = {"id": image.key, "labels": [image.info], "width": w, "height": h}
        yield image.key, {ext: data, "json": sample}, {ext: crc}


def _jpeg(colour: tuple[int, int, int], size: int) -> bytes:
    """A real photo-like JPEG (noise, so no two are near-duplicates for the leak check)."""
    import numpy as np

    rng = np.random.default_rng(sum(colour) + size)
    pixels = np.clip(rng.normal(colour, 60, (size, size + 8, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_add_a_dataset_format(tmp_path):
    root = tmp_path / "toy"
    (root / "img").mkdir(parents=True)
    rows = {"train": [("img/a1.jpg", "cat"), ("img/a2.jpg", "dog"), ("img/a3.jpg", "cat"), ("img/gone.jpg", "dog")],
            "val": [("img/b1.jpg", "dog"), ("img/b2.jpg", "cat")]}
    written = {}
    for i, (split, lines) in enumerate(rows.items()):
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(lines)
        for j, (path, _) in enumerate(lines):
            if "gone" not in path:  # listed, but the file is missing: counted, not fatal
                written[Path(path).stem] = _jpeg((40 * j, 200 - 50 * i, 90 + 30 * j), 48 + 8 * j)
                (root / path).write_bytes(written[Path(path).stem])

    out = tmp_path / "shards"
    with pytest.raises(AttrdistError, match=r"split 'train': 1 of 4 samples \(25.0%\) dropped .*gone.jpg.*--max-dropped"):
        pack(CsvFormat(root, ["cat", "dog"]), out, max_samples=2, workers=2, progress=False)  # 25 % > 5 %
    assert not out.exists()
    manifest = pack(CsvFormat(root, ["cat", "dog"]), out, max_samples=2, workers=2, progress=False, max_dropped=0.25)

    assert manifest["report"]["train"] == {"packed": 3, "dropped": {"missing_image": 1}}
    (drop,) = [json.loads(line) for line in (out / "drops.jsonl").read_text().splitlines()]
    assert drop == {"split": "train", "what": "sample", "reason": "missing_image", "file": str(root / "img/gone.jpg"),
                    "key": "gone", "detail": f"{root / 'img/gone.jpg'}: no such file"}
    assert manifest["report"]["val"] == {"packed": 2, "dropped": {}}
    assert manifest["report"]["leakage"]["exact"] == manifest["report"]["leakage"]["near"] == 0
    m = load_manifest(out)
    assert m.attributes == ["cat", "dog"] and m.label_fields == ["labels"]
    assert m.split("train")["label_counts"] == {"labels": [2, 1]} and m.split("val")["nsamples"] == 2
    for split, lines in rows.items():
        reader = ShardReader(m, split)
        got = [reader[i] for i in range(len(reader))]
        expected = [(Path(p).stem, label) for p, label in lines if "gone" not in p]
        assert [s["__key__"] for s in got] == [k for k, _ in expected]  # listed order, split by split
        for s, (key, label) in zip(got, expected):
            meta = json.loads(s["json"])
            assert meta["id"] == key and meta["labels"] == [m.attributes.index(label)]
            assert s["jpg"] == written[key]  # the file's bytes, copied through
            assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(s["jpg"])).size


# ---------------------------------------------------------------------------------------------- a recipe

TOY_RECIPE = """
import sys
from pathlib import Path

sys.path.insert(0, {root!r})  # run from a checkout without installing, as the recipes in recipes/ do

from attrdist.core.config import AugmentConfig, Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from attrdist.recipe import main


def full() -> Config:
    return Config(data=DataConfig(image_size=32, batch_size=16, num_workers=0, task={task!r}, labels="labels",
                                  eval_labels=("labels",), augment=AugmentConfig(hflip=0.5)),
                  model=ModelConfig(backbone="resnet18", feature_level=3, pretrained="", dim=64, contrastive_dim=32),
                  optim=OptimConfig(name="adamw", lr=1e-3),
                  run=RunConfig(name="toy", epochs=2, eval_every=1, patience=0, monitor={monitor!r},
                                precision="fp32", threads=1, log_every=1))


def demo() -> Config:
    return full()


if __name__ == "__main__":
    main("toy", full, demo, demo_data=lambda: Path({shards!r}))
"""


def _run_toy(tmp_path: Path, shards: Path, task: str, monitor: str, extra_path: Path | None = None):
    import subprocess
    import sys

    from conftest import ROOT, run_env

    script = tmp_path / "toy_recipe.py"
    script.write_text(TOY_RECIPE.format(root=str(ROOT), task=task, monitor=monitor, shards=str(shards)))
    env = run_env(**({"PYTHONPATH": str(extra_path)} if extra_path else {}))
    p = subprocess.run([sys.executable, str(script), f"run.out_dir={tmp_path / 'runs'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    run = next((tmp_path / "runs").glob("toy-*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return p, run, records


def test_add_a_recipe(small_shards, tmp_path):
    """One file: configs as data (full and demo profiles) and `main`. It runs, resolves overrides, reports."""
    p, run, records = _run_toy(tmp_path, small_shards, "multilabel", "val/labels/mAP")
    rep = json.loads((run / "report.json").read_text())
    assert rep["recipe"] == "toy" and rep["task"] == "multilabel" and rep["config"]["data"]["image_size"] == 32
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [1, 2]
    assert 0.0 <= rep["results"]["val"]["val/labels/mAP"] <= 1.0 and "prior baseline" in rep["headline"]
    assert (run / "report.md").read_text().startswith("# toy: report")


TOY_TASK = '''"""A toy task: how many attributes an image has (a regression on the attribute logits), beside
the trivial predictor that always says the training split's mean count."""

import numpy as np
import torch

from attrdist.data.samples import SampleDataset, batch_images, collate
from attrdist.tasks.base import EvalBatch, fmt
from attrdist.tasks.base import Task as BaseTask


class Task(BaseTask):
    kind = "toy_count"
    headline = "mae"

    def __init__(self, cfg, manifest=None):
        super().__init__(cfg, manifest)
        if manifest is not None:
            self.mean = float(manifest.label_prior(cfg.data.train_split, cfg.data.labels).sum())

    def dataset(self, reader, *, train, pixels_in_workers, image_dtype):
        return SampleDataset(reader, len(self.manifest.attributes), [self.cfg.data.labels], self.cfg.data,
                             self.cfg.run.seed, train=train, pixels_in_workers=pixels_in_workers,
                             image_dtype=image_dtype)

    def collate(self, samples):
        return collate(samples)

    def _count(self, model, batch, env):
        x = batch_images(batch, env.device, env.memory_format, self.cfg.data)
        with env.autocast():
            return torch.sigmoid(model(x)["logits"].float()).sum(1)

    def forward_loss(self, model, batch, env):
        y = batch[f"labels/{self.cfg.data.labels}"].to(env.device).float().sum(1)
        valid = batch["valid"].to(env.device).float()
        loss = ((self._count(model, batch, env) - y) ** 2 * valid).sum() / valid.sum().clamp_min(1)
        return loss, {"mse": loss.detach()}

    def eval_batch(self, model, batch, env):
        return EvalBatch(per_sample={"pred": self._count(model, batch, env),
                                     "count": batch[f"labels/{self.cfg.data.labels}"].to(env.device).float().sum(1),
                                     "index": batch["index"].to(env.device), "valid": batch["valid"].to(env.device)})

    def inference_input(self, ds, n, batch, env):
        return batch_images(collate([ds[(i, 0)] for i in range(batch)]), env.device, env.memory_format, self.cfg.data)

    def evaluate(self, split, outputs, *, tune=False):
        p = outputs.per_sample
        mae, base = float(np.abs(p["pred"] - p["count"]).mean()), float(np.abs(self.mean - p["count"]).mean())
        rec = {f"{split}/images_per_s": outputs.n / max(outputs.seconds, 1e-9), f"{split}/corrupt": outputs.corrupt,
               f"{split}/mae": mae, f"{split}/mae:mean": base}
        return rec, {"mae": mae, "mean_baseline": base, "n": int(len(p["count"]))}

    def higher_is_better(self, metric):
        return False  # an error

    def headline_keys(self, split):
        return [f"{split}/mae"]

    def headline_text(self, results):
        d = results["val"]["_details"]
        return f"val attribute-count MAE = {fmt(d['mae'])} (mean-count baseline {fmt(d['mean_baseline'])})"

    def report_header(self, n_train, model=None):
        return [f"- data: `{self.manifest.root}` ({n_train} training images)  "]

    def report_sections(self, results, run_dir, recipe):
        return ["## Headline", "", f"**{self.headline_text(results)}**", ""] + [
            f"- {split}: MAE {fmt(r['_details']['mae'])} over {r['_details']['n']} images" for split, r in results.items()]
'''


def test_add_a_task(small_shards, tmp_path):
    """One module defining `Task`, named by data.task: the trainer, its evaluation pass, checkpoints, early-stopping
    direction and report come from attrdist; the task supplies its samples, loss, metrics and report section."""
    tasks = tmp_path / "mytasks"
    tasks.mkdir()
    (tasks / "toy_count.py").write_text(TOY_TASK)
    p, run, records = _run_toy(tmp_path, small_shards, "toy_count", "val/mae", extra_path=tasks)
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert train and all("mse" in r for r in train) and [r["epoch"] for r in evals] == [1, 2]
    assert all(r["val/mae"] >= 0 and "val/mae:mean" in r for r in evals)
    rep = json.loads((run / "report.json").read_text())
    assert rep["task"] == "toy_count" and rep["headline"].startswith("val attribute-count MAE = ")
    assert "test" in rep["results"] and rep["results"]["test"]["details"]["n"] > 0  # the test split too
    best = json.loads((run / "checkpoints" / "best.json").read_text())["dir"]
    meta = json.loads((run / "checkpoints" / best / "meta.json").read_text())
    best_mae = min(r["val/mae"] for r in evals)  # lower is better: the best checkpoint is the lowest MAE
    assert meta["metric"] == best_mae, (meta["metric"], evals)
    assert "**val attribute-count MAE" in (run / "report.md").read_text()


def test_an_unknown_task_is_one_line(small_shards, tmp_path):
    from conftest import FAST, run_recipe

    p = run_recipe([f"data.shards={small_shards}", "data.task=no_such_task", f"run.out_dir={tmp_path}", *FAST],
                   check=False)
    assert p.returncode == 2 and "data.task='no_such_task': unknown task; have detection, multiclass, multilabel" in p.stderr
