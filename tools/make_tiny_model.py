#!/usr/bin/env python
"""Write a random tiny Qwen2.5-VL in HF format (deterministic by seed).

    python tools/make_tiny_model.py --out /tmp/tiny [--seed 0] [--untied]
    python tools/make_tiny_model.py --out /tmp/tiny-warm --format-warmup outputs/data/raw/phase1.jsonl \
        [--warmup-steps N] [--warmup-lr LR] [--warmup-seed 0]   # defaults: config.TOOLS

With --format-warmup the random model is first written to a temporary directory, then given a short
supervised format warm-up on the phase-1 JSONL (megammr.warmup): sampled at temperature 1.0
it then writes `<think>...</think><answer>...</answer>` part of the time, so GRPO's format and
accuracy rewards are not all zero and the tiny run can learn. The warmed model is written to OUT.

The directory loads with transformers' Qwen2_5_VLForConditionalGeneration.from_pretrained and
megammr.models.processor.load_processor (AutoProcessor where torchvision is installed).
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megammr.models.tiny import write_tiny_model  # noqa: E402
from megammr.warmup import DEFAULT_LR, DEFAULT_STEPS  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed; same seed, same files")
    ap.add_argument("--untied", action="store_true", help="separate lm_head (default: tied to the embeddings)")
    ap.add_argument("--format-warmup", metavar="PHASE1_JSONL", default=None,
                    help="after writing, run a short supervised format warm-up on these records "
                         "(e.g. outputs/data/raw/phase1.jsonl from tools/make_synthetic_data.py)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="warm-up optimizer steps (default: %d)" % DEFAULT_STEPS)
    ap.add_argument("--warmup-lr", type=float, default=None, help="warm-up AdamW learning rate (default: %g)" % DEFAULT_LR)
    ap.add_argument("--warmup-seed", type=int, default=0, help="warm-up data order seed")
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out} exists and is not a directory")
    if args.format_warmup is None:
        if args.warmup_steps is not None or args.warmup_lr is not None:
            ap.error("--warmup-steps / --warmup-lr need --format-warmup PHASE1_JSONL")
        path = write_tiny_model(args.out, seed=args.seed, tie_word_embeddings=not args.untied)
        print(path)
        return
    if not os.path.isfile(args.format_warmup):
        ap.error(f"--format-warmup {args.format_warmup}: no such file (tools/make_synthetic_data.py writes "
                 "OUT/raw/phase1.jsonl)")
    from megammr.warmup import format_warmup

    with tempfile.TemporaryDirectory(prefix="tiny-init-") as tmp:
        init = write_tiny_model(tmp, seed=args.seed, tie_word_embeddings=not args.untied)
        res = format_warmup(init, args.out, args.format_warmup,
                            steps=DEFAULT_STEPS if args.warmup_steps is None else args.warmup_steps,
                            lr=DEFAULT_LR if args.warmup_lr is None else args.warmup_lr, seed=args.warmup_seed,
                            log=lambda m: print(m, file=sys.stderr))
    print(f"format warm-up: {res.steps} steps, loss {res.first_loss:.3f} -> {res.last_loss:.3f}, "
          f"{res.seconds:.1f} s", file=sys.stderr)
    print(args.out)


if __name__ == "__main__":
    main()
