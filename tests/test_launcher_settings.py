"""accelerate's own settings (`accelerate launch` flags, `accelerate config`'s file, ACCELERATE_* variables)
are honoured or refused with one line, never silently replaced: real `accelerate launch` subprocesses."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import FAST, assert_one_line_error, run_env, run_recipe

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
          "--dynamo_backend", "no"]


def args(shards, run_dir, *extra) -> list[str]:
    return ["--profile", "demo", f"data.shards={shards}", f"run.run_dir={run_dir}", *FAST, "run.log_with=none", *extra]


def error_line(p) -> str:
    """The attrdist error line of a launched process (accelerate launch adds its own traceback after it)."""
    assert p.returncode != 0, p.stdout[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.startswith("attrdist: error: ")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def test_the_launchers_mixed_precision_is_followed_by_auto_and_conflicts_stop(small_shards, tmp_path):
    env = run_env(HF_HOME=str(tmp_path / "hf"))  # no accelerate config file but the ones written here
    run_dir = tmp_path / "bf16"
    p = run_recipe(args(small_shards, run_dir, "run.precision=auto", "run.max_steps=1", "run.epochs=1"), env=env,
                   launcher=[*LAUNCH, "--mixed_precision", "bf16"])
    log = (run_dir / "train.log").read_text()
    assert "launcher: precision from the launcher: accelerate launch --mixed_precision bf16 -> run.precision=bf16" in log
    assert "mixed_precision=bf16" in next(x for x in log.splitlines() if "runtime: " in x)

    p = run_recipe(args(small_shards, tmp_path / "x", "run.precision=fp32"), env=env, check=False,
                   launcher=[*LAUNCH, "--mixed_precision", "bf16"])
    line = error_line(p)
    assert "run.precision=fp32 conflicts with accelerate launch --mixed_precision bf16" in line
    assert "pass run.precision=bf16" in line and "run.precision=auto follows the launcher" in line

    # `accelerate config`'s file counts as explicit, 'no' included
    conf = tmp_path / "acc.yaml"
    conf.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: 'no'\n"
                    "num_machines: 1\nnum_processes: 1\nuse_cpu: true\n")
    p = run_recipe(args(small_shards, tmp_path / "y", "run.precision=bf16"), env=env, check=False,
                   launcher=[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(conf)])
    line = error_line(p)
    assert f"run.precision=bf16 conflicts with mixed_precision: no in {conf} (accelerate config)" in line
    assert "pass run.precision=fp32" in line


def test_the_launchers_default_leaves_run_precision_in_charge(small_shards, tmp_path):
    """No --mixed_precision and no config file: accelerate launch still sets ACCELERATE_MIXED_PRECISION=no;
    that default is not the user's choice, so run.precision decides (and the log says why)."""
    run_dir = tmp_path / "r"
    run_recipe(args(small_shards, run_dir, "run.precision=bf16", "run.max_steps=1", "run.epochs=1"), launcher=LAUNCH,
               env=run_env(HF_HOME=str(tmp_path / "hf")))
    log = (run_dir / "train.log").read_text()
    assert "ACCELERATE_MIXED_PRECISION=no is accelerate launch's default" in log and "run.precision=bf16 decides" in log
    assert "mixed_precision=bf16" in next(x for x in log.splitlines() if "runtime: " in x)


@pytest.mark.slow  # 25 s: five refused launches; make test-slow
def test_settings_attrdist_cannot_follow_stop_the_run_with_one_line(small_shards, tmp_path):
    p = run_recipe(args(small_shards, tmp_path / "a", "run.device=cuda"), check=False,
                   launcher=[*LAUNCH, "--cpu"], env=run_env(HF_HOME=str(tmp_path / "hf")))
    assert "run.device=cuda conflicts with ACCELERATE_USE_CPU (accelerate launch --cpu)" in error_line(p)
    p = run_recipe(args(small_shards, tmp_path / "b"), check=False,
                   env=run_env(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4"))
    assert_one_line_error(p, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4", "optim.grad_accum=1", "pass optim.grad_accum=4")
    p = run_recipe(args(small_shards, tmp_path / "c"), check=False, env=run_env(ACCELERATE_MIXED_PRECISION="fp8"))
    assert_one_line_error(p, "ACCELERATE_MIXED_PRECISION=fp8", "fp32, bf16 or fp16 only")
    p = run_recipe(args(small_shards, tmp_path / "d"), check=False, env=run_env(ACCELERATE_USE_FSDP="true"))
    assert_one_line_error(p, "ACCELERATE_USE_FSDP", "run.deepspeed=zero3")
