"""`megammr config show RECIPE [key=value ...]` and `megammr config fields`.

`show` prints the fully resolved recipe, or for a curriculum file every phase's recipe (one YAML
document each, as `megammr train` would run them). Every problem of the file and the overrides is
reported, one line each, exit code 2.
"""
from __future__ import annotations

import sys

from megammr import curriculum
from megammr.config.load import field_docs, load_recipe, to_yaml
from megammr.config.schema import RecipeError


def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="print the fully resolved recipe (every phase of a curriculum) as YAML")
    show.add_argument("recipe", help="recipe YAML (may use extends:) or a curriculum file")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value", help="typed overrides, applied last")
    show.add_argument("--world-size", type=int, default=None, metavar="N",
                      help="also check the data-parallel split for N processes (tp x pp x cp x dp)")
    sub.add_parser("fields", help="list every recipe field with its type, default and meaning")


def errors_of(e: RecipeError, prog: str = "megammr") -> str:
    """One `PROG: error: ...` line per problem."""
    return "".join(f"{prog}: error: {line}\n" for line in e.errors)


def run(args) -> int:
    if args.action == "fields":
        for key, tp, default, help_ in field_docs():
            print(f"{key:32s} {tp:40s} default={default!r}\n    {help_}")
        return 0
    if args.world_size is not None and args.world_size < 1:
        print(f"megammr: error: --world-size must be >= 1, got {args.world_size}", file=sys.stderr)
        return 2
    try:
        if curriculum.is_curriculum(args.recipe):
            phases = curriculum.load(args.recipe, args.overrides, world_size=args.world_size)
            text = "".join(f"--- # {p.name}: {p.output_dir}\n{to_yaml(p.recipe)}" for p in phases)
        else:
            text = to_yaml(load_recipe(args.recipe, args.overrides, world_size=args.world_size))
    except RecipeError as e:
        sys.stderr.write(errors_of(e))
        return 2
    sys.stdout.write(text)
    return 0
