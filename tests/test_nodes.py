"""The node layout of a run's ranks (attrdist/train/nodes.py) from what each rank reports, and the CPU-keyed
folder of JIT-built extensions (attrdist/train/shm_allreduce.py): the per-node facts a multi-node run is
built on, without a cluster. tests/test_multinode.py runs them on the two-node SLURM test cluster."""

from __future__ import annotations

import pytest

from attrdist.errors import AttrdistError
from attrdist.train import nodes, shm_allreduce


@pytest.fixture(autouse=True)
def master(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "node-a")
    monkeypatch.setenv("MASTER_PORT", "29500")


def test_launcher_layout_two_nodes_of_two():
    """torchrun's / `launch task`'s variables: node and local rank differ from the global rank on node 1."""
    seen = [("node-a", 0, 2, 0), ("node-a", 1, 2, 0), ("node-b", 0, 2, 1), ("node-b", 1, 2, 1)]
    lay = nodes.layout(seen, 3)
    assert (lay.nodes, lay.node, lay.local_rank, lay.local_world, lay.source) == (2, 1, 1, 2, "launcher")
    assert lay.describe() == ("2 nodes x 2 ranks, master node-a:29500; node 0 node-a: ranks 0-1; "
                              "node 1 node-b: ranks 2-3")
    assert nodes.layout(seen, 0).node == 0


def test_node_index_from_rank_when_the_launcher_gives_only_the_ranks_per_node():
    lay = nodes.layout([("a", 0, 1, None), ("b", 0, 1, None)], 1)
    assert (lay.nodes, lay.node, lay.hosts) == (2, 1, ("a", "b"))
    assert lay.describe().startswith("2 nodes x 1 rank, master node-a:29500; node 0 a: rank 0; node 1 b: rank 1")


def test_without_the_launchers_layout_the_hosts_decide():
    """No LOCAL_WORLD_SIZE (an environment set by hand): ranks on one host are one node."""
    seen = [("b", 0, None, None), ("a", 0, None, None), ("b", 1, None, None)]
    lay = nodes.layout(seen, 2)
    assert (lay.nodes, lay.node, lay.local_world, lay.ranks, lay.source) == (2, 0, 2, ((0, 2), (1,)), "hosts")
    assert "node 0 b: ranks 0,2; node 1 a: rank 1" in lay.describe()
    assert "(from the ranks' hosts: the launcher set no LOCAL_WORLD_SIZE)" in lay.describe()
    assert nodes.layout([("a", 0, None, None), ("a", 1, None, None)], 0).nodes == 1


def test_two_nodes_on_one_host_are_two_nodes():
    """Slurm's multiple-slurmd nodes (or two containers with one hostname): the launcher's node ranks decide,
    so the shared-memory all-reduce is not chosen across them even though /dev/shm may be shared."""
    lay = nodes.layout([("h", 0, 1, 0), ("h", 0, 1, 1)], 0)
    assert (lay.nodes, lay.hosts) == (2, ("h", "h"))
    assert "the 2 ranks are on 2 nodes (1 on this one)" in shm_allreduce._why_not(2, lay)


def test_a_layout_that_contradicts_the_hosts_is_refused():
    with pytest.raises(AttrdistError, match=r"the launcher puts ranks 0-1 on node 0, but they run on hosts a, b: "):
        nodes.layout([("a", 0, 2, 0), ("b", 1, 2, 0)], 0)
    with pytest.raises(AttrdistError, match=r"ranks 0-1 on node 0 \(a\) do not have distinct LOCAL_RANKs \(\[0, 0\]\)"):
        nodes.layout([("a", 0, 2, 0), ("a", 0, 2, 0)], 0)


def test_a_long_layout_lists_eight_nodes():
    seen = [(f"n{r // 2:02d}", r % 2, 2, r // 2) for r in range(24)]
    text = nodes.layout(seen, 0).describe()
    assert text.startswith("12 nodes x 2 ranks, master node-a:29500; node 0 n00: ranks 0-1;")
    assert "node 7 n07: ranks 14-15; ... 4 more nodes" in text and "n08" not in text


def test_from_env_reads_torchruns_variables():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    assert nodes.from_env(env) == (4, 3, 1, 2, 1)
    assert nodes.from_env({"WORLD_SIZE": "2", "RANK": "1", "NODE_RANK": "1"}) == (2, 1, 0, None, 1)
    assert nodes.from_env({}) == (1, 0, 0, None, None)


CPUINFO = "processor\t: 0\nmodel name\t: {name}\nflags\t\t: {flags}\n\nprocessor\t: 1\nmodel name\t: {name}\n"


def test_extension_builds_are_kept_per_kind_of_cpu(monkeypatch, tmp_path):
    """DeepSpeed compiles with -march=native: two CPUs get two folders, one CPU one folder (flag order aside)."""
    a = shm_allreduce.cpu_kind(CPUINFO.format(name="AMD EPYC 7B13", flags="fpu avx2 avx512f"))
    b = shm_allreduce.cpu_kind(CPUINFO.format(name="AMD EPYC 7B13", flags="fpu avx2"))
    c = shm_allreduce.cpu_kind(CPUINFO.format(name="Intel Xeon Gold 6342", flags="fpu avx2 avx512f"))
    assert len({a, b, c}) == 3 and a.startswith("cpu-") and len(a) == 14
    assert a == shm_allreduce.cpu_kind(CPUINFO.format(name="AMD EPYC 7B13", flags="avx512f fpu avx2"))
    here = shm_allreduce.cpu_kind()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert shm_allreduce.extensions_dir() == str(tmp_path / "ext" / here)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext" / here))  # already this CPU's: kept as is
    assert shm_allreduce.extensions_dir() == str(tmp_path / "ext" / here)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("ATTRDIST_CACHE", str(tmp_path / "cache"))
    assert shm_allreduce.extensions_dir() == str(tmp_path / "cache" / "torch_extensions" / here)


def test_a_broken_connection_names_the_rank_and_node_at_its_address():
    """gloo's error names the peer's address: the layout's hosts, resolved, say whose it is."""
    addresses = {"n1": "10.213.17.2", "n2": "10.213.17.3"}

    def resolve(host, port):
        return [(2, 1, 6, "", (addresses[host], 0))]

    msg = "[gloo/transport/tcp/pair.cc:545] Read error [10.213.17.3]:33419: Connection reset by peer. This is ..."
    one_each = nodes.layout([("n1", 0, 1, 0), ("n2", 0, 1, 1)], 0)
    assert nodes.peer_at(msg, one_each, resolve) == "rank 1 on node 1 (n2)"
    two_each = nodes.layout([("n1", 0, 2, 0), ("n1", 1, 2, 0), ("n2", 0, 2, 1), ("n2", 1, 2, 1)], 1)
    assert nodes.peer_at(msg, two_each, resolve) == "a rank on node 1 (n2: ranks 2-3)"
    assert nodes.peer_at(msg.replace(".3]", ".2]"), two_each, resolve) == "rank 0 on node 0 (n1)"  # rank 1's peer
    assert nodes.peer_at(msg.replace(".3]", ".9]"), one_each, resolve) == ""
    assert nodes.peer_at("Connection closed by peer", one_each, resolve) == ""
