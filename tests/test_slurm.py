"""SLURM for real: a single-node cluster (munge, MariaDB + slurmdbd, slurmctld, slurmd) started once per
test run by slurm/testcluster.sh, jobs submitted with `python -m launch slurm` (submitit) and with
`sbatch slurm/train.sbatch`, preempted by a job in a higher-priority partition, stopped by a real time
limit, and crashed by bad input.

The training is the coconut demo recipe on the small test shards (96 training images), with
BatchNorm statistics frozen and dropout off, so a run's weights are a pure function of its steps:
a preempted-and-resumed run must end with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, assert_tensors_equal, run_env
from tests.conftest import train_steps as _train_steps
from tests.test_distributed import last_weights

pytestmark = pytest.mark.slurm

# 12 optimizer steps per epoch (96 images, global batch 8), ~0.1 s each with 2 ranks on this machine
CFG = [*FAST, "data.batch_size=8", "model.dropout=0", "model.freeze_bn_stats=true", "schedule.name=constant",
       "schedule.warmup_epochs=0.25", "run.eval_every=5", "run.curves_every=100"]
EPOCHS = 15


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running test cluster; SLURM_CONF points at it for the session. Stopped (by pid) at the end."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (it starts munged, slurmd and slurmctld as root)")
    d = tmp_path_factory.mktemp("slurm-cluster")
    p = subprocess.run(["bash", str(ROOT / "slurm" / "testcluster.sh"), "start", str(d)], capture_output=True,
                       text=True, timeout=900)
    if p.returncode:
        subprocess.run(["bash", str(ROOT / "slurm" / "testcluster.sh"), "stop", str(d)], capture_output=True)
        raise AssertionError(f"slurm/testcluster.sh start failed ({p.returncode}):\n{p.stderr[-4000:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = p.stdout.strip().splitlines()[-1]
    yield d
    subprocess.run(["bash", str(ROOT / "slurm" / "testcluster.sh"), "stop", str(d)], capture_output=True, timeout=120)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def work(slurm_cluster, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-work")


def env(work: Path) -> dict:
    return run_env(ATTRDIST_CACHE=str(work / "cache"))


def launch(work: Path, *argv: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "launch", *argv], cwd=ROOT, env=env(work), capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"launch {' '.join(argv[:2])}: exit {p.returncode}\nSTDOUT:\n{p.stdout[-5000:]}\n"
                             f"STDERR:\n{p.stderr[-5000:]}")
    return p


def submit(work: Path, shards: Path, *opts: str, extra=(), wait=True, timeout=300) -> subprocess.CompletedProcess:
    return launch(work, "slurm", str(ROOT / "recipes" / "coconut.py"), "--logs", str(work / "logs"), *opts,
                  *(["--wait"] if wait else []), "--profile", "demo", f"data.shards={shards}",
                  f"run.out_dir={work / 'runs'}", *CFG, *extra, timeout=timeout, check=False)


def job_id(out: str) -> str:
    m = re.search(r"submitted job (\S+):", out)
    assert m, out
    return m.group(1)


def run_dir(out: str) -> Path:
    m = re.search(r"run dir: (\S+)", out)
    assert m, out
    return Path(m.group(1))


def sacct(jid: str) -> list[tuple[str, str]]:
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", jid, "-o", "JobID,State"], capture_output=True,
                         text=True, timeout=30).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line.strip()]


def train_steps(d: Path) -> list[int]:
    return _train_steps(d / "metrics.jsonl")


def wait_for(cond, timeout: float, what: str, poll: float = 0.2):
    t = time.time()
    while time.time() - t < timeout:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def assert_same_weights(a: Path, b: Path) -> None:
    assert_tensors_equal(last_weights(a), last_weights(b))


@pytest.fixture(scope="module")
def two_ranks(work, small_shards):
    """The demo recipe through `launch slurm` with 2 tasks on CPU, uninterrupted (also the reference run)."""
    p = submit(work, small_shards, "--tasks-per-node", "2", "--partition", "debug", "--time", "00:10:00",
               extra=[f"run.epochs={EPOCHS}"])
    return p


def test_demo_through_launch_slurm_trains_as_two_ranks_and_reports(two_ranks, work):
    p = two_ranks
    assert p.returncode == 0, p.stdout + p.stderr
    jid, rd = job_id(p.stdout), run_dir(p.stdout)
    assert f"job {jid} (coconut.py, 2 ranks): COMPLETED" in p.stdout
    assert re.search(r"result: +val mAP vs true_labels = 0\.\d+", p.stdout), p.stdout
    report = json.loads((rd / "report.json").read_text())
    assert "world_size=2 rank=0" in report["runtime"] and "backend=gloo" in report["runtime"]
    assert f"launcher=slurm(job {jid}, 1 node x 2 tasks, node 0, master " in report["runtime"]
    assert max(train_steps(rd)) == 12 * EPOCHS
    # looked after without knowing submitit's layout
    st = launch(work, "status", jid)
    assert f"job {jid}" in st.stdout and "COMPLETED" in st.stdout and str(rd / "report.md") in st.stdout
    tl = launch(work, "tail", jid, "-n", "2000")
    assert "world_size=2 rank=0" in tl.stdout + tl.stderr
    tl1 = launch(work, "tail", jid, "-n", "2000", "--task", "1")
    assert "rank=1" in tl1.stdout + tl1.stderr


def test_preempted_by_a_high_priority_job_checkpoints_requeues_and_resumes_exactly(two_ranks, work, small_shards):
    assert two_ranks.returncode == 0
    reference = run_dir(two_ranks.stdout)
    # 2 tasks x 2 CPUs take the whole node (4 CPUs): a 4-CPU job in `high` can only run by preempting it
    p = submit(work, small_shards, "--tasks-per-node", "2", "--cpus-per-task", "2", "--partition", "low",
               "--time", "00:10:00", wait=False, extra=[f"run.epochs={EPOCHS}"])
    assert p.returncode == 0, p.stdout + p.stderr
    jid, rd = job_id(p.stdout), run_dir(p.stdout)
    wait_for(lambda: len(train_steps(rd)) >= 3, 120, "the low-priority job to train 3 steps")
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", "4", "-o", str(work / "high-%j.out"),
                           "--wrap", "sleep 1"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    st = launch(work, "status", jid, "--wait", timeout=300, check=False)
    assert st.returncode == 0, st.stdout + st.stderr
    restarts = [json.loads(x) for x in (rd / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1 and restarts[0]["reason"].startswith("preemption (SIGUSR2"), restarts
    stopped = restarts[0]["step"]
    assert 3 <= stopped < 12 * EPOCHS
    assert "restart:  1 preemption" in st.stdout
    states = [s for _, s in sacct(jid)]
    assert states[-1] == "COMPLETED" and len(states) >= 2, states  # a requeued attempt, then the finished one
    assert [s for _, s in sacct(high)] == ["COMPLETED"]
    steps = train_steps(rd)
    assert max(steps) == 12 * EPOCHS and sorted(set(steps)) == list(range(1, 12 * EPOCHS + 1))
    log = (rd / "train.log").read_text()
    assert f"job {jid} restart 1 (of at most 3): preemption" in log, log[-3000:]
    assert re.search(rf"resumed from \S*/step-0*{stopped}: ", log), log[-3000:]
    assert_same_weights(rd, reference)


@pytest.mark.slow  # waits out SLURM's 1-minute time limit, 127 s: `make test-slow`; the preemption test covers the
def test_time_limit_requeues_through_the_timeout_path_and_finishes(work, small_shards):  # signal -> requeue path
    """A 1-minute job whose training needs longer: SLURM's own USR2 (55 s before the limit, so at its first
    time-limit check, which SLURM runs every 30 s) stops it and it requeues. The test then raises the job's
    limit to 10 minutes, as an admin would, so that the next attempt finishes for certain instead of racing
    that 30-second cycle again (an attempt that finished before the check got no signal at all)."""
    epochs = 150  # 1,800 steps: ~75 s of training on one CPU rank (24 steps/s), well past the latest signal (~35 s)
    p = submit(work, small_shards, "--partition", "debug", "--time", "00:01:00", "--signal-delay-s", "55",
               "--max-requeues", "3", wait=False, extra=[f"run.epochs={epochs}", "run.eval_every=50"])
    assert p.returncode == 0, p.stdout + p.stderr
    jid, rd = job_id(p.stdout), run_dir(p.stdout)
    wait_for(lambda: (rd / "restarts.jsonl").is_file(), 150, "SLURM's time-limit signal to stop the first attempt")
    wait_for(lambda: subprocess.run(["scontrol", "update", f"JobId={jid}", "TimeLimit=00:10:00"],
                                    capture_output=True, timeout=30).returncode == 0, 30, "scontrol update TimeLimit")
    st = launch(work, "status", jid, "--wait", timeout=400, check=False)
    assert st.returncode == 0, st.stdout + st.stderr
    restarts = [json.loads(x) for x in (rd / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1 and restarts[0]["reason"].startswith("time limit (SIGUSR2 with"), restarts
    assert restarts[0]["restart"] == 1 and restarts[0]["requeued"] is True
    assert "restart:  1 time limit (SIGUSR2 with" in st.stdout, st.stdout
    states = [s for _, s in sacct(jid)]
    assert states[-1] == "COMPLETED" and len(states) >= 2, states
    steps = train_steps(rd)
    assert sorted(set(steps)) == list(range(1, 12 * epochs + 1)) and restarts[0]["step"] < 12 * epochs


def test_past_the_requeue_limit_a_job_ends_failed_with_its_checkpoint_and_continues_with_resume(work, small_shards):
    p = submit(work, small_shards, "--partition", "debug", "--time", "00:10:00", "--max-requeues", "0", wait=False,
               extra=[f"run.epochs={EPOCHS}"])
    jid, rd = job_id(p.stdout), run_dir(p.stdout)
    wait_for(lambda: len(train_steps(rd)) >= 3, 120, "3 steps")
    subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30)
    st = launch(work, "status", jid, "--wait", timeout=300, check=False)
    assert st.returncode == 1 and "FAILED" in st.stdout, st.stdout
    assert "NOT requeued: it has been restarted 0 times, the limit (max_requeues=0)" in st.stdout, st.stdout
    assert [s for _, s in sacct(jid)] == ["FAILED"]
    stopped = json.loads((rd / "restarts.jsonl").read_text().splitlines()[0])["step"]
    assert json.loads((rd / "checkpoints" / "last.json").read_text())["dir"].endswith(f"{stopped:08d}")
    # what the error line says to do
    again = launch(work, "slurm", str(ROOT / "recipes" / "coconut.py"), "--logs", str(work / "logs"), "--partition",
                   "debug", "--time", "00:10:00", "--wait", "--resume", "--profile", "demo", f"data.shards={small_shards}",
                   *CFG, f"run.epochs={EPOCHS}", f"run.run_dir={rd}", timeout=300, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert max(train_steps(rd)) == 12 * EPOCHS
    assert re.search(rf"resumed from \S*/step-0*{stopped}: ", (rd / "train.log").read_text())


def test_bad_input_fails_fast_with_the_error_shown_and_is_not_requeued(work, small_shards):
    missing = work / "no-such-shards"
    t = time.time()
    p = submit(work, missing, "--tasks-per-node", "2", "--partition", "debug", "--time", "00:10:00")
    assert p.returncode == 1, p.stdout + p.stderr
    assert time.time() - t < 90
    jid = job_id(p.stdout)
    assert f"error:    attrdist: error: {missing}: shard directory does not exist" in p.stdout, p.stdout
    assert [s for _, s in sacct(jid)] == ["FAILED"]  # one attempt, never requeued
    st = launch(work, "status", jid, check=False)
    assert st.returncode == 1 and "FAILED" in st.stdout and "shard directory does not exist" in st.stdout
    # a mistake the launcher can see is refused before anything is queued
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    bad = submit(work, small_shards, "--partition", "debug", extra=["optim.lrr=1e-3"], wait=False)
    assert bad.returncode == 2 and "unknown config key 'optim.lrr'; did you mean optim.lr?" in bad.stderr
    assert "submitted job" not in bad.stdout
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


def test_sbatch_template_runs_the_demo_to_completion_through_a_requeue(two_ranks, work, small_shards):
    """slurm/train.sbatch as a user submits it (flags override its GPU #SBATCH lines); USR2 mid-run: the batch
    script runs again, `launch task` resumes, and the run ends with the uninterrupted run's weights."""
    assert two_ranks.returncode == 0
    rd = work / "sbatch-run"
    e = env(work) | {"ATTRDIST_PYTHON": sys.executable, "ATTRDIST_RUN_DIR": str(rd)}
    jid = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node", "0", "--ntasks-per-node", "2", "--cpus-per-task", "1",
         "--partition", "debug", "--time", "00:10:00", "-o", str(work / "sb-%j.out"), "-e", str(work / "sb-%j.err"),
         str(ROOT / "slurm" / "train.sbatch"), "recipes/coconut.py", "--profile", "demo", f"data.shards={small_shards}",
         *CFG, f"run.epochs={EPOCHS}"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=30,
        check=True).stdout.strip()
    wait_for(lambda: len(train_steps(rd)) >= 3, 120, "the sbatch job to train 3 steps")
    subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30)
    st = launch(work, "status", jid, "--wait", timeout=300, check=False)
    assert st.returncode == 0, st.stdout + st.stderr + (work / f"sb-{jid}.err").read_text()
    assert "COMPLETED" in st.stdout and "result:   val mAP vs true_labels" in st.stdout
    assert "restart:  1 preemption (SIGUSR2" in st.stdout, st.stdout
    report = json.loads((rd / "report.json").read_text())
    assert "world_size=2" in report["runtime"] and f"launcher=slurm(job {jid}, 1 node x 2 tasks" in report["runtime"]
    assert "restart 1)" in report["runtime"]
    tl = launch(work, "tail", jid, "-n", "2000")
    assert f"attrdist: job {jid} restart 1 on" in tl.stdout and "attrdist.train.slurm_job: done: val mAP" in tl.stdout
    assert_same_weights(rd, run_dir(two_ranks.stdout))


