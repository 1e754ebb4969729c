"""What multilabel and multiclass tasks share: image samples with label vectors (one multi-hot vector per
label field and sample), a model giving `logits`, metrics beside trivial predictors, the report's tables.
`multilabel.Task` and `multiclass.Task` add their loss, output probabilities and metrics."""

from __future__ import annotations

import numpy as np
import torch

from attrdist.data.samples import SampleDataset, batch_images, collate
from attrdist.errors import AttrdistError
from attrdist.tasks.base import EvalBatch, EvalOutputs, StepEnv
from attrdist.tasks.base import fmt as _fmt
from attrdist.tasks.base import Task as BaseTask


class Classification(BaseTask):
    baselines: tuple[str, ...] = ()
    pixel_stage = True
    scalars: list[tuple[str, str]] = []  # (details key, label in report.md)

    def __init__(self, cfg, manifest=None):
        super().__init__(cfg, manifest)
        d = cfg.data
        self.fields = [d.labels, *[f for f in d.eval_labels if f != d.labels]]
        self.thresholds: dict[str, np.ndarray] = {}
        if manifest is None:
            return
        for f in self.fields:
            if f not in manifest.label_fields:
                raise AttrdistError(f"{manifest.root}/manifest.json: no label field {f!r} "
                                    f"(have {manifest.label_fields}); set data.labels / data.eval_labels")
        self.names = list(manifest.attributes)
        self.prior = {f: manifest.label_prior(d.train_split, f) for f in self.fields}

    # ------------------------------------------------------------------ what a subclass gives
    def loss(self, out: dict, y, m, valid, optim, mean_counts=None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, p, y, m, *, prior, names, thresholds=None, tune=False) -> tuple[dict, np.ndarray | None]:
        """(details, new thresholds or None) of one label field."""
        raise NotImplementedError

    # ------------------------------------------------------------------ data and model
    def dataset(self, reader, *, train: bool, pixels_in_workers: bool, image_dtype: torch.dtype):
        return SampleDataset(reader, len(self.manifest.attributes), self.fields, self.cfg.data, self.cfg.run.seed,
                             train=train, pixels_in_workers=pixels_in_workers, image_dtype=image_dtype)

    def collate(self, samples: list[dict]) -> dict:
        return collate(samples)

    def forward_loss(self, model, batch: dict, env: StepEnv) -> tuple[torch.Tensor, dict]:
        f, dev = self.cfg.data.labels, env.device
        x = batch_images(batch, dev, env.memory_format, self.cfg.data)
        with env.autocast():
            out = model(x)
        # non_blocking: a blocking host-to-CUDA copy waits for the whole stream (c10::cuda::memcpy_and_sync), i.e.
        # for the previous step, every step (run.host_sync=lagged); the loader pins the batch on CUDA
        y, m, v = (batch[k].to(dev, non_blocking=True) for k in (f"labels/{f}", f"mask/{f}", "valid"))
        return self.loss(out, y, m, v, self.cfg.optim, mean_counts=env.mean_counts)

    def eval_batch(self, model, batch: dict, env: StepEnv) -> EvalBatch:
        """Probabilities, labels and masks per sample; the loss on data.labels times the valid samples."""
        dev, f0 = env.device, self.cfg.data.labels
        x = batch_images(batch, dev, env.memory_format, self.cfg.data)
        with env.autocast():
            out = model(x)
        valid = batch["valid"].to(dev)
        sums = torch.zeros(2, device=dev)  # (sum of batch loss x valid samples, valid samples)
        if valid.any():
            loss, _ = self.loss(out, batch[f"labels/{f0}"].to(dev), batch[f"mask/{f0}"].to(dev), valid, self.cfg.optim)
            sums += torch.stack([loss.float() * valid.sum(), valid.sum().float()])
        per = {"scores": self.probs(out["logits"]), "index": batch["index"].to(dev), "valid": valid}
        for f in self.fields:
            per[f"labels/{f}"] = batch[f"labels/{f}"].to(dev)
            per[f"mask/{f}"] = batch[f"mask/{f}"].to(dev)
        return EvalBatch(per_sample=per, sums=sums)

    def inference_input(self, ds, n: int, batch: int, env: StepEnv):
        return batch_images(collate([ds[(i, 0)] for i in range(batch)]), env.device, env.memory_format, self.cfg.data)

    # ------------------------------------------------------------------ metrics
    def nonfinite_outputs(self, outputs: EvalOutputs) -> tuple[int, int]:
        s = outputs.per_sample["scores"]
        bad = ~np.isfinite(s.reshape(len(s), -1)).all(axis=1)
        return int(bad.sum()), len(bad)

    def evaluate(self, split: str, outputs: EvalOutputs, *, tune: bool = False) -> tuple[dict, dict]:
        p = outputs.per_sample
        rec: dict = {f"{split}/images_per_s": outputs.n / max(outputs.seconds, 1e-9), f"{split}/corrupt": outputs.corrupt}
        details = {}
        for f in self.fields:
            res, new = self.metrics(p["scores"], p[f"labels/{f}"], p[f"mask/{f}"], prior=self.prior[f],
                                    names=self.names, thresholds=self.thresholds.get(f), tune=tune)
            if new is not None:
                self.thresholds[f] = new
            for k, _ in self.scalars:
                if k in res:
                    rec[f"{split}/{f}/{k}"] = res[k]
                    for b in self.baselines:
                        if k in res["baselines"][b]:
                            rec[f"{split}/{f}/{k}:{b}"] = res["baselines"][b][k]
            details[f] = res
        sums = outputs.sums
        rec[f"{split}/loss"] = float(sums[0] / sums[1].clamp_min(1.0))
        return rec, details

    def headline_keys(self, split: str) -> list[str]:
        return [f"{split}/{f}/{self.headline}" for f in self.cfg.data.eval_labels]

    def log_keys(self) -> tuple[str, ...]:
        """The metrics of an evaluation's log line (besides the loss)."""
        return (self.headline, "micro_f1@0.5", "macro_f1")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.thresholds.items()}

    def load_state_dict(self, state: dict) -> None:
        self.thresholds = {k: v.numpy() for k, v in state.items()}

    # ------------------------------------------------------------------ report
    def headline_text(self, results: dict) -> str:
        first = self.cfg.data.eval_labels[0]
        val, h = results["val"]["_details"][first], self.headline
        base = ", ".join(f"{b} baseline {_fmt(val['baselines'][b][h])}" for b in self.baselines)
        return f"val {h} vs {first} = {_fmt(val[h])} ({base})"

    def report_header(self, n_train: int, model=None) -> list[str]:
        m = self.manifest
        return [f"- data: `{m.root}` (dataset `{m.data['dataset']}`, {len(m.attributes)} attributes, "
                f"trained on label field `{self.cfg.data.labels}`, {n_train} training samples)  "]

    def report_sections(self, results: dict, run_dir, recipe: str) -> list[str]:
        fields, h = list(self.cfg.data.eval_labels), self.headline
        first = fields[0]
        val = results["val"]["_details"][first]
        L = ["## Headline", "",
             f"**Validation {h} against `{first}`: {_fmt(val[h])}**: "
             + ", ".join(f"{b.replace('_', '-')} baseline {_fmt(val['baselines'][b][h])}" for b in self.baselines)
             + (f" ({val['n_attr_with_pos']} attributes with positives, {val['n_attr_without_pos']} without)."
                if "n_attr_with_pos" in val else "."), ""]
        for split, res in results.items():
            for f in fields:
                d = res["_details"][f]
                note = " (thresholds tuned on this split: optimistic)" if split == "val" else " (thresholds tuned on val)"
                L += [f"## {split} vs `{f}` ({d['n_samples']} images)", "",
                      "| metric | model | " + " | ".join(f"{b.replace('_', '-')} baseline" for b in self.baselines) + " |",
                      "| --- | ---: |" + " ---: |" * len(self.baselines)]
                for k, label in self.scalars:
                    if k in d:
                        L.append(f"| {label + (note if 'tuned' in k else '')} | {_fmt(d[k])} | "
                                 + " | ".join(_fmt(d["baselines"][b].get(k)) for b in self.baselines) + " |")
                L.append("")
        return L + self.report_details(results, run_dir, recipe)

    def report_details(self, results: dict, run_dir, recipe: str) -> list[str]:
        """Per-attribute / per-class tables of the last evaluated split."""
        return []

    def report_json(self, results: dict) -> dict:
        return {"thresholds": {k: v.tolist() for k, v in self.thresholds.items()}}

