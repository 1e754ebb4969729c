"""Run outputs written while training (rank 0): metrics JSONL, the experiment trackers through accelerate
(run.log_with: TensorBoard in run_dir/tensorboard, MLflow, W&B), curves PNG."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path

from attrdist import atomic
from attrdist.core.config import TRACKERS, flatten, tracker_names
from attrdist.errors import AttrdistError

log = logging.getLogger("attrdist")

# tracker -> (module that must import, pip package that provides it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny (or mlflow)"),
            "wandb": ("wandb", "wandb")}
IDS_FILE = "trackers.json"  # the tracker runs of this run directory: a resumed run continues them
assert set(PACKAGES) == set(TRACKERS)


def check_trackers(log_with: str) -> tuple[str, ...]:
    """run.log_with's tracker names, each one's package importable; one-line error otherwise."""
    names = tracker_names(log_with)
    for name in names:
        module, pip = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise AttrdistError(f"run.log_with={log_with}: tracker {name!r} needs the {module!r} package, which is not "
                                f"installed: pip install {pip} (or drop {name} from run.log_with)")
    return names


def accelerate_log_with(names: tuple[str, ...], run_dir: Path) -> list | None:
    """Accelerator(log_with=...): the names, TensorBoard as accelerate's own tracker writing to
    run_dir/tensorboard (as before trackers went through accelerate), not <project_dir>/<project name>."""
    if not names:
        return None
    from accelerate.tracking import TensorBoardTracker

    return [TensorBoardTracker("tensorboard", str(run_dir)) if n == "tensorboard" else n for n in names]


def run_params(cfg) -> dict:
    """The resolved config as tracker parameters: dotted keys, tuples as comma-joined text."""
    return {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, (v, _f) in flatten(cfg).items()}


class Tracker:
    """Appends every record to metrics.jsonl and logs its scalars to accelerate's trackers (run.log_with)."""

    def __init__(self, run_dir: Path, enabled: bool = True, acc=None, cfg=None, recipe: str = ""):
        self.run_dir, self.enabled, self.acc = run_dir, enabled, acc
        self._f = None
        self.names = tracker_names(cfg.run.log_with) if cfg is not None and enabled and acc is not None else ()
        if enabled:
            self._f = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if self.names:
            self._start(cfg, recipe)

    def _start(self, cfg, recipe: str) -> None:
        """init_trackers with the resolved config as parameters; a resumed run (run.resume=auto) continues the
        MLflow run and the W&B run recorded in trackers.json; TensorBoard appends to its directory."""
        acc, run_dir = self.acc, self.run_dir
        ids_file = run_dir / IDS_FILE
        saved = json.loads(ids_file.read_text()) if cfg.run.resume == "auto" and ids_file.is_file() else {}
        init_kwargs, continued = {}, set()
        if "mlflow" in self.names:
            run_id = saved.get("mlflow")
            if run_id and not os.environ.get("MLFLOW_RUN_ID"):
                if _mlflow_run_exists(run_id):
                    init_kwargs["mlflow"] = {"run_id": run_id}
                    continued.add("mlflow")
                else:
                    log.warning("MLflow run %s of %s is not in this tracking store (%s): a new MLflow run starts",
                                run_id, ids_file, _mlflow_uri())
            init_kwargs.setdefault("mlflow", {"run_name": run_dir.name})
        if "wandb" in self.names:
            kw = {"name": run_dir.name}
            if not os.environ.get("WANDB_DIR"):
                kw["dir"] = str(run_dir)  # wandb/ in the run directory, not in the working directory
            if saved.get("wandb"):  # online: the same run continues; offline: a new offline-run-* dir, same id
                kw.update(id=saved["wandb"], resume="allow")
                continued.add("wandb")
            init_kwargs["wandb"] = kw
        project = cfg.run.name
        try:
            acc.init_trackers(project, init_kwargs=init_kwargs)
            params = {"recipe": recipe, **run_params(cfg)}
            for t in acc.trackers:
                t.store_init_configuration(_mlflow_new_params(t, params) if t.name in continued and t.name == "mlflow"
                                           else params)
        except AttrdistError:
            raise
        except Exception as e:  # a tracker that cannot start cannot be honoured: stop, one line
            name = next((n for n in self.names if n in type(e).__module__ or n in str(type(e)).lower()), "a tracker")
            raise AttrdistError(f"run.log_with={cfg.run.log_with}: {name} failed to start: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        ids = {}
        for t in acc.trackers:
            if t.name == "mlflow":
                ids["mlflow"] = t.tracker.info.run_id
            elif t.name == "wandb":
                ids["wandb"] = t.tracker.id
        atomic.write_json(ids_file, ids)
        where = {"tensorboard": str(run_dir / "tensorboard"), "mlflow": f"{_mlflow_uri()} run {ids.get('mlflow')}",
                 "wandb": f"project {project} run {ids.get('wandb')} ({os.environ.get('WANDB_MODE') or 'online'})"}
        log.info("trackers (run.log_with): %s", "; ".join(
            f"{n}: {where[n]}{' (continued)' if n in continued else ''}" for n in self.names))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.names:
            step = record.get("step", 0)
            kind = record.get("type", "train")
            scalars = {}
            for k, v in record.items():
                if k in ("step", "type", "epoch", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    continue
                scalars[k if "/" in k else f"{kind}/{k}"] = v
            for t in self.acc.trackers:  # accelerate's trackers (Accelerator.log, with MLflow's names made legal)
                t.log(mlflow_names(scalars) if t.name == "mlflow" else scalars, step=step)

    def close(self) -> None:
        if self._f:
            self._f.close()


def mlflow_names(scalars: dict) -> dict:
    """MLflow accepts letters, digits and _ - . space : / in metric names: '@' becomes '_at_' (val/labels/
    macro_f1@0.5 -> val/labels/macro_f1_at_0.5), anything else '_'. The other trackers keep the names."""
    def legal(k: str) -> str:
        k = k.replace("@", "_at_")
        return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in k)

    return {legal(k): v for k, v in scalars.items()}


def _mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _mlflow_run_exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


def _mlflow_new_params(tracker, params: dict) -> dict:
    """A continued MLflow run: its parameters cannot change, so only the keys it has not recorded yet; the
    ones this launch changed are said (the run keeps its first values; config.json has this launch's)."""
    have = tracker.tracker.data.params if tracker.tracker.data else {}
    changed = sorted(k for k, v in params.items() if k in have and have[k] != str(v))
    if changed:
        log.info("MLflow run continued: parameters keep their first values (MLflow cannot change them); this launch "
                 "differs in %s", ", ".join(f"{k}={params[k]}" for k in changed))
    return {k: v for k, v in params.items() if k not in have}


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a torn last line after a kill: ignore it
            pass
    return out


def plot_curves(run_dir: Path, headline: list[str]) -> Path:
    """curves.png: training loss, learning rate, and the eval metrics (with baselines, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_records(run_dir / "metrics.jsonl")
    train = [r for r in recs if r.get("type") == "train"]
    evals = [r for r in recs if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train], lw=0.6, alpha=0.4, label="loss (step)")
        k = max(1, len(train) // 50)
        smooth = [sum(r["loss"] for r in train[max(0, i - k):i + 1]) / len(train[max(0, i - k):i + 1]) for i in range(len(train))]
        axes[0].plot(steps, smooth, lw=1.5, label=f"loss (mean of {k + 1})")
        for r_key in sorted({k for r in evals for k in r if k.endswith("/loss")}):
            pts = [(r["step"], r[r_key]) for r in evals if r_key in r]
            axes[0].plot(*zip(*pts), "o-", label=r_key)
        axes[1].plot(steps, [r["lr"] for r in train])
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].set(title="learning rate", xlabel="step")
    for key in headline:
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            line, = axes[2].plot(*zip(*pts), "o-", label=key)
            base = [(r["step"], r[f"{key}:prior"]) for r in evals if f"{key}:prior" in r]
            if base:
                axes[2].plot(*zip(*base), "--", color=line.get_color(), alpha=0.6, label=f"{key} (prior baseline)")
    axes[2].set(title="evaluation", xlabel="step", ylim=(0, 1.02))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "curves.png"
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out


def plot_confusion(path: Path, cm: list[list[int]], names: list[str], title: str) -> Path:
    """A confusion matrix PNG (rows: true class, columns: predicted), each row normalised to recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(cm, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    n = len(names)
    side = min(24, max(5, 0.35 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(names, rotation=90, fontsize=7 if n > 30 else 9)
    ax.set_yticklabels(names, fontsize=7 if n > 30 else 9)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
