"""The SLURM launcher's parts that need no cluster: option resolution, dry runs, SLURM's environment
turned into torch.distributed's, the stop reason, and a signal stopping a real training run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from attrdist.train import interrupt
from attrdist.train.slurm_job import distributed_env, master_port, parse_duration, stop_reason
from tests.conftest import FAST, ROOT, run_env
from tests.test_slurm import assert_same_weights, train_steps, wait_for


def launch(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env or run_env(SLURM_CONF="/nonexistent"))


def test_dry_run_prints_the_resolved_submission_from_profile_and_flags(tmp_path):
    p = launch("slurm", "recipes/coconut.py", "--profile", "example", "--nodes", "2", "--time", "2-00:00:00",
               "--qos", "high", "--dry-run", f"data.shards={tmp_path}", f"run.out_dir={tmp_path}",
               "--sweep", "optim.lr=1e-4,3e-4", "--sweep", "run.seed=0,1")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "would submit 4 jobs as one job array (--array=0-3%4)" in out
    assert "(2 nodes x 8 tasks = 16 ranks, 8 GPUs per node), time 2-00:00:00, at most 5 requeues" in out
    for line in ("#SBATCH --account=my-project", "#SBATCH --qos=high", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=2", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --signal=USR2@120", "#SBATCH --open-mode=append", "module load cuda/12.4",
                 "export ATTRDIST_SIGNAL_DELAY_S=120", "--kill-on-bad-exit=1"):
        assert line in out, line
    runs = [ln.split("run.run_dir=")[1] for ln in out.splitlines() if "task argv:" in ln]
    assert len(runs) == 4 and len(set(runs)) == 4 and all(r.startswith(str(tmp_path)) for r in runs)
    assert any(r.endswith("optim.lr=3e-4_run.seed=1") for r in runs)
    assert "submitted job" not in out


@pytest.mark.parametrize("argv, message", [
    (["--time", "soon"], "--time 'soon': use HH:MM:SS"),
    (["--profile", "no-such-cluster"], "no-such-cluster: no such profile"),
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "attrdist runs one rank per GPU"),
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean optim.lr?"),
])
def test_bad_submissions_are_refused_in_one_line(argv, message):
    p = launch("slurm", "recipes/coconut.py", "--dry-run", *argv)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_profile_with_an_unknown_key_names_the_file(tmp_path):
    prof = tmp_path / "cluster.yaml"
    prof.write_text("partition: gpu\ngpu_per_node: 8\n")
    p = launch("slurm", "recipes/coconut.py", "--dry-run", "--profile", str(prof))
    assert p.returncode == 2 and f"{prof}: unknown option(s) gpu_per_node" in p.stderr


def test_sweep_values_in_brackets_are_one_value_each():
    from launch.slurm import sweep_grid

    assert sweep_grid(["data.augment.crop_scale=[0.5,1.0],[0.7,1.0]"]) == [
        ["data.augment.crop_scale=[0.5,1.0]"], ["data.augment.crop_scale=[0.7,1.0]"]]
    assert sweep_grid(["optim.lr=1e-4,3e-4", "model.head_dims=[256,128],[],[64]"]) == [
        [f"optim.lr={lr}", f"model.head_dims={h}"] for lr in ("1e-4", "3e-4") for h in ("[256,128]", "[]", "[64]")]
    assert sweep_grid([]) == [[]]


@pytest.mark.parametrize("sweep, message", [
    ("data.augment.crop_scale=[0.5,1.0],[0.7,1.0", "a '[' without its ']'"),
    ("data.augment.crop_scale=[0.5,1.0]],[0.7,1.0]", "a ']' without its '['"),
    ("data.augment.crop_scale=[[0.5,1.0]]", "nested brackets"),
    ("data.augment.crop_scale=[0.5,1.0]x", "mixes a bracketed list with other text"),
    ("optim.lr=1e-4,,3e-4", "an empty value"),
    ("optim.lr", "use key=v1,v2"),
])
def test_a_malformed_sweep_is_one_line(sweep, message, capsys):
    from launch.slurm import sweep_grid

    with pytest.raises(SystemExit):
        sweep_grid([sweep])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("launch: error: --sweep") and message in err[0], err


def test_dry_run_sweeps_bracketed_lists_and_passes_the_config_file_absolute(tmp_path):
    cfg = tmp_path / "part.yaml"
    cfg.write_text("optim:\n  lr: 3e-4\n")
    p = subprocess.run([sys.executable, "-m", "launch", "slurm", str(ROOT / "recipes/coconut.py"), "--dry-run", "--config",
                        os.path.relpath(cfg, tmp_path), f"run.out_dir={tmp_path}",
                        "--sweep", "data.augment.crop_scale=[0.5,1.0],[0.7,1.0]"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=run_env(SLURM_CONF="/nonexistent", PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    argvs = [ln.split("task argv: ")[1] for ln in p.stdout.splitlines() if "task argv:" in ln]
    assert len(argvs) == 2
    for argv, scale in zip(argvs, ("[0.5,1.0]", "[0.7,1.0]")):
        run_dir = argv.split("run.run_dir=")[1]
        assert f"data.augment.crop_scale={scale}" in argv  # and each job's copy of the file, by absolute path
        assert f"--config {run_dir}/submitted-part.yaml" in argv and run_dir.startswith(str(tmp_path))
    assert not list(tmp_path.glob("coconut-demo-*"))  # a dry run copies nothing
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 1\n")
    q = launch("slurm", "recipes/coconut.py", "--dry-run", "--config", str(bad))
    assert q.returncode == 2 and q.stderr.strip() == (f"launch: error: {bad}: unknown config key 'optim.lrr'; did you "
                                                      f"mean optim.lr?"), q.stderr


def test_local_launch_passes_the_config_file_absolute(tmp_path):
    (tmp_path / "c.json").write_text("{}")
    p = subprocess.run([sys.executable, "-m", "launch", "local", str(ROOT / "recipes/coconut.py"), "--dry-run",
                        "--config", "c.json", "run.seed=1"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=run_env(PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    assert f"coconut.py --config {tmp_path / 'c.json'} run.seed=1" in p.stdout


def test_task_outside_a_slurm_job_says_so():
    env = {k: v for k, v in run_env().items() if not k.startswith("SLURM_")}
    p = launch("task", "recipes/coconut.py", "run.run_dir=/tmp/x", env=env)
    assert p.returncode == 2 and "not inside a SLURM job (no SLURM_JOB_ID)" in p.stderr


def test_distributed_env_from_slurm_variables(monkeypatch):
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
             "SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_JOB_NODELIST": "gpu[007-008]",
             "SLURM_RESTART_COUNT": "2", "SLURM_CPUS_PER_TASK": "6"}
    for k in list(os.environ):
        if k.startswith("SLURM_") or k == "OMP_NUM_THREADS":
            monkeypatch.delenv(k)
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    e = distributed_env()
    assert (e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["NODE_RANK"]) == ("11", "16", "3", "8", "1")
    assert e["MASTER_ADDR"] == "gpu007" and e["MASTER_PORT"] == str(master_port("4242", 2))
    assert e["ATTRDIST_EXPECT_WORLD_SIZE"] == "16" and e["OMP_NUM_THREADS"] == "6"
    assert e["ATTRDIST_LAUNCHER"].startswith("slurm(job 4242, 2 nodes x 8 tasks, node 1, master gpu007:")
    monkeypatch.setenv("SLURM_NTASKS", "15")
    with pytest.raises(Exception, match="15 tasks on 2 nodes is uneven"):
        distributed_env()


# the batch script's stderr of a 2-node job whose rank 1 was killed (SIGKILL) in its second attempt (from the
# two-node test cluster; tests/test_multinode.py makes it happen)
KILLED_LOG = """attrdist.train.slurm_job: slurm(job 7, 2 nodes x 1 task, node 0, master attrdist-n1:20119, restart 0): coconut.py
srun: error: attrdist-n1: task 0: Exited with exit code 1
attrdist.train.slurm_job: slurm(job 7, 2 nodes x 1 task, node 0, master attrdist-n1:21128, restart 1): coconut.py
[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:545] Read error [10.213.17.3]:33419: Connection reset by peer.
srun: error: attrdist-n2: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=7.0
srun: error: attrdist-n1: task 0: Exited with exit code 1
srun: Force Terminated StepId=7.0
"""


def test_status_names_the_first_task_to_fail_and_its_node(tmp_path):
    from launch.slurm import srun_failures

    log = tmp_path / "job.err"
    log.write_text(KILLED_LOG)
    got = srun_failures({"job_id": "7", "logs": [str(log)]})
    assert got == ["task 0 on attrdist-n1: Exited with exit code 1 (srun: the first task to fail)",
                   "task 1 on attrdist-n2: Killed (srun: the first task to fail)"], got
    log.write_text(KILLED_LOG.split("attrdist.train.slurm_job: slurm(job 7, 2 nodes x 1 task, node 0, master "
                                    "attrdist-n1:21128")[0] + "srun: error: attrdist-n[1-2]: tasks 0-1: Exited with exit code 2\n")
    assert srun_failures({"job_id": "7", "logs": [str(log)]})[-1].startswith("task 0 on attrdist-n1: Exited with exit "
                                                                           "code 1 (")
    log.write_text(KILLED_LOG.replace("srun: error: attrdist-n2: task 1: Killed\n", "")
                   + "srun: error: Node failure on attrdist-n2\n")  # reported after the task it made fail
    assert srun_failures({"job_id": "7", "logs": [str(log)]})[-1] == ("node attrdist-n2 failed (srun: Node failure on "
                                                                    "attrdist-n2)")
    log.write_text("attrdist: job 8 restart 0 on vm: 2 tasks, run dir runs/x\n"
                   "srun: error: vm: tasks 0-1: Exited with exit code 2\n")
    assert srun_failures({"job_id": "8", "logs": [str(log)]})[-1].startswith("tasks 0-1 on vm: Exited with exit code 2")
    log.write_text("attrdist: job 8 restart 0 on vm: 2 tasks, run dir runs/x\n")
    assert srun_failures({"job_id": "8", "logs": [str(log)]}) == [None]
    log.write_text("a warning before attrdist's first line\n" + KILLED_LOG)  # belongs to the first attempt
    assert len(srun_failures({"job_id": "7", "logs": [str(log)]})) == 2


def test_master_port_is_shared_by_an_attempt_and_moves_between_attempts():
    assert master_port("123", 0) == master_port("123", 0)
    assert len({master_port("123", r) for r in range(4)}) == 4
    assert all(20000 <= master_port(str(j), r) < 40000 for j in (1, 99999, 1234567) for r in range(3))


def test_stop_reason_from_the_time_left():
    assert parse_duration("1-02:03:04") == 93784 and parse_duration("05:30") == 330 and parse_duration("7") == 420
    assert parse_duration("UNLIMITED") is None and parse_duration("INVALID") is None
    assert stop_reason(signal.SIGUSR2, 50, 90).startswith("time limit (SIGUSR2 with 50 s left)")
    assert stop_reason(signal.SIGUSR2, 3000, 90).startswith("preemption (SIGUSR2, 3000 s before")
    assert stop_reason(signal.SIGTERM, None, 90).startswith("preemption (SIGTERM, no time limit")


def test_a_signal_before_training_is_kept_for_the_first_step():
    old = interrupt.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert interrupt.requested() == signal.SIGUSR2
    finally:
        interrupt.restore(old)
        interrupt.clear()


def test_a_signal_after_the_task_is_over_cannot_kill_it_or_change_its_outcome():
    """CPython resets Python-level handlers to SIG_DFL during shutdown; a time-limit USR2 landing then
    killed a finished job (SLURM: FAILED, exit 12). Once `finish` has run, USR2 is ignored."""
    code = ("import os, signal; from attrdist.train import interrupt; {}; os.kill(os.getpid(), signal.SIGUSR2); "
            "print('alive', interrupt.requested())")
    before = subprocess.run([sys.executable, "-c", code.format("interrupt.restore(interrupt.install())")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert before.returncode == -signal.SIGUSR2  # what restoring the default handler alone does
    after = subprocess.run([sys.executable, "-c", code.format("interrupt.finish(interrupt.install())")],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (after.returncode, after.stdout.strip()) == (0, "alive 0"), after.stderr


def _stop_cfg(shards) -> list[str]:
    return ["--profile", "demo", f"data.shards={shards}", *FAST, "data.batch_size=8", "run.epochs=6", "run.eval_every=3"]


@pytest.fixture(scope="module")
def uninterrupted(small_shards, tmp_path_factory):
    ref = tmp_path_factory.mktemp("uninterrupted") / "ref"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "coconut.py"), *_stop_cfg(small_shards), f"run.run_dir={ref}"],
                   cwd=ROOT, env=run_env(), check=True, capture_output=True, timeout=300)
    return ref


@pytest.mark.reliability
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGUSR2, id="USR2"),
                                 pytest.param(signal.SIGTERM, id="TERM", marks=pytest.mark.slow)])
def test_a_stop_signal_checkpoints_exits_128_plus_sig_and_resume_matches_uninterrupted(sig, uninterrupted,
                                                                                       small_shards, tmp_path):
    """Outside SLURM too: USR2 or TERM -> checkpoint at the end of the step -> exit 128+sig; --resume
    finishes with exactly the weights of a run that was never stopped."""
    cfg = _stop_cfg(small_shards)
    script = str(ROOT / "recipes" / "coconut.py")
    ref, rd = uninterrupted, tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, script, *cfg, f"run.run_dir={rd}"], cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(train_steps(rd)) >= 5 or proc.poll() is not None, 120, "5 steps")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-3000:]
    stopped = max(train_steps(rd))
    assert stopped < 72 and f"stopped by signal {int(sig)} after step {stopped} (checkpoint saved); resume with " \
                            f"--resume (run.run_dir={rd})" in out, out[-3000:]
    last = json.loads((rd / "checkpoints" / "last.json").read_text())["dir"]
    assert last.endswith(f"{stopped:08d}")
    subprocess.run([sys.executable, script, *cfg, f"run.run_dir={rd}", "--resume"], cwd=ROOT, env=run_env(),
                   check=True, capture_output=True, timeout=300)
    assert max(train_steps(rd)) == 72
    assert_same_weights(rd, ref)
