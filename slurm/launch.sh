# Sourced by slurm/phase{1,2,3}.sbatch (which set MEGAMMR_PHASE): launches one phase of a
# curriculum on every node of the job, one task per GPU, and requeues the job when it was preempted.
#
# Settings (environment, all optional; sbatch passes the submitter's environment to the job):
#   MEGAMMR_RECIPE     curriculum file, or a recipe directory holding curriculum.yaml
#                      (default recipes/qwen2_5_vl_3b; relative paths are read from the job's working
#                      directory, i.e. where sbatch was run, or sbatch --chdir)
#   MEGAMMR_RUN_DIR    the curriculum's run directory (default: its curriculum.output_dir)
#   MEGAMMR_OVERRIDES  key=value overrides, space-separated; the script's own arguments are appended
#   MEGAMMR_PYTHON     the Python that has megammr installed (default python3 from PATH)
#   MEGAMMR_CONTAINER  a container image: tasks run in it through pyxis (srun --container-image);
#                      MEGAMMR_CONTAINER_MOUNTS is passed as --container-mounts
#   MEGAMMR_MAX_REQUEUES  give up after this many preemption requeues (default 50)
#   MASTER_ADDR / MASTER_PORT  default: the job's first node, and 20000 + job id % 20000
# Exit: 0 phase done; the trainer's code otherwise (2 recipe/input, 3 training stopped); a preempted
# run (trainer exit 75 after its checkpoint) is requeued with `scontrol requeue` and resumes from it.
set -uo pipefail

say() { echo "[megammr slurm] $*"; }
die() { echo "[megammr slurm] error: $1" >&2; exit "${2:-2}"; }

PHASE=${MEGAMMR_PHASE:?set by slurm/phaseK.sbatch}
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job: submit with sbatch slurm/phase$PHASE.sbatch"
RECIPE=${MEGAMMR_RECIPE:-recipes/qwen2_5_vl_3b}
[[ -d $RECIPE ]] && RECIPE=$RECIPE/curriculum.yaml
[[ -f $RECIPE ]] || die "MEGAMMR_RECIPE: $RECIPE not found (from $(pwd)); set it to a curriculum file or a recipes/<backbone> directory"
PYTHON=${MEGAMMR_PYTHON:-python3}
command -v "$PYTHON" >/dev/null || die "MEGAMMR_PYTHON: $PYTHON not found; point it at the Python that has megammr installed"

# shellcheck disable=SC2206  # word splitting is the documented format of MEGAMMR_OVERRIDES
set -f  # split, but do not glob: an override like data.datasets=[{path: x*}] stays as written
OVERRIDES=(${MEGAMMR_OVERRIDES:-} "$@")
set +f
[[ -n ${MEGAMMR_RUN_DIR:-} ]] && OVERRIDES+=("train.output_dir=$MEGAMMR_RUN_DIR")
TRAIN=(-m megammr train --phase "$PHASE" "$RECIPE" "${OVERRIDES[@]}")

# Fails at once, before any GPU is touched, when the recipe is wrong or phase K-1 is not done.
plan=$("$PYTHON" -m megammr train --plan --phase "$PHASE" "$RECIPE" "${OVERRIDES[@]}") ||
  die "phase $PHASE cannot start (message above)" 2
IFS=$'\t' read -r _ NAME STATE OUT_DIR <<<"$plan"

NODES=$(scontrol show hostnames "${SLURM_JOB_NODELIST}")
export MASTER_ADDR=${MASTER_ADDR:-$(head -n1 <<<"$NODES")}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
unset RANK WORLD_SIZE LOCAL_RANK  # the runtime reads srun's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
SRUN=(srun --kill-on-bad-exit=1 --label)
if [[ -n ${MEGAMMR_CONTAINER:-} ]]; then
  SRUN+=(--container-image="$MEGAMMR_CONTAINER" --container-workdir="$(pwd)")
  [[ -n ${MEGAMMR_CONTAINER_MOUNTS:-} ]] && SRUN+=(--container-mounts="$MEGAMMR_CONTAINER_MOUNTS")
fi

say "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}: phase $PHASE $NAME ($STATE) -> $OUT_DIR"
say "nodes ${SLURM_JOB_NUM_NODES:-1} [$(tr '\n' ' ' <<<"$NODES" | sed 's/ $//')], ${SLURM_NTASKS:-1} ranks" \
    "(${SLURM_NTASKS_PER_NODE:-?} per node), gpus per node ${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}," \
    "master $MASTER_ADDR:$MASTER_PORT"
say "recipe $RECIPE, overrides: ${OVERRIDES[*]:-(none)}"
say "python $(command -v "$PYTHON"); launch: ${SRUN[*]} $PYTHON ${TRAIN[*]}"

MARKER=$OUT_DIR/PREEMPTED
rm -f "$MARKER"
"${SRUN[@]}" "$PYTHON" "${TRAIN[@]}" &
pid=$!
# --signal=B:USR1@T reaches this shell only: pass it to the ranks (srun forwards it), which finish
# their step, checkpoint and exit 75. A TERM (scancel, or the time limit) is passed on as well,
# but then the job is ending for good: the checkpoint is kept and nothing is requeued.
cancelled=0
trap 'say "USR1: asking the ranks to checkpoint and stop"; kill -USR1 $pid 2>/dev/null' USR1
trap 'say "TERM: asking the ranks to checkpoint and stop (no requeue)"; cancelled=1; kill -TERM $pid 2>/dev/null' TERM
while kill -0 $pid 2>/dev/null; do wait $pid; done  # wait returns early when a trapped signal arrives
wait $pid
rc=$?
trap - USR1 TERM

if [[ $rc == 0 ]]; then
  say "phase $PHASE $NAME done: $OUT_DIR"
  exit 0
fi
if [[ $rc == 75 || -f $MARKER ]]; then
  # srun reports the highest exit code over the ranks: one still tearing down when
  # --kill-on-bad-exit struck shows as killed, so the trainer's marker is the evidence.
  if ((cancelled)); then
    say "preempted and cancelled: checkpoint kept in $OUT_DIR/checkpoints; resubmit to continue"
    exit 75
  fi
  if ((${SLURM_RESTART_COUNT:-0} >= ${MEGAMMR_MAX_REQUEUES:-50})); then
    die "preempted again after ${SLURM_RESTART_COUNT} requeues (MEGAMMR_MAX_REQUEUES=${MEGAMMR_MAX_REQUEUES:-50}): not requeueing" 75
  fi
  say "preempted (exit $rc, $(cat "$MARKER" 2>/dev/null || echo no marker)): requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed (sbatch --requeue needed?); resubmit to resume" 75
  exit 0
fi
die "phase $PHASE $NAME failed: exit $rc (see the ranks' messages above; not requeued)" "$rc"
