#!/usr/bin/env bash
# Stop the throwaway SLURM of scripts/slurm_local_start.sh: each daemon by the PID in its pid file
# (slurmd, slurmctld, slurmdbd), then MariaDB and munged if it started them. Jobs still running are killed with slurmd.
#   scripts/slurm_local_stop.sh [--purge]    # --purge: also delete its state folder, database and /etc link
set -uo pipefail

STATE=${TRIADAPT_SLURM_DIR:-/tmp/triadapt-slurm}
DB=triadapt_slurm_acct
ETC_CONF=/etc/slurm/slurm.conf
export PATH=$PATH:/usr/sbin

stop_pid_file() {  # stop_pid_file NAME FILE: SIGTERM, wait up to 15 s, then SIGKILL
  local name=$1 file=$2 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; echo "$name ($pid) killed"; else echo "$name ($pid) stopped"; fi
  fi
  rm -f "$file"
}

stop_pid_file slurmd "$STATE/run/slurmd.pid"
stop_pid_file slurmctld "$STATE/run/slurmctld.pid"
stop_pid_file slurmdbd "$STATE/run/slurmdbd.pid"
if [ "${1:-}" = "--purge" ] && mysqladmin ping >/dev/null 2>&1; then
  mysql -e "DROP DATABASE IF EXISTS $DB"
fi
# MariaDB and munged only if the start script started them.
if [ -f "$STATE/run/mariadb.ours" ] && mysqladmin ping >/dev/null 2>&1; then
  /etc/init.d/mariadb stop >/dev/null 2>&1 && echo "MariaDB stopped"
fi
rm -f "$STATE/run/mariadb.ours"
[ -f "$STATE/run/munged.ours" ] && stop_pid_file munged /run/munge/munged.pid
rm -f "$STATE/run/munged.ours"
if [ "${1:-}" = "--purge" ]; then
  [ "$(readlink "$ETC_CONF" || true)" = "$STATE/slurm.conf" ] && rm -f "$ETC_CONF"
  rm -rf "$STATE"
  echo "removed $STATE"
fi
