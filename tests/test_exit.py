"""How a finished distributed process exits (`runtime.exit_without_native_teardown`).

A SLURM job of 2 gloo ranks once failed after its training, report and submitit result were all written:
rank 1 aborted at interpreter exit ("terminate called without an active exception", SIGABRT) and srun
killed rank 0. The cause, shown by the first test: DDP keeps the gloo process group and its threads alive
after `destroy_process_group`, so they are torn down in the interpreter's native teardown. Recipes now
skip that teardown once a distributed run has succeeded, and the exit status stays honest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CANARY = textwrap.dedent("""
    import gc, os, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    m = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
    m(torch.randn(2, 8)).sum().backward()
    del m
    gc.collect()
    dist.destroy_process_group()
    gc.collect()
    names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print(f"rank {os.environ['RANK']} threads after destroy: {names}", flush=True)
""")


def test_ddp_keeps_the_gloo_threads_alive_after_destroy_process_group(tmp_path):
    """The measured cause (torch 2.14.1). If this starts failing, torch releases the group now: check whether
    `exit_without_native_teardown` is still needed."""
    script = tmp_path / "canary.py"
    script.write_text(CANARY)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [x for x in p.stdout.splitlines() if "threads after destroy" in x]
    assert len(lines) == 2, p.stdout + p.stderr
    for line in lines:
        assert "pt_gloo_runloop" in line and "gloo_tcp_loop" in line, line


def run_exit_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    marker = tmp_path / "teardown-ran"
    script = tmp_path / "exit.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, logging, sys
        sys.path.insert(0, {str(ROOT)!r})
        from attrdist.train.runtime import exit_without_native_teardown
        atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))  # stands for the teardown
        logging.basicConfig(filename={str(tmp_path / "log.txt")!r}, level=logging.INFO)
        print("work done")  # buffered: must still reach the pipe
    """) + textwrap.dedent(body))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    p.teardown_ran = marker.exists()
    return p


def test_a_finished_run_exits_0_with_its_output_flushed_and_skips_the_teardown(tmp_path):
    p = run_exit_script(tmp_path, """
        exit_without_native_teardown()
        logging.info("last log line")
    """)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "work done\n"
    assert "last log line" in (tmp_path / "log.txt").read_text()
    assert not p.teardown_ran


def test_an_exception_after_arming_still_exits_1_with_its_traceback(tmp_path):
    p = run_exit_script(tmp_path, """
        exit_without_native_teardown()
        raise RuntimeError("could not write the result")
    """)
    assert p.returncode == 1
    assert "RuntimeError: could not write the result" in p.stderr
    assert p.teardown_ran  # the normal exit path
