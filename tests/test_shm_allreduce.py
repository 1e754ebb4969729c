"""The shared-memory gradient all-reduce (attrdist/train/shm_allreduce.py, `run.shm_allreduce`) on real ranks.

* Same bits as gloo: tests/test_distributed.py::test_shm_and_gloo_all_reduce_give_identical_training.
* A peer that dies mid-reduction does not leave the survivor spinning: the watchdog stops it, naming the rank;
  a peer that never arrives is bounded by the timeout.
* Where it cannot be used, `auto` falls back to gloo and `on` fails with the reason; no segment is left in
  /dev/shm.

The scenario tests start two plain processes with torchrun's environment (as srun's tasks get it from
attrdist.train.slurm_job), not under torchrun: its agent would stop the survivor itself and hide the watchdog.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_env

pytestmark = pytest.mark.distributed


def start_ranks(scenario: str, tmp_path: Path, port: int, **env) -> list[subprocess.Popen]:
    procs = []
    for rank in (0, 1):
        e = run_env(**{"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **env})
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.test_shm_allreduce", scenario, str(tmp_path)], cwd=ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, float]]:
    """(exit status, output, seconds to exit) per rank; kills whatever is still running after `timeout`."""
    t0, out = time.monotonic(), []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            text += "\n<killed by the test: still running>"
        out.append((p.returncode, text, time.monotonic() - t0))
    return out


def free_port() -> int:
    from launch.local import free_port as fp

    return fp()


def leftover_segments(port: int) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_") and f"_{port}_" in f]


def test_peer_death_mid_reduction_stops_the_survivor(tmp_path):
    """Rank 1 trains a step, then exits before its second backward; rank 0, waiting inside the kernel
    for it, is stopped by the watchdog within seconds (the group's timeout is 600 s), naming rank 1."""
    port = free_port()
    (r0, out0, t0), (r1, out1, _) = finish(start_ranks("peer_dies", tmp_path, port), timeout=120)
    assert r1 == 3, out1
    assert r0 == 2, out0
    assert "step 1 done" in out0 and "step 2 done" not in out0, out0
    assert "attrdist: error: rank(s) [1] exited while this rank waited" in out0, out0
    assert t0 < 60, (t0, out0)
    assert not leftover_segments(port)


def test_peer_that_never_arrives_is_bounded_by_the_timeout(tmp_path):
    """Rank 1 sleeps instead of its second backward (alive, never arriving): rank 0 stops after the 3 s timeout."""
    port = free_port()
    (r0, out0, _), (r1, out1, _) = finish(start_ranks("peer_stalls", tmp_path, port), timeout=120)
    assert r0 == 2, out0
    assert "attrdist: error: a collective timed out after run.dist_timeout_s=3 s" in out0, out0
    assert "step 1 done" in out0 and "step 2 done" not in out0, out0
    assert not leftover_segments(port)


def test_auto_falls_back_and_on_refuses_where_it_cannot_run(tmp_path):
    """Ranks whose launcher puts them on 2 nodes (LOCAL_WORLD_SIZE=1 of 2), here on one host with one /dev/shm:
    the node layout decides, so auto -> gloo with the reason, on -> error."""
    port = free_port()
    res = finish(start_ranks("spans_hosts", tmp_path, port, LOCAL_WORLD_SIZE="1"), timeout=120)
    for rc, out, _ in res:
        assert rc == 0, out
        got = json.loads(out.strip().splitlines()[-1])
        assert got["auto"] == "gloo"
        why = "rank 0: the 2 ranks are on 2 nodes (1 on this one), and shared memory reaches only the ranks of one node"
        assert got["note"] == f"gloo (shared memory not used: {why})", got
        assert got["on"].startswith(f"run.shm_allreduce=on: cannot use the shared-memory all-reduce ({why})"), got
    assert not leftover_segments(port)


# ------------------------------------------------------------------------------------------------------
# The ranks of the scenario tests (run as `python -m tests.test_shm_allreduce SCENARIO DIR`)
# ------------------------------------------------------------------------------------------------------


def scenario(name: str) -> None:
    import torch
    import torch.distributed as dist

    from attrdist.train import shm_allreduce
    from attrdist.errors import AttrdistError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=600))
    rank = dist.get_rank()
    if name == "spans_hosts":
        choice, note = shm_allreduce.setup("auto", device="cpu", deepspeed="", timeout_s=600)
        got = {"auto": choice, "note": note}
        try:
            shm_allreduce.setup("on", device="cpu", deepspeed="", timeout_s=600)
            got["on"] = "no error"
        except AttrdistError as e:
            got["on"] = str(e)
        print(json.dumps(got), flush=True)
        dist.destroy_process_group()
        return
    timeout = 3 if name == "peer_stalls" else 600
    assert shm_allreduce.setup("on", device="cpu", deepspeed="", timeout_s=timeout)[0] == "shm"
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(256, 256), gradient_as_bucket_view=True)
    shm_allreduce.register(model)
    x = torch.randn(8, 256)
    for step in (1, 2):
        y = model(x)  # step 2's forward has DDP's own collective (bucket order): before the rank leaves
        if step == 2 and rank == 1:
            if name == "peer_dies":
                os._exit(3)
            time.sleep(8)  # alive and absent until rank 0 has given up on it (after 3-4 s)
            os._exit(0)
        y.sum().backward()
        print(f"step {step} done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    scenario(sys.argv[1])
