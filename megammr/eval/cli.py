"""`megammr eval --model HF_DIR --bench NAME --data PATH`: evaluate a checkpoint on one benchmark.

Writes OUT/NAME_samples.jsonl (one line per sample), OUT/NAME_summary.json and .md, and prints
the summary table with the paper's Infi-MMR-3B number beside ours. Decoding is greedy unless
--temperature is given. The rollout (max_new_tokens, top_p ...), reward and system-prompt
settings come from --recipe; without it, from the recipe of the run that wrote the model when
--model is a phase's export (OUTPUT_DIR/hf, beside OUTPUT_DIR/checkpoints), so a model is
evaluated as it was trained; else from the defaults in megammr/config/schema.py. --max-new-tokens wins
over all of them.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

from megammr.config import TOOLS, Recipe, RecipeError, load_recipe
from megammr.eval.readers import READERS, EvalDataError, load_benchmark
from megammr.eval.runner import evaluate, format_table
from megammr.rollout import SamplingParams

# lazy in this module: torch and the transformers engine (megammr.rollout.TransformersEngine), so
# `megammr eval --help` and the checks of the arguments, model and data files stay fast.


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="HF checkpoint directory (weights, tokenizer, processor)")
    p.add_argument("--bench", required=True, choices=sorted(READERS), help="benchmark reader")
    p.add_argument("--data", required=True, help="the benchmark's file (or directory for OlympiadBench)")
    p.add_argument("--images-root", default=None, help="folder image paths are relative to (default: the data file's)")
    p.add_argument("--out", default=None, help="output folder (default: outputs/eval/<bench>)")
    p.add_argument("--recipe", default=None, help="recipe whose rollout/reward sections to use "
                   "(default: the training run's, when --model is a phase's OUTPUT_DIR/hf)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--batch-size", type=int, default=TOOLS.eval_batch_size, help="prompts per generate call (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the recipe's rollout.max_new_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("override", nargs="*", help="recipe overrides such as reward.timeout_s=10")


def _fail(msg: str) -> int:
    print(f"megammr eval: {msg}", file=sys.stderr)
    return 2


def model_problem(path: str) -> str | None:
    """Why `path` is not a loadable HF checkpoint directory, or None."""
    if not os.path.isdir(path):
        # transformers would take a missing path for a Hub repo id and try to download it
        return f"--model {path}: not a directory (a local HF checkpoint is expected, e.g. a phase's OUTPUT_DIR/hf)"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return f"--model {path}: no config.json there (an HF checkpoint directory is expected, e.g. a phase's OUTPUT_DIR/hf)"
    weights = glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "pytorch_model*.bin"))
    if not weights:
        return (f"--model {path}: no weights there (*.safetensors or pytorch_model*.bin); a torch_dist checkpoint "
                "converts with tools/convert_checkpoint.py mcore-to-hf")
    return None


def device_problem(device: str) -> str | None:
    import torch
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if not m:
        return f"--device {device}: expected cpu, cuda or cuda:N"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return (f"--device {device}: this torch ({torch.__version__}) sees no CUDA device "
                    f"({'a CPU-only build' if torch.version.cuda is None else 'none visible'}); use --device cpu")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


def run_recipe(model: str) -> tuple[dict, str] | None:
    """(recipe dict, where it was read) of the run that exported `model` (OUTPUT_DIR/hf), or None."""
    run_dir = os.path.dirname(os.path.abspath(model))
    pointer = os.path.join(run_dir, "checkpoints", "latest")
    if os.path.basename(os.path.abspath(model)) != "hf" or not os.path.isfile(pointer):
        return None
    try:
        with open(pointer) as f:
            path = os.path.join(run_dir, "checkpoints", f.read().strip(), "megammr.json")
        with open(path, encoding="utf-8") as f:
            return json.load(f)["recipe"], os.path.relpath(path)
    except (OSError, ValueError, KeyError):
        return None


def run(args) -> int:
    if args.limit is not None and args.limit < 1:
        return _fail(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        return _fail("--batch-size and --max-new-tokens must be >= 1")
    problem = model_problem(args.model) or (device_problem(args.device) if args.device else None)
    if problem:
        return _fail(problem)
    saved = None if args.recipe else run_recipe(args.model)
    if saved:
        try:
            load_recipe(None, [], base=saved)
        except RecipeError as e:  # written by another version of megammr: say so, use the defaults
            print(f"megammr eval: note: the run's recipe {saved[1]} does not load here ({e.errors[0]}); "
                  "using the defaults", file=sys.stderr)
            saved = None
    source = args.recipe or (saved[1] if saved else "the defaults in megammr/config/schema.py")
    try:
        if saved:
            recipe = load_recipe(None, args.override, base=saved)
        else:
            recipe = load_recipe(args.recipe, args.override) if (args.recipe or args.override) else Recipe()
        samples = load_benchmark(args.bench, args.data, args.images_root, args.limit)
    except RecipeError as e:
        for line in e.errors:
            print(f"megammr eval: {line}", file=sys.stderr)
        return 2
    except EvalDataError as e:
        return _fail(str(e))
    if not samples:
        return _fail(f"no samples in {args.data}")

    import torch

    from megammr.rollout import TransformersEngine
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        engine = TransformersEngine.from_pretrained(args.model, device=device, dtype=dtype,
                                                    max_batch_sequences=args.batch_size)
    except (OSError, ValueError) as e:
        return _fail(f"--model {args.model}: cannot load it ({str(e).splitlines()[0]})")
    over = {"temperature": args.temperature}
    if args.max_new_tokens:
        over["max_new_tokens"] = args.max_new_tokens
    sampling = SamplingParams.from_config(recipe.rollout, seed=args.seed, **over)
    print(f"megammr eval: {args.bench}: {len(samples)} sample(s) on {device}, max_new_tokens {sampling.max_new_tokens} "
          f"({'--max-new-tokens' if args.max_new_tokens else 'rollout.max_new_tokens of ' + source})",
          file=sys.stderr, flush=True)
    out = args.out or f"outputs/eval/{args.bench}"
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    summary = evaluate(engine, samples, args.bench, out_dir=out, sampling=sampling, reward_cfg=recipe.reward,
                       batch_size=args.batch_size, system_prompt=recipe.data.system_prompt, progress=progress)
    print(format_table(summary, markdown=False))
    print(f"samples: {summary['samples_file']}", file=sys.stderr)
    if summary["n"] == 0:
        print(f"megammr eval: none of the {summary['skipped']} sample(s) could be evaluated (images not found? "
              "see --images-root)", file=sys.stderr)
        return 1
    return 0
