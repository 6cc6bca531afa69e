"""`megammr config show RECIPE [key=value ...]` and `megammr config fields`."""
from __future__ import annotations

import sys

from megammr.config import RecipeError, field_docs, load_recipe, to_yaml


def add_arguments(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="print the fully resolved recipe as YAML")
    show.add_argument("recipe", help="recipe YAML (may use extends:)")
    show.add_argument("overrides", nargs="*", metavar="key.sub=value", help="typed overrides, applied last")
    sub.add_parser("fields", help="list every recipe field with its type, default and meaning")


def run(args) -> int:
    if args.action == "fields":
        for key, tp, default, help_ in field_docs():
            print(f"{key:32s} {tp:40s} default={default!r}\n    {help_}")
        return 0
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"megammr: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(recipe))
    return 0
