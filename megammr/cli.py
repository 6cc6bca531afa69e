"""`megammr` entry point. Each subcommand lives in its own module and is imported only when
used, so `megammr --help` stays fast and a GPU-only dependency never breaks another command.

A command module provides `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order of `megammr --help`.
COMMANDS = {
    "version": ("megammr.version_cli", "print the package and key dependency versions"),
    "config": ("megammr.config_cli", "show a resolved recipe or the documented fields"),
    "train": ("megammr.train_cli", "run one GRPO phase of a recipe (torchrun/srun for several ranks)"),
    "plot": ("megammr.plot", "draw reward, accuracy, format, length and KL curves of a run to PNG"),
    "score": ("megammr.rewards.score_cli", "score responses in a JSONL file with the rule-based rewards"),
    "eval": ("megammr.eval.cli", "evaluate a model on MathVista / MathVerse / MathVision / OlympiadBench"),
    "bench": ("megammr.bench", "run a benchmark (kernels, data, rewards, step)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megammr", description="Infi-MMR curriculum GRPO on megatron-core.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Two passes: find the command, then let its module add its own arguments.
    if not argv:
        parser.print_help()
        return 2
    if argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help exits 0; an unknown command exits 2 naming the choices
        return 2
    name = argv[0]
    module_name = COMMANDS[name][0]
    mod = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"megammr {name}", description=COMMANDS[name][1])
    mod.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
