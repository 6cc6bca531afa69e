"""`megammr train RECIPE [key=value ...]`: one phase of GRPO (under torchrun / srun for several ranks).

Exit codes: 0 done; 2 a recipe or input the run cannot honour (the message names the field);
3 training stopped (e.g. train.max_bad_steps non-finite steps in a row); 75 preempted (SIGTERM or
SIGUSR1): the step finished, a checkpoint was written, rerunning the command resumes.
"""
from __future__ import annotations

import os
import sys
import warnings

from megammr import curriculum
from megammr.config import RecipeError, load_recipe

# lazy in this module: torch and the trainer's modules, in run(), so that `megammr train --help`
# stays fast, and only after the warning filters below are set (megatron-core warns at import).


def add_arguments(p):
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/tiny/phase1.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.steps=3")
    p.add_argument("--phase", metavar="K", help="curriculum only: run phase K alone (1-based index or phase name); "
                   "phase K-1 must be done (one Slurm job per phase: slurm/phaseK.sbatch)")
    p.add_argument("--plan", action="store_true", help="curriculum only: print each phase's index, name, state "
                   "(done/started/todo) and directory, check the recipes, and exit")


def _say(msg, kind: str = "error") -> None:
    """One `megammr train: KIND: ...` line per problem (`msg`: a message or a RecipeError)."""
    # Under torchrun every rank would print the same error: rank 0 speaks for the job.
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        for line in getattr(msg, "errors", None) or [str(msg)]:
            print(f"megammr train: {kind}: {line}", file=sys.stderr, flush=True)


def _next_steps(phases: list) -> None:
    """What was done and what to run next, on stdout (rank 0): the last lines a first run shows."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        return
    last = phases[-1].recipe.train
    root = os.path.dirname(last.output_dir.rstrip("/")) if len(phases) > 1 else last.output_dir
    weights = os.path.join(last.output_dir, "hf") if last.export_hf else os.path.join(last.output_dir, "checkpoints")
    names = ", ".join(f"{p.name} ({p.recipe.train.steps} steps)" for p in phases)
    lines = [f"megammr train: done: {names} in {root}; final weights {weights}",
             f"next: megammr plot {root}   # reward, accuracy, format, length and KL curves"]
    if last.export_hf:
        lines.append(f"      megammr eval --model {weights} --bench mathvista --data testmini.json   # README: evaluation")
    print("\n".join(lines), flush=True)


def _quiet_cpu_warnings() -> None:
    """megatron-core warns at import, once per module, that TE/Apex are absent: expected on CPU
    (the local spec and torch fallbacks are what the CPU path uses), so not worth 7 lines per rank."""
    for msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{msg}.*")


def _quiet_library_warnings() -> None:
    """megatron-core's own use of deprecated torch.distributed.checkpoint APIs: nothing a user can act on."""
    for msg in ("`load_state_dict` is deprecated", "Please use DTensor instead", "`save_state_dict` is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{msg}.*")


def run(args) -> int:
    import torch
    if not torch.cuda.is_available():
        _quiet_cpu_warnings()
    _quiet_library_warnings()
    from megammr.data.loader import DataConfigError, DataStateError
    from megammr.models.checkpoint_io import CheckpointError
    from megammr.runtime import dist_env_from
    from megammr.train.setup import check_recipe
    world = dist_env_from(os.environ).world_size
    try:
        if curriculum.is_curriculum(args.recipe):
            if args.plan:  # no launch checks: scripts call it from a login node (world size 1)
                print(curriculum.plan(args.recipe, args.overrides, args.phase), flush=True)
                return 0
            phases = curriculum.load(args.recipe, args.overrides)
            # a lone phase (--phase K) needs phase K-1 done
            phases = [phases[i] for i in curriculum.select(args.recipe, phases, args.phase)]
            job = lambda: curriculum.run(args.recipe, args.overrides, args.phase)  # noqa: E731
        elif args.phase or args.plan:
            raise RecipeError(f"{args.recipe}: --phase and --plan need a curriculum file "
                              "(recipes/<backbone>/curriculum.yaml)")
        else:
            recipe = load_recipe(args.recipe, args.overrides)
            phases = [curriculum.Phase(recipe.phase.name, recipe, recipe.train.output_dir)]
            job = lambda: train(recipe)  # noqa: E731
        # What this launch cannot honour (world size, DP split, run-time fields), for every phase
        # up front: a problem of phase 3 must not surface after phases 1 and 2 have trained.
        problems: dict[str, list[str]] = {}
        for ph in phases:
            try:
                check_recipe(ph.recipe, world, torch.cuda.is_available())
            except RecipeError as e:
                for line in e.errors:
                    problems.setdefault(line, []).append(ph.name)
        if problems:
            raise RecipeError([line if len(names) == len(phases) else f"{', '.join(names)}: {line}"
                               for line, names in problems.items()])
    except RecipeError as e:
        _say(e)
        return 2
    from megammr.curate import CurateError
    from megammr.train.checkpoint import PREEMPTED_EXIT
    from megammr.trainer import Preempted, TrainingError, train
    try:
        job()
    except Preempted as e:
        _say(str(e), "preempted")
        return PREEMPTED_EXIT
    except (RecipeError, DataConfigError, DataStateError, CheckpointError, CurateError) as e:
        _say(e)
        return 2
    except TrainingError as e:
        _say(e)
        return 3
    _next_steps(phases)
    return 0
