#!/usr/bin/env bash
# Stops the daemons that start-local-slurm.sh started, by their pid files, after cancelling the test
# cluster's remaining jobs. Idempotent: a daemon that is not running is skipped. --keep-munge leaves
# munged running (used for a restart).
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

# Jobs still on the test cluster are cancelled first: their slurmstepd would outlive slurmd otherwise.
if [ -s "$RUN_DIR/slurmctld.pid" ] && command -v squeue >/dev/null 2>&1; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    timeout 10 scancel $jobs 2>/dev/null
    for _ in $(seq 1 30); do
      [ -z "$(timeout 10 squeue -h -t running,completing,configuring -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

stop "$RUN_DIR/slurmd.pid" slurmd
stop "$RUN_DIR/slurmctld.pid" slurmctld
[ "$keep_munge" = 1 ] || stop /run/munge/munged.pid munged
exit 0
