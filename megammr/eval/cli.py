"""`megammr eval --model HF_DIR --bench NAME --data PATH`: evaluate a checkpoint on one benchmark.

Writes OUT/NAME_samples.jsonl (one line per sample), OUT/NAME_summary.json and .md, and prints
the summary table with the paper's Infi-MMR-3B number beside ours. Decoding is greedy unless
--temperature is given; other sampling limits come from the recipe's rollout section.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser):
    from megammr.eval.readers import READERS
    p.add_argument("--model", required=True, help="HF checkpoint directory (weights, tokenizer, processor)")
    p.add_argument("--bench", required=True, choices=sorted(READERS), help="benchmark reader")
    p.add_argument("--data", required=True, help="the benchmark's file (or directory for OlympiadBench)")
    p.add_argument("--images-root", default=None, help="folder image paths are relative to (default: the data file's)")
    p.add_argument("--out", default=None, help="output folder (default: outputs/eval/<bench>)")
    p.add_argument("--recipe", default=None, help="recipe whose rollout/reward sections to use")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: recipe rollout.max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("override", nargs="*", help="recipe overrides such as reward.timeout_s=10")


def run(args) -> int:
    import torch

    from megammr.config import RecipeError, Recipe, load_recipe
    from megammr.eval.readers import EvalDataError, load_benchmark
    from megammr.eval.runner import evaluate, format_table
    from megammr.rollout import SamplingParams, TransformersEngine

    import os
    if args.limit is not None and args.limit < 1:
        print(f"megammr eval: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.model):
        # transformers would take a missing path for a Hub repo id and try to download it
        print(f"megammr eval: --model {args.model}: not a directory (a local HF checkpoint is expected)",
              file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(args.recipe, args.override) if (args.recipe or args.override) else Recipe()
        samples = load_benchmark(args.bench, args.data, args.images_root, args.limit)
    except (RecipeError, EvalDataError) as e:
        print(f"megammr eval: {e}", file=sys.stderr)
        return 2
    if not samples:
        print(f"megammr eval: no samples in {args.data}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    engine = TransformersEngine.from_pretrained(args.model, device=device, dtype=dtype,
                                                max_batch_sequences=args.batch_size)
    over = {"temperature": args.temperature}
    if args.max_new_tokens:
        over["max_new_tokens"] = args.max_new_tokens
    sampling = SamplingParams.from_config(recipe.rollout, seed=args.seed, **over)
    out = args.out or f"outputs/eval/{args.bench}"
    summary = evaluate(engine, samples, args.bench, out_dir=out, sampling=sampling, reward_cfg=recipe.reward,
                       batch_size=args.batch_size, system_prompt=recipe.data.system_prompt)
    print(format_table(summary))
    print(f"samples: {summary['samples_file']}", file=sys.stderr)
    if summary["n"] == 0:
        print(f"megammr eval: none of the {summary['skipped']} sample(s) could be evaluated (images not found? "
              "see --images-root)", file=sys.stderr)
        return 1
    return 0
