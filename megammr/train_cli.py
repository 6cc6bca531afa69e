"""`megammr train RECIPE [key=value ...]`: one phase of GRPO (under torchrun / srun for several ranks).

Exit codes: 0 done; 2 a recipe or input the run cannot honour (the message names the field);
3 training stopped (e.g. train.max_bad_steps non-finite steps in a row); 75 preempted (SIGTERM or
SIGUSR1): the step finished, a checkpoint was written, rerunning the command resumes.
"""
from __future__ import annotations

import os
import sys


def add_arguments(p):
    p.add_argument("recipe", help="recipe YAML (e.g. recipes/tiny/phase1.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.steps=3")
    p.add_argument("--phase", metavar="K", help="curriculum only: run phase K alone (1-based index or phase name); "
                   "phase K-1 must be done (one Slurm job per phase: slurm/phaseK.sbatch)")
    p.add_argument("--plan", action="store_true", help="curriculum only: print each phase's index, name, state "
                   "(done/started/todo) and directory, check the recipes, and exit")


def _say(msg: str, kind: str = "error") -> None:
    # Under torchrun every rank would print the same error: rank 0 speaks for the job.
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"megammr train: {kind}: {msg}", file=sys.stderr, flush=True)


def _quiet_cpu_warnings() -> None:
    """megatron-core warns at import, once per module, that TE/Apex are absent: expected on CPU
    (the local spec and torch fallbacks are what the CPU path uses), so not worth 7 lines per rank."""
    import warnings
    for msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{msg}.*")


def _quiet_library_warnings() -> None:
    """megatron-core's own use of deprecated torch.distributed.checkpoint APIs: nothing a user can act on."""
    import warnings
    for msg in ("`load_state_dict` is deprecated", "Please use DTensor instead", "`save_state_dict` is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{msg}.*")


def run(args) -> int:
    import torch
    if not torch.cuda.is_available():
        _quiet_cpu_warnings()
    _quiet_library_warnings()
    from megammr import curriculum
    from megammr.config import RecipeError, load_recipe
    from megammr.data.loader import DataConfigError, DataStateError
    from megammr.models.mapping import CheckpointError

    try:
        if curriculum.is_curriculum(args.recipe):
            if args.plan:
                print(curriculum.plan(args.recipe, args.overrides, args.phase), flush=True)
                return 0
            # every phase's recipe checked up front, and a lone phase's predecessor is done
            curriculum.select(args.recipe, curriculum.load(args.recipe, args.overrides), args.phase)
            job = lambda: curriculum.run(args.recipe, args.overrides, args.phase)  # noqa: E731
        elif args.phase or args.plan:
            raise RecipeError(f"{args.recipe}: --phase and --plan need a curriculum file "
                              "(recipes/<backbone>/curriculum.yaml)")
        else:
            recipe = load_recipe(args.recipe, args.overrides)
            job = lambda: train(recipe)  # noqa: E731
    except RecipeError as e:
        _say(str(e))
        return 2
    from megammr.train.checkpoint import PREEMPTED_EXIT
    from megammr.trainer import Preempted, TrainingError, train
    try:
        job()
    except Preempted as e:
        _say(str(e), "preempted")
        return PREEMPTED_EXIT
    except (RecipeError, DataConfigError, DataStateError, CheckpointError) as e:
        _say(str(e))
        return 2
    except TrainingError as e:
        _say(str(e))
        return 3
    return 0
