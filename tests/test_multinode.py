"""Two nodes for real: a two-node SLURM cluster on this machine (slurm/testcluster.sh start DIR --nodes 2) and
the coconut demo trained across it, through `python -m launch slurm --nodes 2` and `sbatch --nodes 2
slurm/train.sbatch`.

The nodes are distinct hosts as far as a job can tell: each slurmd, and so every task it starts, runs in its
own network namespace (its own address on a private /24, reached over a bridge), its own UTS namespace
(hostname attrdist-n1 / attrdist-n2) and its own mount namespace with a private /dev/shm; the rest of the
file system is shared, as a cluster's is. What is checked: the rendezvous across the hosts, what train.log
says about nodes, node rank, local rank and the master, the all-reduce chosen from the node layout (gloo
across nodes, shared memory within one), and that 2 nodes x 1 task see the same global batches as 1 node x
2 tasks and end with the same weights, bit for bit (with 2 ranks the shared-memory and gloo all-reduces
both compute a + b of the halved gradients).

The cluster lives for this module only (test_slurm.py's single-node cluster lives for the session): a second
cluster uses the first one's munged, so the one started later must stop first.
Runs 2 nodes x 1 task and 1 node x 2 tasks (24 steps each) and 2 nodes x 2 tasks via sbatch (6 steps).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_tensors_equal
from tests.test_distributed import last_weights, max_rel_loss_diff, train_records
from tests.test_slurm import CFG, job_id, run_dir, sacct, train_steps, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]

SCRIPT = ROOT / "slurm" / "testcluster.sh"
STEPS = 24  # 2 epochs of 12 (96 images, global batch 8)
SAMPLES = [*CFG, "run.epochs=2", "run.log_samples=true"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A running two-node cluster (attrdist-n1, attrdist-n2); SLURM_CONF points at it for the module."""
    if os.geteuid() != 0:
        pytest.skip("the two-node test cluster needs root (network namespaces, a bridge, munged, slurmd)")
    missing = [t for t in ("ip", "unshare", "nsenter") if not shutil.which(t)]
    if missing:
        pytest.skip(f"the two-node test cluster needs {', '.join(missing)} (iproute2, util-linux)")
    d = tmp_path_factory.mktemp("slurm-2nodes")
    t = time.time()
    p = subprocess.run(["bash", str(SCRIPT), "start", str(d), "--nodes", "2"], capture_output=True, text=True,
                       timeout=900)
    started = time.time() - t
    if p.returncode:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=120)
        if p.returncode == 5:  # namespaces, veth or bridge refused by this kernel / container
            pytest.skip(f"two nodes cannot be emulated here: {p.stderr.strip().splitlines()[-1]}")
        raise AssertionError(f"slurm/testcluster.sh start --nodes 2 failed ({p.returncode}):\n{p.stderr[-4000:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = p.stdout.strip().splitlines()[-1]
    print(f"\ntwo-node cluster up in {started:.1f} s")
    yield d
    t = time.time()
    subprocess.run(["bash", str(SCRIPT), "stop", str(d)], capture_output=True, timeout=120)
    print(f"\ntwo-node cluster stopped in {time.time() - t:.1f} s")
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def work(two_nodes, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode-work")


def env(work: Path) -> dict:
    from attrdist.cache import cache_dir
    from tests.conftest import run_env

    # the jobs' own cache; the shared-memory kernel's build from this machine's cache (a build takes ~1 min here)
    return run_env(ATTRDIST_CACHE=str(work / "cache"),
                   TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or str(cache_dir() / "torch_extensions"))


def submit(work: Path, shards: Path, nodes: int, tasks: int, *extra: str, wait: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch", "slurm", str(ROOT / "recipes" / "coconut.py"), "--logs", str(work / "logs"),
           "--nodes", str(nodes), "--tasks-per-node", str(tasks), "--partition", "debug", "--time", "00:10:00",
           *(["--wait"] if wait else []), "--profile", "demo", f"data.shards={shards}", f"run.out_dir={work / 'runs'}",
           *SAMPLES, *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env(work), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


def launch(work: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *argv], cwd=ROOT, env=env(work), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def across(work, small_shards):
    """2 nodes x 1 task through `launch slurm`: (stdout, run dir)."""
    p = submit(work, small_shards, 2, 1)
    return p.stdout, run_dir(p.stdout)


@pytest.fixture(scope="module")
def within(work, small_shards):
    """1 node x 2 tasks through `launch slurm`, the same training: (stdout, run dir)."""
    p = submit(work, small_shards, 1, 2)
    return p.stdout, run_dir(p.stdout)


def test_the_nodes_are_distinct_hosts(two_nodes, work):
    """One task per node: its own hostname, the other node's name resolves to the other address, and a file
    in /dev/shm is seen on its own node only."""
    out = subprocess.run(
        ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--time", "00:01:00", "bash", "-c",
         'touch /dev/shm/attrdist-probe-$SLURM_JOB_ID-$SLURM_PROCID; sleep 1; '
         'echo "$SLURM_PROCID $(hostname) $(getent hosts attrdist-n1 | cut -d" " -f1) '
         '$(getent hosts attrdist-n2 | cut -d" " -f1) $(ls /dev/shm | grep -c attrdist-probe-$SLURM_JOB_ID-)"; '
         'rm /dev/shm/attrdist-probe-$SLURM_JOB_ID-$SLURM_PROCID'],
        capture_output=True, text=True, timeout=60, check=True).stdout
    rows = sorted(line.split() for line in out.splitlines() if line.strip())
    assert [r[:2] for r in rows] == [["0", "attrdist-n1"], ["1", "attrdist-n2"]], out
    a1, a2 = rows[0][2], rows[0][3]
    assert a1 != a2 and a1.startswith("10.213.") and [r[2:4] for r in rows] == [[a1, a2], [a1, a2]], out
    assert [r[4] for r in rows] == ["1", "1"], out  # each node sees its own probe file only


def test_two_nodes_train_the_demo_and_train_log_says_where_every_rank_runs(across, work):
    out, rd = across
    jid = job_id(out)
    assert f"job {jid} (coconut.py, 2 ranks): COMPLETED" in out, out
    runtime = json.loads((rd / "report.json").read_text())["runtime"]
    assert "world_size=2 rank=0 local_rank=0 nodes=2 node_rank=0" in runtime, runtime
    m = re.search(rf"launcher=slurm\(job {jid}, 2 nodes x 1 task, node 0, master attrdist-n1:(\d+), restart 0\)",
                  runtime)
    assert m, runtime
    log = (rd / "train.log").read_text()
    assert (f"nodes: 2 nodes x 1 rank, master attrdist-n1:{m.group(1)}; node 0 attrdist-n1: rank 0; "
            f"node 1 attrdist-n2: rank 1") in log, log[:3000]
    assert ("gradient all-reduce: gloo (shared memory not used: rank 0: the 2 ranks are on 2 nodes (1 on this one), "
            "and shared memory reaches only the ranks of one node)") in log, log[:3000]
    assert max(train_records(rd)) == STEPS
    # task 1 ran on the other host, as node 1, with local rank 0
    task1 = (work / "logs" / jid / f"{jid}_1_log.out").read_text()  # submitit writes its own lines to .out
    assert "hostname=attrdist-n2, local_rank=0(1), node=1(2), global_rank=1(2)" in task1, task1[-3000:]


def test_one_node_two_tasks_and_two_nodes_one_task_see_the_same_batches_and_end_with_the_same_weights(
        across, within):
    (_, two_nodes), (_, one_node) = across, within
    log = (one_node / "train.log").read_text()
    host = re.search(r"nodes: 1 node x 2 ranks, master (attrdist-n[12]):\d+; node 0 \1: ranks 0-1", log)
    assert host, log[:3000]
    if importlib.util.find_spec("deepspeed"):  # the kernel's package: shared memory within the node
        assert (f"gradient all-reduce: shared memory (DeepSpeed's kernel as DDP's hook), the 2 ranks on "
                f"{host.group(1)}") in log, log[:3000]
    a, b = train_records(one_node), train_records(two_nodes)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert all(a[s]["samples"] == b[s]["samples"] for s in a)
    assert sorted(i for s in range(1, 13) for i in a[s]["samples"]) == list(range(96))  # an epoch: every sample once
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    assert_tensors_equal(last_weights(one_node), last_weights(two_nodes))


def test_sbatch_template_on_two_nodes_with_two_tasks_each(two_nodes, within, work, small_shards):
    """slurm/train.sbatch as a user submits it, 2 nodes x 2 CPU tasks: ranks 0-1 on attrdist-n1, 2-3 on
    attrdist-n2 (node rank and local rank differ from the global rank); 6 steps, the batches of 1 node x 2 tasks."""
    rd = work / "sbatch-2x2"
    e = env(work) | {"ATTRDIST_PYTHON": sys.executable, "ATTRDIST_RUN_DIR": str(rd)}
    jid = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task",
         "1", "--partition", "debug", "--time", "00:10:00", "-o", str(work / "sb-%j.out"), "-e", str(work / "sb-%j.err"),
         str(ROOT / "slurm" / "train.sbatch"), "recipes/coconut.py", "--profile", "demo", f"data.shards={small_shards}",
         *SAMPLES, "run.max_steps=6"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=30,
        check=True).stdout.strip()
    st = subprocess.run([sys.executable, "-m", "launch", "status", jid, "--wait"], cwd=ROOT, env=e, capture_output=True,
                        text=True, timeout=300)
    err = (work / f"sb-{jid}.err").read_text() if (work / f"sb-{jid}.err").is_file() else ""
    assert st.returncode == 0, st.stdout + st.stderr + err[-4000:]
    assert [s for _, s in sacct(jid)] == ["COMPLETED"]
    assert f"attrdist: job {jid} restart 0 on attrdist-n[1-2]: 4 tasks" in err, err[-3000:]
    runtime = json.loads((rd / "report.json").read_text())["runtime"]
    assert "world_size=4 rank=0 local_rank=0 nodes=2 node_rank=0" in runtime, runtime
    m = re.search(rf"launcher=slurm\(job {jid}, 2 nodes x 2 tasks, node 0, master attrdist-n1:(\d+)", runtime)
    assert m, runtime
    log = (rd / "train.log").read_text()
    assert (f"nodes: 2 nodes x 2 ranks, master attrdist-n1:{m.group(1)}; node 0 attrdist-n1: ranks 0-1; "
            f"node 1 attrdist-n2: ranks 2-3") in log, log[:3000]
    assert "gradient all-reduce: gloo (shared memory not used: rank 0: the 4 ranks are on 2 nodes (2 on this one)" in log
    four, two = train_records(rd), train_records(within[1])
    assert sorted(four) == list(range(1, 7))
    assert all(four[s]["samples"] == two[s]["samples"] for s in four)
    rel = max_rel_loss_diff(two, four, range(1, 7))  # 4 ranks sum in another order: float-level differences
    print(f"\n2 nodes x 2 tasks vs 1 node x 2 tasks: max relative loss difference {rel:.2e} over 6 steps")
    assert rel < 1e-5


def test_two_node_job_sent_usr2_checkpoints_on_every_rank_requeues_and_ends_bitwise_equal(across, work, small_shards):
    """USR2 to every task of a running 2 nodes x 1 task job (what SLURM sends on preemption and before the time
    limit): both ranks save the same step, rank 0 requeues the job, SLURM starts it again on the two nodes, and
    it resumes to the weights of the uninterrupted 2-node run, bit for bit."""
    p = submit(work, small_shards, 2, 1, wait=False)
    jid, rd = job_id(p.stdout), run_dir(p.stdout)
    wait_for(lambda: len(train_steps(rd)) >= 3, 120, "the 2-node job to train 3 steps")
    subprocess.run(["scancel", "--signal=USR2", jid], check=True, timeout=30)
    st = launch(work, "status", jid, "--wait")
    assert st.returncode == 0, st.stdout + st.stderr
    restarts = [json.loads(x) for x in (rd / "restarts.jsonl").read_text().splitlines()]
    assert len(restarts) == 1 and restarts[0]["reason"].startswith("preemption (SIGUSR2"), restarts
    stopped = restarts[0]["step"]
    assert 3 <= stopped < STEPS and "restart:  1 preemption" in st.stdout, st.stdout
    states = [s for _, s in sacct(jid)]
    assert states[-1] == "COMPLETED" and len(states) >= 2, states
    assert sorted(set(train_steps(rd))) == list(range(1, STEPS + 1))
    log = (rd / "train.log").read_text()
    assert f"job {jid} restart 1 (of at most 3): preemption" in log, log[-3000:]
    assert re.search(rf"resumed from \S*/step-0*{stopped}: ", log), log[-3000:]
    assert log.count("nodes: 2 nodes x 1 rank, master attrdist-n1:") == 2  # both attempts on both nodes
    assert_tensors_equal(last_weights(rd), last_weights(across[1]))


def node_processes(cluster: Path, node: int, needle: str) -> list[int]:
    """Pids of the processes running on node `node` (in its network namespace) whose command line has `needle`."""
    ns = (cluster / "run" / "netns").read_text().split()[node - 1]
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout.split()
    out = []
    for pid in pids:
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                out.append(int(pid))
        except OSError:
            pass
    return out


def test_a_rank_killed_on_the_other_node_ends_the_job_naming_it_and_resume_continues(two_nodes, across, work,
                                                                                    small_shards):
    """SIGKILL to rank 1 (on attrdist-n2) mid-run: rank 0 stops at once with one line naming rank 1 and its node,
    the job ends FAILED within seconds, `launch status` names the task and node srun saw fail, and `--resume`
    continues from the last periodic checkpoint to the uninterrupted run's weights, bit for bit."""
    extra = ("run.ckpt_every_steps=4", "run.dist_timeout_s=120")
    p = submit(work, small_shards, 2, 1, *extra, wait=False)
    jid, rd = job_id(p.stdout), run_dir(p.stdout)
    wait_for(lambda: len(train_steps(rd)) >= 6, 120, "the 2-node job to train 6 steps")
    victims = node_processes(two_nodes, 2, "submitit.core._submit")
    assert len(victims) == 1, victims
    t = time.time()
    os.kill(victims[0], 9)
    st = launch(work, "status", jid, "--wait")
    ended = time.time() - t
    assert st.returncode == 1 and f"job {jid} (coconut.py, 2 ranks): FAILED" in st.stdout, st.stdout + st.stderr
    assert ("error:    attrdist: error: rank 1 on node 1 (attrdist-n2) is gone: its connection broke in the middle "
            "of a collective") in st.stdout, st.stdout
    assert "failed:   task 1 on attrdist-n2: Killed (srun: the first task to fail)" in st.stdout, st.stdout
    assert ended < 120, ended  # within run.dist_timeout_s: gloo sees the broken connection at once
    print(f"\nrank 1 killed: the job ended FAILED {ended:.1f} s later (launch status --wait returned)")
    assert [s for _, s in sacct(jid)] == ["FAILED"]
    saved = json.loads((rd / "checkpoints" / "last.json").read_text())["dir"]
    again = submit(work, small_shards, 2, 1, *extra, "--resume", f"run.run_dir={rd}")
    assert "COMPLETED" in again.stdout, again.stdout
    assert re.search(rf"resumed from \S*/{saved}: ", (rd / "train.log").read_text())
    assert sorted(set(train_steps(rd))) == list(range(1, STEPS + 1))
    assert_tensors_equal(last_weights(rd), last_weights(across[1]))


@pytest.mark.slow  # ~75 s (SLURM marks the node DOWN after SlurmdTimeout=30 s, then the requeue): make test-slow
def test_a_node_that_crashes_is_named_and_the_job_slurm_requeues_resumes_once_the_node_is_back(two_nodes, across, work,
                                                                                           small_shards):
    """Every process on attrdist-n2 killed at once (its slurmd, slurmstepd and rank 1: a crashed host). Rank 0
    stops at once, naming rank 1 and its node. SLURM cannot reach the node: it marks it DOWN after its
    SlurmdTimeout (30 s on the test cluster, 300 s by default) and requeues the job (the attempt ends NODE_FAIL),
    which waits for two nodes. Once the node is back, the requeued attempt resumes from the last checkpoint by
    itself and ends with the uninterrupted run's weights, bit for bit."""
    p = submit(work, small_shards, 2, 1, "run.ckpt_every_steps=4", "run.dist_timeout_s=120", wait=False)
    jid, rd = job_id(p.stdout), run_dir(p.stdout)
    wait_for(lambda: len(train_steps(rd)) >= 6, 120, "the 2-node job to train 6 steps")
    t = time.time()
    subprocess.run(["bash", str(SCRIPT), "node", str(two_nodes), "2", "crash"], check=True, capture_output=True,
                   timeout=60)
    wait_for(lambda: "NODE_FAIL" in [s for _, s in sacct(jid)], 120, "SLURM to end the attempt on the crashed node")
    noticed = time.time() - t
    print(f"\nnode 2 crashed: SLURM ended the attempt NODE_FAIL {noticed:.1f} s later (SlurmdTimeout=30)")
    assert noticed < 120  # SlurmdTimeout + SLURM's ping interval, within run.dist_timeout_s
    # the attempt is COMPLETING on attrdist-n1 for a moment, then the job waits for two nodes again
    wait_for(lambda: subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True, text=True,
                                    timeout=30).stdout.strip() == "PENDING", 60, "the requeued job to be PENDING")
    st = launch(work, "status", jid)
    assert st.returncode == 3 and st.stdout.startswith(f"job {jid} (coconut.py, 2 ranks): PENDING"), st.stdout
    assert ("error:    attrdist: error: rank 1 on node 1 (attrdist-n2) is gone: its connection broke in the middle "
            "of a collective") in st.stdout, st.stdout
    assert "failed:   node attrdist-n2 failed (srun: Node failure on attrdist-n2)" in st.stdout, st.stdout
    assert subprocess.run(["sinfo", "-h", "-n", "attrdist-n2", "-o", "%t"], capture_output=True, text=True,
                          timeout=30).stdout.split()[0].startswith("down")
    saved = json.loads((rd / "checkpoints" / "last.json").read_text())["dir"]
    subprocess.run(["bash", str(SCRIPT), "node", str(two_nodes), "2", "start"], check=True, capture_output=True,
                   timeout=120)
    st = launch(work, "status", jid, "--wait")
    assert st.returncode == 0 and "COMPLETED" in st.stdout.splitlines()[0], st.stdout + st.stderr
    assert "restart:  1 requeued by SLURM, not by attrdist" in st.stdout, st.stdout
    assert "failed:   attempt 1: node attrdist-n2 failed (srun: Node failure on attrdist-n2)" in st.stdout, st.stdout
    log = (rd / "train.log").read_text()
    assert f"job {jid} restart 1: requeued by SLURM itself (node failure" in log, log[-3000:]
    assert re.search(rf"resumed from \S*/{saved}: ", log), log[-3000:]
    assert sorted(set(train_steps(rd))) == list(range(1, STEPS + 1))
    assert_tensors_equal(last_weights(rd), last_weights(across[1]))