def test_sweep_is_a_job_array_with_one_run_per_combination(work, small_shards):
    p = submit(work, small_shards, "--partition", "debug", "--time", "00:10:00", "--sweep", "optim.lr=1e-3,3e-3",
               extra=["run.epochs=1"])
    assert p.returncode == 0, p.stdout + p.stderr
    ids = re.findall(r"submitted job (\S+):", p.stdout)
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids), ids
    dirs = re.findall(r"run dir: (\S+)", p.stdout)
    lrs = [json.loads((Path(d) / "report.json").read_text())["config"]["optim"]["lr"] for d in dirs]
    assert sorted(lrs) == [1e-3, 3e-3]


@pytest.mark.slow
def test_deepspeed_zero2_job_stopped_by_usr2_resumes_bitwise(work, small_shards):
    """ZeRO-2 through `launch slurm --deepspeed zero2`: `scancel --signal=USR2` (what a preemption or the
    time-limit warning delivers) -> every rank saves its partitions -> requeue -> same weights as uninterrupted."""
    opts = ("--tasks-per-node", "2", "--partition", "debug", "--time", "00:10:00", "--deepspeed", "zero2")
    ref = submit(work, small_shards, *opts, extra=["run.epochs=8"], timeout=600)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    p = submit(work, small_shards, *opts, wait=False, extra=["run.epochs=8"])
    jid, rd = job_id(p.stdout), run_dir(p.stdout)
    wait_for(lambda: len(train_steps(rd)) >= 3, 300, "3 steps")
    subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30)
    st = launch(work, "status", jid, "--wait", timeout=600, check=False)
    assert st.returncode == 0, st.stdout + st.stderr
    restarts = [json.loads(x) for x in (rd / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1 and restarts[0]["reason"].startswith("preemption (SIGUSR2"), restarts
    assert "engine=deepspeed-zero2" in json.loads((rd / "report.json").read_text())["runtime"]
    assert_same_weights(rd, run_dir(ref.stdout))
