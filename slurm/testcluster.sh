#!/usr/bin/env bash
# A real single-node SLURM cluster (Debian's slurmctld, slurmd, slurmdbd + MariaDB, munge) in a
# scratch directory, for tests and for trying `launch slurm` on one machine. Root, no systemd, no
# cgroups. Everything it starts is stopped by pid with `stop`.
#
#   slurm/testcluster.sh start /tmp/slurm-test     # installs packages if missing; ~15 s to an idle node
#   export SLURM_CONF=/tmp/slurm-test/slurm.conf    # then: sinfo, sbatch, submitit ...
#   slurm/testcluster.sh stop /tmp/slurm-test      # cancels every job, then stops the daemons it started
#
# Partitions: `debug` (default), `low` (preemptable: REQUEUE, GraceTime 30 s) and `high` (PriorityTier
# 10, preempts `low`). Scheduler intervals are 2 s and credentials expire after 10 s, so requeued jobs
# restart in seconds (Slurm's defaults make that ~2 minutes). See ../shared/spec/slurm-testcluster.md.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

log() { echo "testcluster: $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq $((limit * 10))); do
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
    for wave in "slurmd slurmctld" "slurmdbd mariadbd munged"; do
        pids=()
        for name in $wave; do
            f="$dir/run/$name.pid"
            [ -f "$f" ] || continue
            pid=$(cat "$f"); rm -f "$f"
            kill "$pid" 2>/dev/null && pids+=("$pid")
        done
        for pid in "${pids[@]}"; do
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        done
    done
    if [ -f "$dir/run/munge-dir" ]; then rm -rf "$(cat "$dir/run/munge-dir")" "$dir/run/munge-dir"; fi
    log "stopped ($dir)"
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
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
if ! getent hosts "$host" >/dev/null; then
    echo "127.0.0.1 $host" >>/etc/hosts  # torch.distributed hangs on an unresolvable master address
fi
mkdir -p "$dir"/{run,log,state,spool,db}
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
runuser -u munge -- /usr/sbin/munged --key-file="$key" --socket="$sock" --pid-file="$mdir/munged.pid" \
    --log-file="$mdir/munged.log" --seed-file="$mdir/munged.seed" --force
cp "$mdir/munged.pid" "$dir/run/munged.pid"

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
cat >"$dir/slurm.conf" <<EOF
ClusterName=attrdist
SlurmctldHost=localhost
SlurmctldPort=$ctlport
SlurmdPort=$((ctlport + 1))
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
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
NodeName=$host NodeAddr=127.0.0.1 CPUs=$((cpus < 4 ? 4 : cpus)) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=low Nodes=$host MaxTime=INFINITE State=UP PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=10
EOF
export SLURM_CONF="$dir/slurm.conf"

slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
wait_for 30 "slurmdbd" sacctmgr -n list cluster
sacctmgr -i add cluster attrdist >/dev/null 2>&1 || true
slurmctld -f "$dir/slurm.conf"
wait_for 30 "slurmctld" bash -c "scontrol ping | grep -q UP"
slurmd -f "$dir/slurm.conf"
wait_for 30 "an idle node" bash -c "sinfo -h -o %t | grep -qx idle"
log "up: export SLURM_CONF=$dir/slurm.conf   (stop: $0 stop $dir)"
echo "$dir/slurm.conf"
