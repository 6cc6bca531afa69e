"""`megammr data import`: a public dataset, in its published layout, -> megammr records.

    megammr data import --format deepscaler --input data/raw/deepscaler --out data/records/phase1.jsonl
    megammr data import --format virl39k --input data/raw/virl39k --out data/records/virl.jsonl \\
        --exclude eval/*.jsonl --skip-invalid [--part 1/2]
    megammr data import --format llava --input train_samples_all_tuning.json --images-root data_images --out r.jsonl
    megammr data import --format columns --input t.parquet --map question=problem answer=solution_short --out r.jsonl

Writes OUT.jsonl (the record schema of megammr/data/schema.py), the images beside it in
OUT_images/ (one file per distinct image, referenced by relative path) and, with --skip-invalid,
the rejected rows in OUT.rejected.jsonl; then prints a summary. The formats and the columns each
reads are in megammr/data/importers/. Exit codes: 0 written, 1 invalid input (nothing written),
2 usage, 130 interrupted (nothing written).
"""
from __future__ import annotations

import argparse
import sys

from megammr.config import TOOLS
from megammr.data.schema import DEFAULT_MAX_IMAGE_PIXELS


def add_arguments(p: argparse.ArgumentParser):
    from megammr.data.importers import FORMATS
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="turn a public dataset into megammr records (JSONL + image files)",
                         description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    imp.add_argument("--format", required=True, choices=list(FORMATS), help="the dataset's published layout")
    imp.add_argument("--input", required=True, metavar="FILE|DIR", help="the dataset file, or its directory")
    imp.add_argument("--out", required=True, metavar="OUT.jsonl", help="records to write (images go to OUT_images/)")
    imp.add_argument("--images-root", default=None, metavar="DIR",
                     help="folder the dataset's image paths are relative to (default: the input file's folder)")
    imp.add_argument("--map", nargs="+", default=[], metavar="TARGET=COL",
                     help="--format columns: which column holds each of id, question, answer, images, caption, "
                          "choices, source (default: the column of the same name)")
    imp.add_argument("--skip-invalid", action="store_true",
                     help="skip invalid rows (counted per reason, written to OUT.rejected.jsonl) instead of stopping")
    imp.add_argument("--exclude", "--decontam-against", dest="exclude", nargs="+", default=[], metavar="EVAL.jsonl",
                     help="drop rows whose question is found in these evaluation sets (as tools/build_shards.py)")
    imp.add_argument("--exclude-images", nargs="+", default=[], metavar="FILE",
                     help="drop rows with an image byte-identical (sha256) to one in these shard directories or "
                          "JSONL files (other phases' data, benchmark files; counted)")
    imp.add_argument("--ngram", type=int, default=TOOLS.decontam_ngram,
                     help="decontamination: word n-gram length counted as overlap (0: exact matches only)")
    imp.add_argument("--part", default=None, metavar="I/N",
                     help="keep only part I of N disjoint parts, chosen by a hash of the record id (e.g. ViRL39K "
                          "split for phases 2 and 3: --part 1/2 and --part 2/2)")
    imp.add_argument("--source", default=None, help="the records' `source` (default: the format's name, or the "
                                                    "input file's stem; a row's own source wins)")
    imp.add_argument("--limit", type=int, default=None, metavar="N", help="read only the first N rows")
    imp.add_argument("--max-answer-chars", type=int, default=TOOLS.import_max_answer_chars,
                     help="reject answers longer than this after normalisation (default: %(default)s)")
    imp.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                     help="reject images with more pixels than this (default: %(default)s)")
    imp.add_argument("--overwrite", action="store_true", help="replace OUT.jsonl and OUT_images/ if they exist")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def _fail(msg: str, code: int) -> int:
    print(f"megammr data import: error: {msg}", file=sys.stderr)
    return code


def _parse_map(items: list[str]) -> dict:
    out = {}
    for item in items:
        target, sep, col = item.partition("=")
        if not sep or not target.strip() or not col.strip():
            raise ValueError(f"--map {item}: expected TARGET=COLUMN, e.g. question=problem")
        out[target.strip()] = col.strip()
    return out


def _parse_part(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 1 <= int(i) <= int(n)):
        raise ValueError(f"--part {text}: expected I/N with 1 <= I <= N, e.g. 1/2")
    return int(i), int(n)


def run(args) -> int:
    from megammr.data.importers.base import ImportFailure
    from megammr.data.importers.pipeline import import_dataset
    from megammr.data.schema import RecordError
    try:
        column_map = _parse_map(args.map)
        part = _parse_part(args.part) if args.part else None
    except ValueError as e:
        return _fail(str(e), 2)
    if column_map and args.format != "columns":
        return _fail("--map names the columns of --format columns; the other formats read their published columns", 2)
    if args.limit is not None and args.limit < 1:
        return _fail("--limit must be >= 1", 2)
    try:
        s = import_dataset(args.format, args.input, args.out, skip_invalid=args.skip_invalid, exclude=args.exclude,
                           ngram=args.ngram, images_root=args.images_root, column_map=column_map, part=part,
                           source=args.source, limit=args.limit, max_answer_chars=args.max_answer_chars,
                           max_image_pixels=args.max_image_pixels, overwrite=args.overwrite,
                           show_progress=not args.no_progress, exclude_images=args.exclude_images)
    except RecordError as e:
        return _fail(f"{e}\n(nothing written; fix the row or pass --skip-invalid to count and skip such rows)", 1)
    except (ImportFailure, ValueError, OSError) as e:
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        print("megammr data import: interrupted; nothing written", file=sys.stderr)
        return 130
    print(s.text())
    return 0
