#!/usr/bin/env bash
# A real one-machine Slurm (munge + slurmctld + slurmd from Debian) for the tests in tests/slurm.
#   local_slurm.sh start   install the Debian packages if missing, write a config, start daemons
#   local_slurm.sh stop    cancel jobs, stop the daemons this script started (by pid file only)
# Needs root. State, logs and config live under $MEGAMMR_LOCAL_SLURM (default /tmp/megammr-slurm);
# clients find the config through SLURM_CONF, which callers export (printed by `start`).
#
# The cluster looks like a small GPU cluster so that slurm/*.sbatch, written for one, run unchanged:
# $MEGAMMR_SLURM_NODES nodes n1..nN (default 2), each its own slurmd on 127.0.0.1 (ports 6821..),
# advertising $MEGAMMR_SLURM_CPUS cores (default 4) and gpu:$MEGAMMR_SLURM_GPUS (default 2) backed
# by /dev/null aliases (no CUDA behind them: jobs run on CPU with gloo). The node names are added
# to /etc/hosts (marked lines, removed by `stop`) so jobs can resolve MASTER_ADDR=n1.
# Settings that mattered on these machines: proctrack/linuxproc and task/none (no cgroups in the
# sandbox), NodeAddr=127.0.0.1, munge's socket in /run/munge, config_overrides for the fake sizes.
set -euo pipefail
BASE=${MEGAMMR_LOCAL_SLURM:-/tmp/megammr-slurm}
ETC=$BASE/etc STATE=$BASE/state LOG=$BASE/log CONF=$BASE/etc/slurm.conf
NODES=${MEGAMMR_SLURM_NODES:-2} CPUS=${MEGAMMR_SLURM_CPUS:-4} GPUS=${MEGAMMR_SLURM_GPUS:-2}
HOSTS_MARK="# megammr local_slurm.sh"
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
names() { for ((n = 1; n <= NODES; n++)); do echo "n$n"; done; }

start() {
  [[ $(id -u) == 0 ]] || { say "needs root"; exit 3; }
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
     || ! command -v sbatch >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge (apt)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  mkdir -p "$ETC" "$STATE/ctld" "$LOG" "$BASE/fakedev"
  chown slurm:slurm "$STATE/ctld" "$LOG"
  local host mem g
  host=$(hostname -s)
  mem=$(slurmd -C | head -n1 | grep -oP 'RealMemory=\K[0-9]+')
  for ((g = 0; g < GPUS; g++)); do
    [[ -c $BASE/fakedev/gpu$g ]] || { rm -f "$BASE/fakedev/gpu$g"; mknod -m 666 "$BASE/fakedev/gpu$g" c 1 3; }
  done
  echo "NodeName=n[1-$NODES] Name=gpu File=$BASE/fakedev/gpu[0-$((GPUS - 1))]" > "$ETC/gres.conf"
  cat > "$CONF.new" <<CONF
ClusterName=megammr
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
SlurmUser=slurm
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
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
GresTypes=gpu
SlurmdParameters=config_overrides
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=[6821-$((6820 + NODES))] CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$((mem / NODES)) Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  if ! cmp -s "$CONF.new" "$CONF"; then  # a changed layout: restart the daemons (queue state kept)
    mv "$CONF.new" "$CONF"
    for f in "$STATE"/slurmd-*.pid; do [[ -e $f ]] && stop_pid "$f" slurmd; done
    stop_pid "$STATE/slurmctld.pid" slurmctld
  else
    rm -f "$CONF.new"
  fi
  local missing; missing=$(for n in $(names); do getent hosts "$n" >/dev/null || echo -n "$n "; done)
  [[ -z $missing ]] || echo "127.0.0.1 $missing $HOSTS_MARK" >> /etc/hosts
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
  for n in $(names); do
    alive "$STATE/slurmd-$n.pid" slurmd && continue
    mkdir -p "$STATE/$n"
    /usr/sbin/slurmd -f "$CONF" -N "$n"
    retry 10 test -s "$STATE/slurmd-$n.pid" || { say "slurmd $n failed: $LOG/slurmd-$n.log"; exit 1; }
  done
  for _ in $(seq 150); do
    if [[ -z $(sinfo -h -N -o '%N %T' 2>/dev/null | grep -vE ' (idle|mixed|allocated|completing)$') ]] \
       && [[ -n $(sinfo -h -N -o '%N' 2>/dev/null) ]]; then
      echo "$CONF"; return 0
    fi
    for n in $(sinfo -h -N -t drain,down -o %N 2>/dev/null); do scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true; done
    sleep 0.2
  done
  say "nodes not ready: $(sinfo -h -N -o '%N %T %E' | tr '\n' ';')"; exit 1
}

stop() {
  if alive "$STATE/slurmctld.pid" slurmctld; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    [[ -n ${jobs// /} ]] && scancel $jobs || true
    for _ in $(seq 50); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
  fi
  for f in "$STATE"/slurmd-*.pid; do [[ -e $f ]] && stop_pid "$f" slurmd; done
  stop_pid "$STATE/slurmctld.pid" slurmctld
  if [[ -e $STATE/munged.ours ]]; then stop_pid /run/munge/munged.pid munged; rm -f "$STATE/munged.ours"; fi
  if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    # /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file
    grep -v "$HOSTS_MARK" /etc/hosts > "$BASE/hosts.tmp"; cat "$BASE/hosts.tmp" > /etc/hosts; rm -f "$BASE/hosts.tmp"
  fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
