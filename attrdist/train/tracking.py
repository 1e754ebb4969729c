"""Run outputs written while training: metrics JSONL, TensorBoard events, curves PNG (rank 0)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from attrdist import atomic


class Tracker:
    """Appends every record to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        self._f = None
        self._tb = None
        if enabled:
            self._f = open(run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            kind = record.get("type", "train")
            for k, v in record.items():
                if k in ("step", "type", "epoch", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    continue
                self._tb.add_scalar(k if "/" in k else f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


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
