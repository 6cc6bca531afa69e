#!/usr/bin/env bash
# Submit Infi-MMR's three phases as three Slurm jobs chained with afterok dependencies.
#
#   slurm/submit_curriculum.sh RECIPE_DIR [RUN_DIR] [key=value ...]
#   slurm/submit_curriculum.sh recipes/qwen2_5_vl_7b /scratch/$USER/run1 train.steps=300
#
# RECIPE_DIR holds curriculum.yaml (or pass the curriculum file itself); RUN_DIR defaults to its
# curriculum.output_dir; overrides apply to every phase. Phase k+1 runs only if phase k completed
# (--dependency=afterok, --kill-on-invalid-dep=yes: a failed phase cancels the rest). A phase
# whose final checkpoint exists already (RUN_DIR/<phase>/DONE) is not submitted again, so rerunning
# the command continues a chain; a started phase resumes from its latest checkpoint.
# Extra sbatch options for every job: MEGAMMR_SBATCH_ARGS="--nodes=2 --partition=gpu --account=abc"
# (or sbatch's own SBATCH_* variables). Prints one job id per submitted phase.
set -euo pipefail
say() { echo "[megammr submit] $*"; }
die() { echo "[megammr submit] error: $*" >&2; exit 2; }

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RECIPE=$1; shift
[[ -d $RECIPE ]] && RECIPE=$RECIPE/curriculum.yaml
[[ -f $RECIPE ]] || die "$RECIPE: no curriculum file (expected RECIPE_DIR/curriculum.yaml)"
RUN_DIR=
if [[ $# -ge 1 && $1 != *=* ]]; then RUN_DIR=$1; shift; fi
OVERRIDES=("$@")
PYTHON=${MEGAMMR_PYTHON:-python3}
command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node"

plan_args=("${OVERRIDES[@]}")
[[ -n $RUN_DIR ]] && plan_args+=("train.output_dir=$RUN_DIR")
# Checks every phase's recipe before anything is queued.
plan=$("$PYTHON" -m megammr train --plan "$RECIPE" "${plan_args[@]}") || die "the curriculum does not load (message above)"
n=$(wc -l <<<"$plan")
((n <= 3)) || die "$RECIPE has $n phases; slurm/ has phase1..3.sbatch"

# shellcheck disable=SC2206  # word splitting is the documented format of MEGAMMR_SBATCH_ARGS
set -f
extra=(${MEGAMMR_SBATCH_ARGS:-})
set +f
dep= ids=()
while IFS=$'\t' read -r k name state out; do
  if [[ $state == done ]]; then
    say "phase $k $name: done already ($out/DONE), not submitted"
    continue
  fi
  args=(--parsable "${extra[@]}"
        --export="ALL,MEGAMMR_RECIPE=$RECIPE,MEGAMMR_RUN_DIR=${RUN_DIR},MEGAMMR_PYTHON=$PYTHON,MEGAMMR_SLURM_SCRIPTS=$here")
  [[ -n $dep ]] && args+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
  jid=$(sbatch "${args[@]}" "$here/phase$k.sbatch" "${OVERRIDES[@]}") || die "sbatch of phase $k failed"
  jid=${jid%%;*}  # --parsable prints "id[;cluster]"
  say "phase $k $name ($state): job $jid${dep:+ (after $dep)} -> $out"
  ids+=("$jid"); dep=$jid
done <<<"$plan"
((${#ids[@]})) || say "every phase is done"
echo "${ids[*]}"
