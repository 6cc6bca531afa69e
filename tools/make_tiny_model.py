#!/usr/bin/env python
"""Write a random tiny Qwen2.5-VL in HF format (deterministic by seed).

    python tools/make_tiny_model.py --out /tmp/tiny [--seed 0] [--untied]

The directory loads with transformers' Qwen2_5_VLForConditionalGeneration.from_pretrained and
megammr.models.processor.load_processor (AutoProcessor where torchvision is installed).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megammr.models.tiny import write_tiny_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (created)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed; same seed, same files")
    ap.add_argument("--untied", action="store_true", help="separate lm_head (default: tied to the embeddings)")
    args = ap.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out} exists and is not a directory")
    path = write_tiny_model(args.out, seed=args.seed, tie_word_embeddings=not args.untied)
    print(path)


if __name__ == "__main__":
    main()
