#!/usr/bin/env bash
# Stops the daemons that start-local-slurm.sh started, by their pid files. Idempotent: a daemon that is
# not running is skipped. --keep-munge leaves munged running (used for a restart).
set -uo pipefail

RUN_DIR=/run/slurm-local
keep_munge=0
[ "${1:-}" = "--keep-munge" ] && keep_munge=1

log() { echo "[stop-local-slurm] $*" >&2; }

stop() {  # stop PIDFILE NAME
  local pidfile=$1 name=$2 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]; then
    log "stopping $name ($pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then
      log "$name ($pid) still running after 10 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  rm -f "$pidfile"
}

stop "$RUN_DIR/slurmd.pid" slurmd
stop "$RUN_DIR/slurmctld.pid" slurmctld
[ "$keep_munge" = 1 ] || stop /run/munge/munged.pid munged
exit 0
