"""What the recipes' profiles assume about pretrained weights, and what a run does about it: a full profile
(fine-tuning learning rates) stops in one line when model.pretrained=auto finds no weights, instead of training
from scratch; model.pretrained=none trains from scratch on purpose; the demo profiles never look in the local
caches. And data.num_workers above the cores a process can use is clamped, said once, without torch's warning.
Every run here sees empty weight caches in tmp_path: nothing depends on this machine's."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from attrdist.train.runtime import available_cores
from tests.conftest import ROOT, assert_one_line_error, run_env

RECIPES = ["characters", "coconut", "coco_attributes", "cocottributes", "dior_remoteclip"]


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def empty_cache_env(tmp_path) -> dict:
    env = run_env(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"),
                  XDG_CACHE_HOME=str(tmp_path / "xdg"), ATTRDIST_CACHE=str(tmp_path / "attrdist"))
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


@pytest.mark.parametrize("name", RECIPES)
def test_demo_profiles_train_from_scratch_on_purpose_and_full_ones_need_weights(name):
    demo, full = recipe(name).demo(), recipe(name).full()
    assert demo.model.pretrained == ("demo-clip" if name == "dior_remoteclip" else "none")
    if demo.model.attr_init == "text":
        assert demo.model.text_pretrained == "none"
    assert full.model.pretrained == "auto" and full.optim.lr <= 1e-4  # fine-tuning rates: weights required


def test_characters_never_flips_letters():
    for cfg in (recipe("characters").full(), recipe("characters").demo()):
        assert cfg.data.augment.hflip == 0 and cfg.data.augment.vflip == 0


SMALL = ["model.backbone=resnet18", "model.feature_level=3", "model.frozen_stages=0", "data.image_size=64",
         "model.dim=64", "model.contrastive_dim=32", "data.batch_size=16", "run.epochs=1", "run.precision=fp32",
         "run.threads=1", "run.log_every=1"]


def coconut(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "coconut.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_full_profile_without_cached_weights_stops_in_one_line(small_shards, tmp_path):
    p = coconut([f"data.shards={small_shards}", f"run.run_dir={tmp_path / 'run'}", *SMALL, "data.num_workers=0"],
                empty_cache_env(tmp_path))
    assert_one_line_error(p, "model.pretrained=auto: no pretrained weights for resnet18",
                          "model.pretrained=none to train from scratch")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or '"train"' not in metrics.read_text()  # stopped before any training step


def test_none_trains_from_scratch_and_workers_are_clamped_once_without_torch_warnings(small_shards, tmp_path):
    asked = available_cores() + 2
    p = coconut([f"data.shards={small_shards}", f"run.run_dir={tmp_path / 'run'}", *SMALL, "model.pretrained=none",
                 f"data.num_workers={asked}", "run.max_steps=2"], empty_cache_env(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "model.pretrained=none: resnet18 trains from scratch" in p.stdout
    clamp = [ln for ln in p.stdout.splitlines() if f"data.num_workers={asked}:" in ln]
    assert len(clamp) == 1 and f"{available_cores()} worker processes per loader" in clamp[0], clamp
    assert "worker processes in total" not in p.stderr and "UserWarning" not in p.stderr, p.stderr[-3000:]
    assert (tmp_path / "run" / "report.md").is_file()
