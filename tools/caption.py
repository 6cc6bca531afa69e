#!/usr/bin/env python3
"""Caption image records for phase 2 with a captioning VLM, resumably.

    python tools/caption.py --input phase3_like.jsonl --model HF_DIR --out captioned.jsonl [--batch-size 8]

Each output line is the input record plus `caption` (image paths rewritten relative to the
output). Rerunning the same command after an interruption continues where it stopped: ids
already in the output are not captioned again. Then build phase-2 shards from the output:
    python tools/build_shards.py --phase 2 --input captioned.jsonl --out shards/phase2
"""
from __future__ import annotations

import argparse
import sys

from megammr.config import TOOLS
from megammr.data.caption import CAPTION_INSTRUCTION, caption_file
from megammr.data.schema import RecordError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="JSONL or parquet records with images")
    p.add_argument("--model", required=True, help="HF directory of the captioning VLM (Qwen2.5-VL family)")
    p.add_argument("--out", required=True, help="output JSONL (appended to; existing ids are skipped)")
    p.add_argument("--engine", choices=["transformers"], default="transformers",
                   help="rollout engine (vLLM arrives with the trainer)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=TOOLS.caption_batch_size, help="records per generate() call (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=TOOLS.caption_max_new_tokens)
    p.add_argument("--recaption", action="store_true", help="replace captions the input already has")
    p.add_argument("--skip-invalid", action="store_true", help="count and skip invalid records instead of stopping")
    p.add_argument("--instruction", default=CAPTION_INSTRUCTION, help="the captioning request sent with each image")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error("--batch-size must be >= 1")

    import os
    if not os.path.isdir(a.model):  # transformers would take it for a Hub repo id and try to download
        p.error(f"--model {a.model}: not a directory (a local HF checkpoint is expected)")
    if not os.path.isfile(a.input):
        p.error(f"--input {a.input}: file not found")
    from megammr.rollout import SamplingParams, TransformersEngine  # heavy: only when captioning
    engine = TransformersEngine.from_pretrained(a.model, device=a.device, max_batch_sequences=a.batch_size)
    sampling = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=a.max_new_tokens, seed=0)
    try:
        s = caption_file(a.input, a.out, engine, sampling=sampling, batch_size=a.batch_size, recaption=a.recaption,
                         skip_invalid=a.skip_invalid, instruction=a.instruction, progress=not a.no_progress)
    except RecordError as e:
        print(f"error: {e}\n(pass --skip-invalid to skip such records)", file=sys.stderr)
        return 1
    print(s.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
