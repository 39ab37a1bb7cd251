#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py (Debian 12, root, no systemd).
#
#   bash tests/slurm/start-local-slurm.sh    # install if needed, configure, start, wait for the node
#   bash tests/slurm/stop-local-slurm.sh     # stop the daemons again
#
# The node is named after `hostname`, has the CPUs and memory that `slurmd -C` finds and two fake GPUs
# (gres gpu:fake:2 backed by /dev/null and /dev/zero), so jobs asking for --gpus=1 are scheduled like on a GPU
# node, two at a time (the cluster tests run side by side under pytest-xdist).
# Two partitions share the node: `cpu` (the default) and `gpu`. There is no slurmdbd: `sacct` does not
# work, so Snakemake must query job states with squeue (--slurm-status-command squeue).
#
# Idempotent: packages are installed only when missing, the config is rewritten, and daemons that are
# already running (pid file + live process) are left alone. Exit codes: 0 ready, 2 not root,
# 3 packages could not be installed, 4 the node did not become idle in time.
set -euo pipefail

CONF_DIR=/etc/slurm
RUN_DIR=/run/slurm-local            # pid files
LOG_DIR=/var/log/slurm-local
STATE_DIR=/var/spool/slurm-local    # slurmctld state and slurmd spool
WAIT_SECONDS=${SLURM_LOCAL_WAIT:-60}

log() { echo "[start-local-slurm] $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  log "must run as root (installs Debian packages and starts daemons)"
  exit 2
fi

# 1. packages
need=()
for bin in slurmctld slurmd sinfo munged; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing slurmctld slurmd slurm-client munge (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # Without systemd the maintainer scripts may try to start services; they fail harmlessly or not at
  # all, and we start the daemons ourselves below.
  if ! apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >"/tmp/slurm-local-apt.log" 2>&1; then
    apt-get update -q >>"/tmp/slurm-local-apt.log" 2>&1 || true
    if ! apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >>"/tmp/slurm-local-apt.log" 2>&1; then
      log "apt-get install failed, see /tmp/slurm-local-apt.log"
      tail -20 /tmp/slurm-local-apt.log >&2 || true
      exit 3
    fi
  fi
fi

mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" /run/munge /var/log/munge /var/lib/munge /etc/munge

# 2. munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile /etc/munge/munge.key --force
  else
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
fi
if id munge >/dev/null 2>&1; then
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  MUNGE_USER=munge
else
  MUNGE_USER=root
fi
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge

alive() {  # alive PIDFILE NAME: the pid in the file is a running process with that command name
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  :  # a munged is already answering (ours from an earlier start, or the system's)
elif ! alive /run/munge/munged.pid munged; then
  log "starting munged"
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  if [ "$MUNGE_USER" = munge ]; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  else
    /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
  fi
fi
for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { log "munge does not work"; exit 3; }

# 3. configuration
HOST=$(hostname -s)
# slurmd -C prints this machine's real node line, e.g.
# NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
NODE_HW=$(slurmd -C 2>/dev/null | head -1 | sed -e 's/^NodeName=[^ ]* //')
if [ -z "$NODE_HW" ]; then
  NODE_HW="CPUs=$(nproc) RealMemory=$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)"
fi
# keep a little memory back so the node never drains for "Low RealMemory"
REAL_MEM=$(echo "$NODE_HW" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
NODE_HW=$(echo "$NODE_HW" | sed "s/RealMemory=[0-9]*/RealMemory=$((REAL_MEM * 95 / 100))/")

cat >"$CONF_DIR/slurm.conf.new" <<EOF
# Written by tests/slurm/start-local-slurm.sh: a one-node test cluster, no accounting database.
ClusterName=localtest
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# keep finished jobs visible to squeue/scontrol for 10 minutes (the status queries need them)
MinJobAge=600
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$HOST $NODE_HW Gres=gpu:fake:2 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF
cat >"$CONF_DIR/gres.conf.new" <<EOF
# Two fake GPUs: slurmd only needs a device file for each; jobs get CUDA_VISIBLE_DEVICES for theirs.
NodeName=$HOST Name=gpu Type=fake File=/dev/null
NodeName=$HOST Name=gpu Type=fake File=/dev/zero
EOF
# cgroup.conf would make slurmd load the cgroup plugin, which needs systemd/cgroupfs we do not manage
rm -f "$CONF_DIR/cgroup.conf"

changed=0
for f in slurm.conf gres.conf; do
  if ! cmp -s "$CONF_DIR/$f.new" "$CONF_DIR/$f"; then changed=1; mv "$CONF_DIR/$f.new" "$CONF_DIR/$f"; else rm -f "$CONF_DIR/$f.new"; fi
done

# 4. daemons
if [ "$changed" = 1 ] && { alive "$RUN_DIR/slurmctld.pid" slurmctld || alive "$RUN_DIR/slurmd.pid" slurmd; }; then
  log "configuration changed: restarting the daemons"
  bash "$(dirname "$0")/stop-local-slurm.sh" --keep-munge
fi
if ! alive "$RUN_DIR/slurmctld.pid" slurmctld; then
  log "starting slurmctld"
  rm -f "$RUN_DIR/slurmctld.pid"
  # -c: ignore saved state (jobs of an earlier run), -i: ignore errors reading it
  slurmctld -c -i
fi
for _ in $(seq 1 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! alive "$RUN_DIR/slurmd.pid" slurmd; then
  log "starting slurmd"
  rm -f "$RUN_DIR/slurmd.pid"
  slurmd
fi

# 5. wait until the node is idle (bounded)
deadline=$((SECONDS + WAIT_SECONDS))
while :; do
  state=$(sinfo -h -n "$HOST" -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')
  case "$state" in
    *idle*|*mix*|*alloc*) break ;;
    *drain*|*down*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "node $HOST not idle after ${WAIT_SECONDS}s (state: ${state:-none})"
    sinfo -N -l >&2 || true
    tail -20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    exit 4
  fi
  sleep 1
done
log "ready: node $HOST ($state) partitions: $(sinfo -h -o '%P' | tr '\n' ' ')"
