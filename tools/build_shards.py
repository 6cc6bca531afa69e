#!/usr/bin/env python3
"""Validate a JSONL/parquet file of records and write webdataset shards + energon metadata.

    python tools/build_shards.py --phase 2 --input data.jsonl --out shards/phase2 [--skip-invalid]
        [--exclude eval/mathvista.jsonl ...] [--overwrite]

The record schema is in megammr/data/schema.py. By default the first invalid record stops the
build with `file:line: field: message`, and nothing is written. With --skip-invalid invalid
records are counted per reason and written to OUT/rejected.jsonl. Exit codes: 0 written,
1 invalid input (or nothing valid), 2 usage.
"""
from __future__ import annotations

import argparse
import sys

from megammr.config import TOOLS
from megammr.data.schema import DEFAULT_MAX_IMAGE_PIXELS, RecordError
from megammr.data.shards import BuildError, build_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", type=int, choices=(1, 2, 3), required=True,
                   help="1: text only; 2: image + caption; 3: image, caption-free (captions dropped)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL or parquet file(s)")
    p.add_argument("--out", required=True, help="output directory (created; replaced only with --overwrite)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip invalid records (counted per reason, written to OUT/rejected.jsonl) instead of stopping")
    p.add_argument("--exclude", nargs="+", default=[], metavar="EVAL.jsonl",
                   help="drop records whose question matches one of these evaluation sets (decontamination)")
    p.add_argument("--ngram", type=int, default=TOOLS.decontam_ngram,
                   help="decontamination: word n-gram length counted as overlap (0: exact matches only)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="reject images with more pixels than this (before resizing)")
    p.add_argument("--shard-size-mb", type=float, default=TOOLS.shard_max_mb, help="largest shard in MiB (default: %(default)s)")
    p.add_argument("--shard-records", type=int, default=TOOLS.shard_max_records, help="most records per shard (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        s = build_shards(a.input, a.phase, a.out, skip_invalid=a.skip_invalid, exclude=tuple(a.exclude),
                         ngram=a.ngram, max_image_pixels=a.max_image_pixels,
                         shard_max_bytes=int(a.shard_size_mb * (1 << 20)), shard_max_samples=a.shard_records,
                         overwrite=a.overwrite, progress=not a.no_progress)
    except RecordError as e:
        print(f"error: {e}\n(nothing written; fix the record or pass --skip-invalid)", file=sys.stderr)
        return 1
    except (BuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        return 130
    except SystemExit as e:  # SIGTERM during the build (see megammr.data.shards)
        print("terminated; nothing written", file=sys.stderr)
        raise e
    print(s.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
