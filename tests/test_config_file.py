"""Config files on a recipe's command line (`--config FILE`): a run's config.json reproduces the run in a new
run directory, bitwise; partial files (nested or dotted, JSON or YAML) sit between the profile and the
key=value overrides; unknown keys and other recipes' files stop with one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, assert_one_line_error, run_env, run_recipe

TIMING = r"per_s|time|elapsed|wait|_s$|_sec"  # keys of the fields that measure time


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the fields that measure time (they differ between any two runs)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if not re.search(TIMING, k)})
    return out


def test_a_runs_config_json_reproduces_it_bitwise_in_a_new_run_dir(small_shards, tmp_path):
    first = tmp_path / "first"
    run_recipe(["--profile", "demo", f"data.shards={small_shards}", f"run.run_dir={first}", *FAST, "run.epochs=1"])
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    # no --profile, no data.shards: everything comes from the file (its data.shards picks the full profile,
    # whose defaults the complete file overrides); a new run directory under run.out_dir
    p = run_recipe(["--config", str(first / "config.json"), f"run.out_dir={tmp_path / 'again'}"])
    (second,) = (tmp_path / "again").iterdir()
    assert second.name.startswith("coconut-demo-") and str(second) in p.stdout
    a, b = records(first), records(second)
    assert [r["type"] for r in a] == [r["type"] for r in b] and {"train", "eval"} <= {r["type"] for r in a}
    assert "loss" in a[0] and "lr" in a[0] and any("val/labels/mAP" in r for r in a)  # what is compared
    assert a == b  # losses, lr, eval metrics: the same floats
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == before  # the old run untouched
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (first, second))
    for c in (ca, cb):
        c["run"].pop("run_dir"), c["run"].pop("out_dir")
    assert ca == cb


@pytest.mark.slow  # 19 s: two more training launches; make test-slow
def test_resume_with_a_runs_config_json_continues_that_run(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_recipe(["--profile", "demo", f"data.shards={small_shards}", f"run.run_dir={run_dir}", *FAST, "run.epochs=1"])
    # without --resume a run dir that holds a run is never reused; with it the file's own run continues
    p = run_recipe(["--config", str(run_dir / "config.json"), "--resume", "run.epochs=2"])
    assert f"run dir: {run_dir}" in p.stdout and "resumed from" in p.stdout
    assert [r["step"] for r in records(run_dir) if r["type"] == "train"] == list(range(1, 13))


def print_config(*args: str, recipe: str = "coconut") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *args, "--print-config"], cwd=ROOT,
                          env=run_env(), capture_output=True, text=True, timeout=120)


def test_partial_files_nested_or_dotted_between_profile_and_overrides(tmp_path):
    y = tmp_path / "part.yaml"
    y.write_text("optim:\n  lr: 3e-4\ndata.augment.crop_scale: [0.6, 1.0]\nrun:\n  seed: 5\n  run_dir: /old/run\n")
    p = print_config("--config", str(y), "run.seed=7")
    assert p.returncode == 0, p.stderr
    cfg = json.loads(p.stdout)
    assert cfg["optim"]["lr"] == 3e-4 and cfg["data"]["augment"]["crop_scale"] == [0.6, 1.0]
    assert cfg["run"]["seed"] == 7  # the command line wins over the file
    assert cfg["run"]["run_dir"] == ""  # where the file's run was is not taken over
    assert cfg["run"]["name"] == "coconut-demo" and cfg["data"]["image_size"] == 64  # the rest: demo profile
    j = tmp_path / "part.json"
    j.write_text(json.dumps({"optim.lr": 3e-4, "data": {"augment": {"crop_scale": [0.6, 1.0]}}}))
    assert json.loads(print_config("--config", str(j)).stdout)["optim"] == cfg["optim"]


@pytest.mark.parametrize("content, needles", [
    ({"optim": {"lrr": 1}}, ["unknown config key 'optim.lrr'", "did you mean optim.lr"]),
    ({"data.batch_size": 8, "data": {"batch_size": 8}}, ["'data.batch_size' is given twice"]),
    ({"data": {"batch_size": "many"}}, ["data.batch_size='many': expected an integer"]),
    ({"recipe": "characters", "run": {"seed": 1}}, ["written by recipe 'characters', not 'coconut'"]),
    ({"model": {"new_knob_of_a_later_version": 1}}, ["unknown config key 'model.new_knob_of_a_later_version'"]),
])
def test_a_bad_config_file_stops_with_one_line_naming_file_and_key(tmp_path, content, needles):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(content))
    assert_one_line_error(print_config("--config", str(f)), str(f), *needles)


def test_config_file_that_is_missing_or_not_yaml_is_one_line(tmp_path):
    assert_one_line_error(print_config("--config", str(tmp_path / "nope.yaml")), "no such file")
    (tmp_path / "x.yaml").write_text("optim: [1\n")
    assert_one_line_error(print_config("--config", str(tmp_path / "x.yaml")), "not valid YAML")
