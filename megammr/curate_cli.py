"""`megammr curate`: keep the records whose pass rate lies in a range (megammr/curate.py).

    megammr curate --model HF_DIR --input SHARDS|JSONL --out DIR [--n 8] [--keep LO:HI] [--seed S]
    megammr curate --pass-rate-column PassRate_7BBase --input JSONL --phase 3 --out DIR [--keep LO:HI]

Sampling, reward and system-prompt settings come from --recipe (default: the recipe of the run that
wrote --model when it is a phase's OUTPUT_DIR/hf, else the defaults in megammr/config/schema.py),
with key=value overrides. Rerunning the same command after a kill continues where it stopped.
"""
from __future__ import annotations

import argparse
import sys

from megammr.config import TOOLS, CurateConfig, Recipe, RecipeError, load_recipe
from megammr.curate import CurateError, build_engine, curate
from megammr.eval.cli import model_problem, run_recipe

_DEFAULT = CurateConfig()


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--input", required=True, help="shard directory (tools/build_shards.py) or records JSONL/parquet")
    p.add_argument("--out", required=True, help="output directory (pass_rates.jsonl, records.jsonl, shards/ ...)")
    p.add_argument("--model", default=None, help="HF checkpoint directory that samples (e.g. a phase's OUTPUT_DIR/hf)")
    p.add_argument("--pass-rate-column", default=None, metavar="COL",
                   help="use the pass rate the data ships in extra[COL] instead of sampling (no model)")
    p.add_argument("--keep-unlabelled", action="store_true", default=TOOLS.curate_keep_unlabelled,
                   help="with --pass-rate-column: keep records whose value is missing or -1 (default: drop, counted)")
    p.add_argument("--n", type=int, default=None, help=f"samples per prompt (default: {_DEFAULT.n})")
    p.add_argument("--keep", default=None, metavar="LO:HI",
                   help=f"keep LO <= pass rate <= HI (default: {_DEFAULT.keep[0]}:{_DEFAULT.keep[1]})")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the recipe's train.seed)")
    p.add_argument("--phase", type=int, choices=(1, 2, 3), default=None,
                   help="schema and prompt style of a records file (shards carry theirs)")
    p.add_argument("--shards", action=argparse.BooleanOptionalAction, default=None,
                   help="also write DIR/shards (default: when --input is shards)")
    p.add_argument("--exclude-images", nargs="+", default=[], metavar="FILE",
                   help="drop records with an image byte-identical to one in these shard dirs / JSONL files "
                        "(other phases' data, benchmark files)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="EVAL_JSONL",
                   help="decontaminate: drop questions found in these evaluation JSONL files (as build_shards --exclude)")
    p.add_argument("--batch-size", type=int, default=TOOLS.curate_batch_size,
                   help="prompts per generate call (default: %(default)s; part of the seeding: keep it on resume)")
    p.add_argument("--recipe", default=None, help="recipe whose rollout/reward/data.system_prompt settings to use")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal; else periodic lines)")
    p.add_argument("override", nargs="*", help="recipe overrides such as rollout.max_new_tokens=2048")


def _fail(msg: str) -> int:
    print(f"megammr curate: {msg}", file=sys.stderr)
    return 2


def _keep(text: str) -> list[float]:
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return [float(lo), float(hi)]
    except ValueError:
        raise CurateError(f"--keep {text}: expected LO:HI, e.g. 0.1:0.9") from None


def run(args) -> int:
    if (args.model is None) == (args.pass_rate_column is None):
        return _fail("give --model (sample and score) or --pass-rate-column (a shipped pass rate), one of them")
    if args.model and (problem := model_problem(args.model)):
        return _fail(problem)
    if (args.n is not None and args.n < 1) or args.batch_size < 1:
        return _fail("--n and --batch-size must be >= 1")
    saved = run_recipe(args.model) if (args.model and not args.recipe) else None
    try:
        if saved:
            recipe = load_recipe(None, args.override, base=saved)
        else:
            recipe = load_recipe(args.recipe, args.override) if (args.recipe or args.override) else Recipe()
        keep = _keep(args.keep) if args.keep else list(_DEFAULT.keep)
        n = args.n or _DEFAULT.n
        seed = recipe.train.seed if args.seed is None else args.seed
        factory = (lambda: build_engine(recipe, args.model)) if args.model else None
        summary = curate(args.input, args.out, recipe, keep=keep, n=n, seed=seed, phase=args.phase,
                         model=args.model, engine_factory=factory, column=args.pass_rate_column,
                         keep_unlabelled=args.keep_unlabelled, exclude_images=args.exclude_images, exclude=args.exclude,
                         shards=args.shards, batch_size=args.batch_size, progress=args.progress)
    except RecipeError as e:
        for line in e.errors:
            print(f"megammr curate: {line}", file=sys.stderr)
        return 2
    except (CurateError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    print(summary.text())
    if summary.histogram:
        print(f"histogram: {summary.histogram}", file=sys.stderr)
    return 0 if summary.kept else 1
