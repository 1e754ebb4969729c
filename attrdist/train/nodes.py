"""Where a run's ranks are: how many nodes, this rank's node and local rank, and every node's host.

The layout is the launcher's, in torchrun's variables: WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE (the
ranks on this node) and GROUP_RANK or NODE_RANK (this node's index). torchrun and `accelerate launch` set
them; `python -m launch slurm` and slurm/train.sbatch set them from SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID and SLURM_NODEID (attrdist.train.slurm_job). Where the launcher states no LOCAL_WORLD_SIZE
(an environment set by hand), the hosts the ranks run on decide: ranks on one host are one node.

`gather()` (a collective, once per run) adds every rank's host name, checks that the launcher's layout
agrees with the hosts (one node is one host), and gives the run's `Layout`: train.log states it
(`nodes: 2 nodes x 1 rank, master attrdist-n1:20034; node 0 attrdist-n1: rank 0; node 1 attrdist-n2:
rank 1`), and the gradient all-reduce is chosen from it (attrdist.train.shm_allreduce: shared memory
only among the ranks of one node), never from whether /dev/shm happens to be shared.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from attrdist.errors import AttrdistError

SHOWN_NODES = 8  # train.log lists this many nodes' hosts and ranks, then a count of the rest
_current: list = []  # this process's Layout once gather() has run (peer_at reads it)


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    local_rank: int
    local_world: int  # ranks on this rank's node
    node: int  # this rank's node index (0 .. nodes-1)
    nodes: int
    hosts: tuple[str, ...] = ()  # each node's host name, by node index
    ranks: tuple[tuple[int, ...], ...] = ()  # each node's global ranks, by node index
    source: str = "launcher"  # "launcher" (LOCAL_WORLD_SIZE given) or "hosts"

    def describe(self) -> str:
        """One line for train.log: the shape, the master, and which ranks run on which host."""
        per = {len(r) for r in self.ranks} or {self.local_world}
        shape = (f"{self.nodes} node{'s' * (self.nodes > 1)} x {per.pop()} rank{'s' * (self.world > self.nodes)}"
                 if len(per) == 1 else f"{self.nodes} nodes, {self.world} ranks")
        master = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '?')}" if os.environ.get(
            "MASTER_ADDR") else "-"
        where = [f"node {n} {h}: rank{'s' * (len(r) > 1)} {_span(r)}"
                 for n, (h, r) in enumerate(zip(self.hosts, self.ranks)) if n < SHOWN_NODES]
        if self.nodes > SHOWN_NODES:
            where.append(f"... {self.nodes - SHOWN_NODES} more nodes")
        how = "" if self.source == "launcher" else " (from the ranks' hosts: the launcher set no LOCAL_WORLD_SIZE)"
        return f"{shape}, master {master}{how}; " + "; ".join(where)


def _span(ranks: tuple[int, ...]) -> str:
    """(0, 1, 2, 3) -> '0-3'; (0, 2) -> '0,2'."""
    if len(ranks) > 1 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def from_env(env=None) -> tuple[int, int, int, int | None, int | None]:
    """(world, rank, local_rank, local_world or None, node or None) as the launcher set them."""
    env = os.environ if env is None else env
    world, rank = int(env.get("WORLD_SIZE") or 1), int(env.get("RANK") or 0)
    local_rank = int(env.get("LOCAL_RANK") or 0)
    lw = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE")
    node = env.get("GROUP_RANK") or env.get("NODE_RANK")
    return world, rank, local_rank, int(lw) if lw else None, int(node) if node else None


def layout(seen: list[tuple[str, int, int | None, int | None]], rank: int) -> Layout:
    """The run's layout from every rank's (host, local_rank, local_world, node) as it reported them (list index
    = global rank). Raises AttrdistError when the launcher's layout contradicts the hosts: a node on two hosts,
    or ranks of one node that share a local rank."""
    world = len(seen)
    if all(s[2] for s in seen):  # the launcher states the ranks per node
        local_world = seen[rank][2]
        node_of = [s[3] if s[3] is not None else r // s[2] for r, s in enumerate(seen)]
        source = "launcher"
    else:  # one host, one node (first seen first)
        order = list(dict.fromkeys(s[0] for s in seen))
        node_of = [order.index(s[0]) for s in seen]
        local_world = node_of.count(node_of[rank])
        source = "hosts"
    nodes = max(node_of) + 1
    hosts, ranks = [], []
    for n in range(nodes):
        members = tuple(r for r in range(world) if node_of[r] == n)
        on = sorted({seen[r][0] for r in members})
        if len(on) > 1:
            raise AttrdistError(f"the launcher puts ranks {_span(members)} on node {n}, but they run on hosts "
                                f"{', '.join(on)}: its GROUP_RANK/NODE_RANK or LOCAL_WORLD_SIZE do not match where "
                                f"the ranks are (under SLURM, launch with `srun python -m launch task` or `python -m "
                                f"launch slurm`, which set them from SLURM_NODEID and SLURM_NTASKS_PER_NODE)")
        local = [seen[r][1] for r in members]
        if len(set(local)) != len(local):
            raise AttrdistError(f"ranks {_span(members)} on node {n} ({on[0] if on else '?'}) do not have distinct "
                                f"LOCAL_RANKs ({local}): the launcher's layout is wrong")
        hosts.append(on[0] if on else "?")
        ranks.append(members)
    return Layout(world=world, rank=rank, local_rank=seen[rank][1], local_world=local_world, node=node_of[rank],
                  nodes=nodes, hosts=tuple(hosts), ranks=tuple(ranks), source=source)


def gather() -> Layout:
    """Collective over the default process group (every rank calls it once the group exists): this run's
    Layout. Without a group (one process): this host alone."""
    import torch.distributed as dist

    world, rank, local_rank, local_world, node = from_env()
    mine = (socket.gethostname(), local_rank, local_world, node)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return layout([mine], 0)
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    lay = layout(seen, dist.get_rank())
    _current[:] = [lay]
    return lay


def peer_at(message: str, lay: Layout | None = None, resolve=socket.getaddrinfo) -> str:
    """Who is at the [address]:port a gloo error names ("Read error [10.213.17.3]:33419: Connection reset by
    peer"): "rank 1 on node 1 (attrdist-n2)", "a rank on node 1 (attrdist-n2: ranks 2-3)" when the node runs
    several (they share its address), or "" when the message names no address or no node has it. On this
    rank's own node the peer is one of the other ranks. `lay`: the run's layout (gather()'s by default)."""
    lay = lay or (_current[0] if _current else None)
    m = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", message)
    if not (lay and m):
        return ""
    addr = m.group(1)
    for n, (host, ranks) in enumerate(zip(lay.hosts, lay.ranks)):
        try:
            mine = {ai[4][0] for ai in resolve(host, None)}
        except OSError:
            continue
        if addr in mine:
            others = tuple(r for r in ranks if r != lay.rank)  # on this rank's node, the peer is another rank
            if len(others) == 1:
                return f"rank {others[0]} on node {n} ({host})"
            return f"a rank on node {n} ({host}: rank{'s' * (len(others) > 1)} {_span(others)})"
    return ""
