#!/usr/bin/env bash
# A real one-machine Slurm (munge + slurmctld + slurmd from Debian) for the tests in tests/slurm.
#   local_slurm.sh start   install the Debian packages if missing, write a config, start daemons
#   local_slurm.sh stop    cancel jobs, stop the daemons this script started (by pid file only)
# Needs root. State, logs and config live under $MEGAMMR_SLURM_DIR (default /tmp/megammr-slurm);
# clients find the config through SLURM_CONF, which callers export (printed by `start`).
# Settings that mattered on these machines: proctrack/linuxproc and task/none (no cgroups in the
# sandbox), NodeAddr=127.0.0.1, munge's socket in /run/munge.
set -euo pipefail
BASE=${MEGAMMR_SLURM_DIR:-/tmp/megammr-slurm}
ETC=$BASE/etc STATE=$BASE/state LOG=$BASE/log CONF=$BASE/etc/slurm.conf
export SLURM_CONF=$CONF
say() { echo "[local_slurm] $*" >&2; }
alive() { [[ -s $1 ]] && [[ -r /proc/$(<"$1")/comm ]] && [[ $(</proc/$(<"$1")/comm) == "$2"* ]]; }
stop_pid() {
  alive "$1" "$2" || return 0
  local p; p=$(<"$1"); kill -TERM "$p" || true
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$p" 2>/dev/null || true
}
retry() { local n=$1; shift; for _ in $(seq $((n * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }

start() {
  [[ $(id -u) == 0 ]] || { say "needs root"; exit 3; }
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
     || ! command -v sbatch >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge (apt)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  mkdir -p "$ETC" "$STATE/ctld" "$LOG"
  chown slurm:slurm "$STATE/ctld" "$LOG"
  local host hw
  host=$(hostname -s)
  hw=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //; s/ UpTime=.*//')
  cat > "$CONF" <<CONF
ClusterName=megammr
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
SlurmUser=slurm
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if ! alive /run/munge/munged.pid munged; then
    if [[ ! -s /etc/munge/munge.key ]]; then
      mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/munged.ours"
  fi
  retry 10 bash -c 'munge -n | unmunge' || { say "munge is not working"; exit 1; }
  if ! alive "$STATE/slurmctld.pid" slurmctld; then
    /usr/sbin/slurmctld -f "$CONF"
    retry 20 scontrol ping || { say "slurmctld not answering: $LOG/slurmctld.log"; exit 1; }
  fi
  if ! alive "$STATE/slurmd.pid" slurmd; then
    mkdir -p "$STATE/$host"
    /usr/sbin/slurmd -f "$CONF" -N "$host"
    retry 10 test -s "$STATE/slurmd.pid" || { say "slurmd failed: $LOG/slurmd.log"; exit 1; }
  fi
  for _ in $(seq 150); do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1)
    [[ $state == idle || $state == mixed || $state == allocated ]] && { echo "$CONF"; return 0; }
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 0.2
  done
  say "node not ready: $(sinfo -h -N -o '%N %T %E')"; exit 1
}

stop() {
  if alive "$STATE/slurmctld.pid" slurmctld; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] && scancel $jobs || true
  fi
  stop_pid "$STATE/slurmd.pid" slurmd
  stop_pid "$STATE/slurmctld.pid" slurmctld
  if [[ -e $STATE/munged.ours ]]; then stop_pid /run/munge/munged.pid munged; rm -f "$STATE/munged.ours"; fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
