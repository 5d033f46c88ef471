#!/usr/bin/env bash
# Start a throwaway single-node SLURM with accounting on this machine (root, Debian/Ubuntu, no
# systemd needed): munged, MariaDB, slurmdbd, slurmctld, slurmd. For tests and for trying
# `launcher=slurm` without a cluster; stop it with scripts/slurm_local_stop.sh.
#
#   apt-get install -y slurm-wlm munge slurmdbd mariadb-server   # once (or: --install)
#   scripts/slurm_local_start.sh [--install]
#
# Everything it writes lives under $TRIADAPT_SLURM_DIR (default /tmp/triadapt-slurm), except the
# MariaDB database `triadapt_slurm_acct` and the link /etc/slurm/slurm.conf -> that folder (made
# only when no slurm.conf exists, so the plain SLURM commands find the cluster). One partition,
# `cpu` (the default), holds this node with all its cores and no GPUs.
# Exit 0 once `sinfo` shows the node idle; otherwise one `error: ...` line and exit 1.
set -euo pipefail

STATE=${TRIADAPT_SLURM_DIR:-/tmp/triadapt-slurm}
CLUSTER=triadapt
DB=triadapt_slurm_acct
ETC_CONF=/etc/slurm/slurm.conf

die() { echo "error: $*" >&2; exit 1; }

if [ "${1:-}" = "--install" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null \
    || die "apt-get install slurm-wlm munge slurmdbd mariadb-server failed"
elif [ -n "${1:-}" ]; then
  die "unknown option $1 (usage: $0 [--install])"
fi

[ "$(id -u)" = 0 ] || die "run as root (the daemons run as root/munge on this throwaway cluster)"
for cmd in munged slurmctld slurmd slurmdbd sinfo sacctmgr mysql; do
  command -v "$cmd" >/dev/null || PATH=$PATH:/usr/sbin command -v "$cmd" >/dev/null \
    || die "$cmd not found; install with: apt-get install -y slurm-wlm munge slurmdbd mariadb-server (or pass --install)"
done
export PATH=$PATH:/usr/sbin
if [ -e "$ETC_CONF" ] && [ "$(readlink "$ETC_CONF" || true)" != "$STATE/slurm.conf" ]; then
  die "$ETC_CONF exists and is not this script's; refusing to start a second SLURM on a configured machine"
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "$what did not come up within ${t}s (logs: $STATE/log/)"
}

mkdir -p "$STATE"/{log,ctld,spool,run}
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

cat >"$STATE/slurm.conf" <<EOF
# Written by scripts/slurm_local_start.sh: a throwaway single-node cluster.
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job may start again after 10 s instead of ~120 s.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# No cgroups on these machines.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
# submitit polls job states with sacct: accounting is required.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# A job asking for more than the node has fails at sbatch instead of pending forever.
EnforcePartLimits=ALL
ReturnToService=2
# Look at pending jobs every 5 s (default 60 s): a requeued job starts again promptly.
SchedulerParameters=sched_interval=5
KillWait=10
# A job may overrun its time limit by one minute before it is killed (the limit and SLURM's
# warning before it stay as asked): room for the tests' 1-minute jobs to finish their last try.
OverTimeLimit=1
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

cat >"$STATE/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=$DB
EOF
chmod 600 "$STATE/slurmdbd.conf"
ln -sfn "$STATE/slurm.conf" "$ETC_CONF"

# munge (Debian creates /etc/munge/munge.key with the package)
[ -f /etc/munge/munge.key ] || mungekey --create >/dev/null
install -d -o munge -g munge -m 0755 /run/munge
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid || die "munged did not start"
  touch "$STATE/run/munged.ours"  # the stop script stops only what this script started
fi
wait_for 10 munged munge -n

# MariaDB, reached by slurmdbd as root over the local socket
if ! mysqladmin ping >/dev/null 2>&1; then
  /etc/init.d/mariadb start >"$STATE/log/mariadb-start.log" 2>&1 || die "MariaDB did not start ($STATE/log/mariadb-start.log)"
  touch "$STATE/run/mariadb.ours"
fi
wait_for 30 MariaDB mysqladmin ping
mysql -e "CREATE DATABASE IF NOT EXISTS $DB" || die "cannot create the accounting database $DB"

export SLURM_CONF="$STATE/slurm.conf"
alive "$STATE/run/slurmdbd.pid" || slurmdbd  # reads slurmdbd.conf next to $SLURM_CONF
wait_for 30 slurmdbd sacctmgr -n list cluster
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
alive "$STATE/run/slurmctld.pid" || slurmctld -f "$STATE/slurm.conf"
wait_for 30 slurmctld scontrol ping
alive "$STATE/run/slurmd.pid" || slurmd -f "$STATE/slurm.conf"
node_idle() { sinfo -h -N -o %t | grep -qx 'idle'; }
wait_for 30 "slurmd (node idle in sinfo)" node_idle
echo "SLURM up: cluster $CLUSTER, partition cpu, node $host ($cpus CPUs, ${mem_mb} MB); state in $STATE"
