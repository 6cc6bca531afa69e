"""`megammr` entry point. Each subcommand lives in its own module and is imported only when
used, so `megammr --help` stays fast and a GPU-only dependency never breaks another command.

A command module provides `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from megammr import __version__

# name -> (module, one-line help). Order is the order of `megammr --help`.
COMMANDS = {
    "version": ("megammr.version_cli", "print the package and key dependency versions"),
    "config": ("megammr.config_cli", "show a resolved recipe or the documented fields"),
    "train": ("megammr.train_cli", "run one GRPO phase of a recipe (torchrun/srun for several ranks)"),
    "plot": ("megammr.plot", "draw reward, accuracy, format, length and KL curves of a run to PNG"),
    "score": ("megammr.rewards.score_cli", "score responses in a JSONL file with the rule-based rewards"),
    "eval": ("megammr.eval.cli", "evaluate a model on MathVista / MathVerse / MathVision / OlympiadBench"),
    "data": ("megammr.data_cli", "import a public dataset (DeepScaleR, ViRL39K, LLaVA, any table) as records"),
    "curate": ("megammr.curate_cli", "keep the records whose pass rate (sampled, or a shipped column) is in a range"),
    "plan": ("megammr.plan_cli", "per-rank memory of a recipe's training step and rollout: fits, or what to change"),
    "bench": ("megammr.bench", "run a benchmark (kernels, data, rewards, step, curriculum, gpu-step)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megammr", description="Infi-MMR curriculum GRPO on megatron-core.")
    parser.add_argument("--version", action="version", version=f"megammr {__version__}",
                        help="print the version and exit (`megammr version` adds the dependencies)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_, add_help=False)
    return parser


def _show_recipe_warnings() -> None:
    """A RecipeWarning is one `megammr: warning: ...` line on stderr, once, from rank 0 only
    (under torchrun every rank loads the recipe)."""
    # lazy: the recipe schema (megammr.config, with YAML) is for commands; `megammr --help` and
    # `--version` import nothing of megammr but this module.
    from megammr.config import RecipeWarning
    shown: set[str] = set()
    plain = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, RecipeWarning):
            return plain(message, category, filename, lineno, file, line)
        if str(message) not in shown and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            shown.add(str(message))
            print(f"megammr: warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show
    warnings.simplefilter("always", RecipeWarning)  # dedup is ours: the default filter is per call site


def _main(argv) -> int:
    parser = build_parser()
    # Two passes: find the command, then let its module add its own arguments.
    if not argv:
        parser.print_help()
        return 2
    if argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help/--version exit 0; an unknown command exits 2 naming the choices
        return 2
    name = argv[0]
    _show_recipe_warnings()
    module_name = COMMANDS[name][0]
    mod = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"megammr {name}", description=COMMANDS[name][1])
    mod.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(mod.run(args) or 0)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`megammr config fields | head`): stop quietly, as a Unix tool does.
        # stdout is pointed at /dev/null so that the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # killed by SIGPIPE, as the shell reports it


if __name__ == "__main__":
    sys.exit(main())
