#!/usr/bin/env bash
# A real SLURM cluster (Debian's slurmctld, slurmd, slurmdbd + MariaDB, munge) in a scratch directory,
# for tests and for trying `launch slurm` on one machine. Root, no systemd, no cgroups. Everything it
# starts is stopped by pid with `stop`.
#
#   slurm/testcluster.sh start /tmp/slurm-test     # installs packages if missing; ~15 s to an idle node
#   export SLURM_CONF=/tmp/slurm-test/slurm.conf    # then: sinfo, sbatch, submitit ...
#   slurm/testcluster.sh stop /tmp/slurm-test      # cancels every job, then stops the daemons it started
#
#   slurm/testcluster.sh start /tmp/slurm-2n --nodes 2   # two nodes, attrdist-n1 and attrdist-n2
#
#   slurm/testcluster.sh node /tmp/slurm-2n 2 crash     # every process on node 2 killed at once (a crash);
#   slurm/testcluster.sh node /tmp/slurm-2n 2 start     # SLURM marks it DOWN after SlurmdTimeout=30 s; back
#
# With --nodes N (N >= 2) every node is a distinct host: its slurmd runs in its own network namespace
# (a veth pair onto a bridge on this side, one address each in a private 10.213.X.0/24 that the script
# checks is unused: .1 this side and slurmctld, .2, .3, ... the nodes), its own UTS namespace (hostname
# attrdist-nI) and its own mount namespace, where /dev/shm is a private tmpfs (shared memory does not
# cross nodes) and /etc/hosts is a bind-mounted copy that names every node (torch.distributed's
# MASTER_ADDR and gloo's own address resolve to the node's address). The rest of the file system is
# shared, as a cluster's shared file system is; munge's socket is a file, so every node reaches it.
# slurmctld, slurmdbd, MariaDB and munge run on this side as in the single-node cluster. `stop` also
# ends what is left in the namespaces (by pid), deletes them and the bridge; the real /etc/hosts is
# never touched in this mode.
#
# Partitions: `debug` (default), `low` (preemptable: REQUEUE, GraceTime 30 s) and `high` (PriorityTier
# 10, preempts `low`). Scheduler intervals are 2 s and credentials expire after 10 s, so requeued jobs
# restart in seconds (Slurm's defaults make that ~2 minutes). See ../shared/spec/slurm-testcluster.md.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
usage="usage: $0 start DIR [--nodes N] | stop DIR | node DIR I crash|start"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "$usage" >&2; exit 2; }
nodes=1
if [ "$cmd" = node ]; then
    [ $# = 4 ] && [[ $3 =~ ^[1-9]$ ]] && [[ $4 =~ ^(crash|start)$ ]] || { echo "$usage" >&2; exit 2; }
elif [ $# -gt 2 ]; then
    [ "$1" = start ] && [ "$3" = --nodes ] && [ $# = 4 ] || { echo "$usage" >&2; exit 2; }
    nodes=$4
fi
[[ $nodes =~ ^[1-9]$ ]] || { echo "$usage (N: 1 to 9)" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

log() { echo "testcluster: $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds, for at most SECONDS (wall clock)
    local limit=$1 what=$2 end; shift 2
    end=$((SECONDS + limit))
    while [ "$SECONDS" -lt "$end" ]; do
        if timeout 3 "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "timed out after ${limit}s waiting for $what (logs in $dir/log)"
    return 1
}

stop() {
    if [ -f "$dir/slurm.conf" ]; then
        SLURM_CONF="$dir/slurm.conf" scancel --full --quiet --user=root 2>/dev/null || true  # slurmd does not kill jobs
        sleep 0.5
    fi
    # two waves (each daemon takes ~2 s to exit): Slurm's daemons, then accounting and munge under them
    for wave in "slurmd slurmd-* slurmctld" "slurmdbd mariadbd munged"; do
        pids=()
        for name in $wave; do
            for f in "$dir"/run/$name.pid; do
                [ -f "$f" ] || continue
                pid=$(cat "$f"); rm -f "$f"
                kill "$pid" 2>/dev/null && pids+=("$pid")
            done
        done
        for pid in "${pids[@]}"; do
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        done
    done
    if [ -f "$dir/run/munge-dir" ]; then rm -rf "$(cat "$dir/run/munge-dir")" "$dir/run/munge-dir"; fi
    stop_nodes
    log "stopped ($dir)"
}

stop_nodes() {  # the namespaces of --nodes N: what still runs in them (started there by their slurmd), then them
    local ns pid pids=()
    [ -f "$dir/run/netns" ] || return 0
    for ns in $(cat "$dir/run/netns"); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null && pids+=("$pid"); done
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
    for ns in $(cat "$dir/run/netns"); do ip netns delete "$ns" 2>/dev/null || true; done  # and their veth pairs
    [ -f "$dir/run/bridge" ] && ip link delete "$(cat "$dir/run/bridge")" 2>/dev/null || true
    rm -f "$dir/run/netns" "$dir/run/bridge"
}

tag=$(echo "$dir" | md5sum | cut -c1-6)  # --nodes: names unique per cluster directory (interface names: <= 15 chars)

start_nodes() {  # the $nodes namespaces, their veth pairs, the bridge, the hosts file; sets $net (10.213.X)
    local i ns br=""
    command -v unshare >/dev/null && command -v ip >/dev/null || { log "--nodes needs ip (iproute2) and unshare"; exit 5; }
    for _ in $(seq 50); do  # a /24 in 10.213.0.0/16 that no address or route here uses yet
        net=10.213.$((1 + RANDOM % 254))
        # an address in it, or a route to it or to a network around it (the default route aside)
        ip -4 addr show | grep -qF " $net." || ip -4 route show match "$net.0/24" | grep -qv '^default' || break
        net=""
    done
    [ -n "$net" ] || { log "no unused 10.213.X.0/24 found"; exit 5; }
    br="adbr$tag"
    : >"$dir/run/netns"
    ip link add "$br" type bridge 2>"$dir/log/netns.log" || { log "cannot create a bridge (ip link add type bridge: $(cat "$dir/log/netns.log"))"; exit 5; }
    echo "$br" >"$dir/run/bridge"
    ip addr add "$net.1/24" dev "$br" && ip link set "$br" up
    { cat /etc/hosts; echo "# attrdist test cluster $dir"; } >"$dir/hosts"
    for i in $(seq "$nodes"); do echo "$net.$((i + 1)) attrdist-n$i" >>"$dir/hosts"; done
    for i in $(seq "$nodes"); do
        ns="attrdist-$tag-n$i"
        ip netns add "$ns" 2>>"$dir/log/netns.log" || { log "cannot create network namespace $ns (see $dir/log/netns.log)"; exit 5; }
        echo "$ns" >>"$dir/run/netns"
        { ip link add "ad${tag}h$i" type veth peer name "ad${tag}p$i" && ip link set "ad${tag}p$i" netns "$ns" &&
          ip link set "ad${tag}h$i" master "$br" up && ip -n "$ns" addr add "$net.$((i + 1))/24" dev "ad${tag}p$i" &&
          ip -n "$ns" link set "ad${tag}p$i" up && ip -n "$ns" link set lo up; } 2>>"$dir/log/netns.log" ||
            { log "cannot give $ns a veth pair onto $br (see $dir/log/netns.log)"; exit 5; }
    done
}

start_slurmd() {  # start_slurmd I: node I's slurmd in its network namespace, with its own hostname, /dev/shm, hosts
    # the node's network, its own hostname, a private /dev/shm, the hosts file that names every node; then
    # slurmd (it daemonizes; its jobs inherit the namespaces). nsenter, not `ip netns exec`: that mounts a
    # fresh /sys, without the cgroup mounts under /sys/fs/cgroup that slurmd 22.05 needs to start at all
    mkdir -p "$dir/spool/attrdist-n$1"
    nsenter --net="/run/netns/attrdist-$tag-n$1" unshare --uts --mount --propagation private -- \
        sh -c 'hostname "$1" && mount -t tmpfs -o mode=1777 shm /dev/shm && mount --bind "$2" /etc/hosts && exec slurmd -N "$1" -f "$3"' \
        sh "attrdist-n$1" "$dir/hosts" "$dir/slurm.conf" ||
        { log "attrdist-n$1's slurmd did not start (see $dir/log/slurmd-attrdist-n$1.log)"; exit 1; }
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
if [ "$cmd" = node ]; then  # node DIR I crash|start: node I fails as a crashed host does, or comes back
    i=$3 ns="attrdist-$tag-n$3"
    [ -f "$dir/slurm.conf" ] && grep -qx "$ns" "$dir/run/netns" 2>/dev/null || { log "$dir has no node $i"; exit 2; }
    export SLURM_CONF="$dir/slurm.conf"
    if [ "$4" = crash ]; then  # every process on the node at once: slurmd, its slurmstepds, the job's tasks
        pids=$(ip netns pids "$ns")
        kill -9 $pids 2>/dev/null || true
        for pid in $pids; do for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done; done
        rm -f "$dir/run/slurmd-attrdist-n$i.pid"
        log "attrdist-n$i crashed: killed $(echo $pids | wc -w) processes"
    else
        start_slurmd "$i"
        # registered: a pid file again, and slurmctld no longer lists the node as not responding (*) or down
        wait_for 60 "attrdist-n$i to register" bash -c "[ -f '$dir/run/slurmd-attrdist-n$i.pid' ] && sinfo -h -n attrdist-n$i -o %t | grep -qvE '[*]|down|drain'"
        log "attrdist-n$i started: $(sinfo -h -n attrdist-n$i -o %t | head -1)"
    fi
    exit 0
fi
[ "$cmd" = start ] || { echo "$usage" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { log "needs root (it starts munged, slurmd and slurmctld)"; exit 3; }

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge slurmdbd mariadb-server >"$dir/apt.log" 2>&1 \
        || { apt-get update -q >>"$dir/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
             --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server >>"$dir/apt.log" 2>&1; } \
        || { log "apt-get failed: see $dir/apt.log"; exit 4; }
fi

host=$(hostname -s)
if [ "$nodes" = 1 ] && ! getent hosts "$host" >/dev/null; then
    echo "127.0.0.1 $host" >>/etc/hosts  # torch.distributed hangs on an unresolvable master address
fi
mkdir -p "$dir"/{run,log,state,spool,db}
net=""
if [ "$nodes" -gt 1 ]; then start_nodes; fi
# munged runs as user munge, which may not traverse $dir (pytest's tmp dirs are mode 700): its key,
# pid and log live under /run/munge, one directory per cluster
mdir=/run/munge/attrdist-$(echo "$dir" | md5sum | cut -c1-10)
mkdir -p /run/munge "$mdir" && chown munge:munge /run/munge "$mdir" && chmod 755 /run/munge && chmod 700 "$mdir"
echo "$mdir" >"$dir/run/munge-dir"

# --- munge
key="$mdir/munge.key"
[ -f "$key" ] || { dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; }
chown munge:munge "$key"; chmod 600 "$key"
sock=/run/munge/munge.socket.2  # the default: Slurm's clients (sacctmgr) do not all honour AuthInfo=socket=
if munge -n --socket="$sock" 2>/dev/null | unmunge --socket="$sock" >/dev/null 2>&1; then
    # another cluster's munged answers there: use it rather than take its socket (`--force` would, and that
    # cluster's daemons would then fail to authenticate); this cluster must be stopped before that one
    log "munged already answers on $sock (another test cluster's): this one uses it and leaves it running"
else
    runuser -u munge -- /usr/sbin/munged --key-file="$key" --socket="$sock" --pid-file="$mdir/munged.pid" \
        --log-file="$mdir/munged.log" --seed-file="$mdir/munged.seed" --force
    cp "$mdir/munged.pid" "$dir/run/munged.pid"
fi

# --- MariaDB + slurmdbd (accounting: sacct, and submitit needs it to see jobs that died)
# Ports dbport, +1000 (slurmdbd), +2000 and +2001 (slurmctld, slurmd): below the kernel's ephemeral range, where
# no other process's outgoing connection can hold one (at 33060+ a gloo or HTTP client socket once took the
# slurmdbd port: "Address already in use"), and not listening now.
ephemeral=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
for _ in $(seq 50); do
    dbport=$((10000 + RANDOM % (ephemeral > 12100 ? ephemeral - 12100 : 1000)))
    taken=$(ss -Htln 2>/dev/null | awk '{print $4}' | grep -cE ":($dbport|$((dbport + 1000))|$((dbport + 2000))|$((dbport + 2001)))\$" || true)
    [ "$taken" = 0 ] && break
done
if [ ! -d "$dir/db/mysql" ]; then
    mariadb-install-db --no-defaults --user=root --datadir="$dir/db" --auth-root-authentication-method=normal \
        >"$dir/log/mariadb-install.log" 2>&1
fi
mariadbd --no-defaults --user=root --datadir="$dir/db" --bind-address=127.0.0.1 --port="$dbport" \
    --socket="$dir/run/mysql.sock" --pid-file="$dir/run/mariadbd.pid" --log-error="$dir/log/mariadb.log" &
wait_for 30 "MariaDB" mariadb --no-defaults -uroot --socket="$dir/run/mysql.sock" -e "select 1"
mariadb --no-defaults -uroot --socket="$dir/run/mysql.sock" -e \
    "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

cat >"$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$((dbport + 1000))
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$dbport
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$dir/run/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
EOF
chmod 600 "$dir/slurmdbd.conf"

# --- slurm.conf
cpus=$(nproc)
mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
mem=$(( ${mem:-4096} * 95 / 100 ))
ctlport=$((dbport + 2000))
if [ "$nodes" = 1 ]; then
    ctlhost=localhost
    nodelist=$host
    nodelines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$((cpus < 4 ? 4 : cpus)) RealMemory=$mem State=UNKNOWN"
    slurmd_files="SlurmdSpoolDir=$dir/spool
SlurmdPidFile=$dir/run/slurmd.pid
SlurmdLogFile=$dir/log/slurmd.log"
else  # the nodes reach slurmctld at the bridge's address; every node's slurmd has its own spool, pid and log (%n)
    ctlhost="localhost($net.1)"
    nodelist="attrdist-n[1-$nodes]"
    nodelines=$(for i in $(seq "$nodes"); do
        echo "NodeName=attrdist-n$i NodeAddr=$net.$((i + 1)) NodeHostname=attrdist-n$i CPUs=$((cpus < 4 ? 4 : cpus)) RealMemory=$mem State=UNKNOWN"
    done)
    # SlurmdTimeout: a node that stops answering is DOWN after 30 s, not Slurm's 300 (`node DIR I crash`)
    slurmd_files="SlurmdSpoolDir=$dir/spool/%n
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmdTimeout=30"
fi
cat >"$dir/slurm.conf" <<EOF
ClusterName=attrdist
SlurmctldHost=$ctlhost
SlurmctldPort=$ctlport
SlurmdPort=$((ctlport + 1))
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
$slurmd_files
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((dbport + 1000))
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmdParameters=config_overrides
$nodelines
PartitionName=debug Nodes=$nodelist Default=YES MaxTime=INFINITE State=UP
PartitionName=low Nodes=$nodelist MaxTime=INFINITE State=UP PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=$nodelist MaxTime=INFINITE State=UP PriorityTier=10
EOF
export SLURM_CONF="$dir/slurm.conf"

slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
wait_for 30 "slurmdbd" sacctmgr -n list cluster
sacctmgr -i add cluster attrdist >/dev/null 2>&1 || true
slurmctld -f "$dir/slurm.conf"
wait_for 30 "slurmctld" bash -c "scontrol ping | grep -q UP"
if [ "$nodes" = 1 ]; then
    slurmd -f "$dir/slurm.conf"
    wait_for 30 "an idle node" bash -c "sinfo -h -o %t | grep -qx idle"
else
    # what a node needs from the kernel, tried once: refused (a container without these namespaces) = exit 5
    nsenter --net="/run/netns/attrdist-$tag-n1" unshare --uts --mount --propagation private -- \
        sh -c 'hostname attrdist-try && mount -t tmpfs shm /dev/shm && mount --bind "$1" /etc/hosts' sh "$dir/hosts" \
        2>>"$dir/log/netns.log" || { log "cannot give a node its own hostname, /dev/shm and /etc/hosts (nsenter + unshare --uts --mount: $(tail -1 "$dir/log/netns.log"))"; exit 5; }
    for i in $(seq "$nodes"); do start_slurmd "$i"; done
    wait_for 30 "$nodes idle nodes" bash -c "[ \$(sinfo -h -N -t idle -o %N | sort -u | wc -l) = $nodes ]"
fi
log "up: export SLURM_CONF=$dir/slurm.conf   (stop: $0 stop $dir)"
echo "$dir/slurm.conf"
