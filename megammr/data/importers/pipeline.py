"""Run one importer over its inputs: rows -> draft records -> normalised, decontaminated, images
read and deduplicated, validated -> OUT.jsonl + OUT_images/ (+ OUT.rejected.jsonl).

Per row, in order: the importer's `convert` (layout -> draft), `--part` (a deterministic share of
the ids), `megammr.data.normalize.normalize` (every answer/question rule, once), decontamination
against evaluation sets (megammr.data.decontam, as tools/build_shards.py does it), the images read
(bytes, {bytes, path} or a path under the images root), `megammr.data.schema.validate` (the record
schema, images fully decoded), duplicate ids (an error), exact duplicate records (same question,
answer, choices and image bytes: dropped, counted). Images are written once per content: named by
the sha256 of their bytes (`OUT_images/ab/abcd....png`), so an image shared by several records,
or repeated in the dataset, is stored once and counted.

Errors follow tools/build_shards.py: the first invalid row stops the import with
`file:row: field: message [reason]` and nothing is written; `skip_invalid` counts skips per
reason and writes them to OUT.rejected.jsonl. Everything is written to a staging directory beside
OUT and moved into place at the end, so an interrupted import leaves the previous output as it
was (a staging directory left by a killed run is removed by the next one).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megammr.config import TOOLS
from megammr.data.decontam import normalize_question
from megammr.data.importers import get_importer
from megammr.data.importers.base import Context, ImportFailure, parquet_columns
from megammr.data.importers.output import MARKER, check_paths, move_into_place, write_file
from megammr.data.shards import remove_stale_stages
from megammr.data.normalize import NormalizeError, clean_answer_space, normalize
from megammr.data.schema import DEFAULT_MAX_IMAGE_PIXELS, RawRow, RecordError, validate

_FIELDS = ("id", "question", "answer", "choices", "images", "caption", "source")


@dataclass
class ImportSummary:
    format: str
    out: str
    inputs: list = field(default_factory=list)
    images_dir: Optional[str] = None
    read: int = 0
    written: int = 0
    images_written: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    decontaminated: dict = field(default_factory=dict)
    duplicate_records: int = 0
    duplicate_images: int = 0
    excluded_images: dict = field(default_factory=dict)  # exclusion file -> records dropped (--exclude-images)
    outside_part: int = 0
    choices_from_question: int = 0
    dropped_columns: set = field(default_factory=set)
    rejected_file: Optional[str] = None
    seconds: float = 0.0

    def text(self) -> str:
        lines = [f"{self.format}: read {self.read} rows from {', '.join(self.inputs)}; wrote {self.written} records "
                 f"to {self.out} ({self.seconds:.1f}s)"]
        if self.images_dir:
            lines.append(f"images: {self.images_written} files in {self.images_dir}; duplicate images (same sha256, "
                         f"stored once): {self.duplicate_images}")
        n = sum(self.skipped.values())
        lines.append(f"skipped invalid: {n}" + ("" if not n else " (" + ", ".join(
            f"{r}: {c}" for r, c in sorted(self.skipped.items())) + f"); rejected rows in {self.rejected_file}"))
        for p, c in self.decontaminated.items():
            lines.append(f"decontaminated against {p}: {c}")
        lines.append(f"duplicate records dropped: {self.duplicate_records}")
        for p, c in self.excluded_images.items():
            lines.append(f"records with an image found in {p} (same sha256) dropped: {c}")
        if self.outside_part:
            lines.append(f"outside --part: {self.outside_part}")
        if self.choices_from_question:
            lines.append(f"choices parsed out of the question text: {self.choices_from_question}")
        if self.dropped_columns:
            lines.append(f"columns not kept (not JSON): {', '.join(sorted(self.dropped_columns))}")
        return "\n".join(lines)


def in_part(rid: str, part: tuple[int, int]) -> bool:
    """Whether id `rid` falls in part i of n (1-based): disjoint parts that cover every id."""
    i, n = part
    return int(hashlib.sha256(rid.encode("utf-8")).hexdigest()[:16], 16) % n == i - 1


def import_dataset(fmt: str, input_path: str, out: str, *, skip_invalid: bool, exclude: Sequence[str] = (),
                   ngram: int = TOOLS.decontam_ngram, images_root: Optional[str] = None,
                   column_map: Optional[dict] = None, part: Optional[tuple[int, int]] = None,
                   source: Optional[str] = None, limit: Optional[int] = None,
                   max_answer_chars: int = TOOLS.import_max_answer_chars,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, overwrite: bool, show_progress: bool,
                   progress_every: int = TOOLS.import_progress_every,
                   exclude_images: Sequence[str] = ()) -> ImportSummary:
    """Import `input_path` (a file or a directory of the layout) as format `fmt` into `out` (.jsonl).
    Raises RecordError (first invalid row, unless skip_invalid) or ImportFailure; writes nothing then."""
    importer = get_importer(fmt)
    out = os.path.abspath(out)
    if not out.endswith(".jsonl"):
        raise ImportFailure(f"--out {out}: the output is a JSONL file (OUT.jsonl); its images go to OUT_images/")
    stem = out[:-len(".jsonl")]
    images_dir, rejected = stem + "_images", stem + ".rejected.jsonl"
    inputs = importer.find_inputs(input_path)
    check_paths(out, images_dir, inputs, images_root, overwrite)
    decon = None
    if exclude:
        from megammr.data.decontam import Decontaminator
        decon = Decontaminator(list(exclude), ngram=ngram)
    banned = {}
    if exclude_images:  # exact duplicate images of other phases' data or of benchmarks
        from megammr.data.shard_records import exclusion_hashes
        try:
            banned = exclusion_hashes(list(exclude_images))
        except ValueError as e:
            raise ImportFailure(str(e)) from None

    t0 = time.time()
    s = ImportSummary(format=fmt, out=out, inputs=[os.path.basename(p) for p in inputs])
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(out)}.importing-"
    remove_stale_stages(parent, prefix)  # the shard build's: same staging scheme
    stage = os.path.join(parent, f"{prefix}{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    files = {}
    try:
        files["out"] = open(os.path.join(stage, "records.jsonl"), "w", encoding="utf-8")
        bar = _Progress(sum(importer.count(p) or 0 for p in inputs), show_progress, progress_every, fmt)
        ids: dict[str, str] = {}
        seen_records: set[bytes] = set()
        seen_images: set[str] = set()
        for path in inputs:
            ctx = Context(path=path, source=source or importer.source or os.path.splitext(os.path.basename(path))[0],
                          id_prefix="", column_map=dict(column_map or {}), columns=parquet_columns(path))
            file_stem = os.path.splitext(os.path.basename(path))[0]
            ctx.id_prefix = f"{ctx.source}-" if len(inputs) == 1 else f"{ctx.source}-{file_stem}-"
            importer.check_file(ctx)
            root = os.path.abspath(images_root or os.path.dirname(os.path.abspath(path)))
            for row in importer.rows(path):
                if limit is not None and s.read >= limit:
                    break
                s.read += 1
                bar.update(s)
                try:
                    got = _one(importer, row, ctx, root, decon, part, max_answer_chars, max_image_pixels, s)
                    if got is None:
                        continue
                    rec, line, norm_q = got
                    if rec.id in ids:
                        raise RecordError(row.path, row.line, "id", "duplicate_id",
                                          f"duplicate id {rec.id!r} (first at {ids[rec.id]}); ids must be unique")
                except RecordError as e:
                    if not skip_invalid:
                        raise
                    s.skipped[e.reason] += 1
                    if "rejected" not in files:
                        files["rejected"] = open(os.path.join(stage, "rejected.jsonl"), "w", encoding="utf-8")
                    files["rejected"].write(json.dumps(_rejected(row, e), ensure_ascii=False) + "\n")
                    continue
                ids[rec.id] = f"{row.path}:{row.line}"
                hashes = [hashlib.sha256(b).hexdigest() for b in rec.images]
                hit = next((banned[h] for h in hashes if h in banned), None)
                if hit is not None:
                    s.excluded_images[hit] = s.excluded_images.get(hit, 0) + 1
                    continue
                key = hashlib.sha256(json.dumps([norm_q, rec.answer, rec.choices, hashes]).encode()).digest()
                if key in seen_records:
                    s.duplicate_records += 1
                    continue
                seen_records.add(key)
                rel = []
                for blob, h, ext in zip(rec.images, hashes, rec.image_exts):
                    name = f"{h[:2]}/{h}.{ext}"
                    rel.append(f"{os.path.basename(images_dir)}/{name}")
                    if h in seen_images:
                        s.duplicate_images += 1
                        continue
                    seen_images.add(h)
                    write_file(os.path.join(stage, "images", name), blob)
                    s.images_written += 1
                if rel:
                    line["images"] = rel
                files["out"].write(json.dumps(_ordered(line), ensure_ascii=False) + "\n")
                s.written += 1
            s.dropped_columns |= ctx.dropped
        bar.close()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if decon is not None:
            s.decontaminated = dict(decon.hits)
        if s.written == 0:
            raise ImportFailure(f"no valid records in {', '.join(inputs)} (read {s.read}; skipped {dict(s.skipped)}); "
                                "nothing written")
        if s.images_written:
            with open(os.path.join(stage, "images", MARKER), "w") as f:
                f.write(os.path.basename(out) + "\n")
            s.images_dir = images_dir
        if "rejected" in files:
            s.rejected_file = rejected
        s.seconds = time.time() - t0
        move_into_place(stage, out, images_dir, rejected)
    except BaseException:
        for f in files.values():
            f.close()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return s


def _one(importer, row: RawRow, ctx: Context, root: str, decon, part, max_answer_chars, max_image_pixels, s):
    """One row -> (validated Record, output dict, normalised question), or None when it is dropped
    (outside --part, decontaminated). Raises RecordError."""
    draft = importer.convert(row, ctx)
    if part is not None and not in_part(draft["id"], part):
        s.outside_part += 1
        return None
    refs = draft.get("images") or []
    try:
        norm = normalize(draft["question"], draft["answer"], choices=draft.get("choices"), num_images=len(refs),
                         max_answer_chars=max_answer_chars, answer_is_response=draft.get("answer_is_response", False))
    except NormalizeError as e:
        raise RecordError(row.path, row.line, e.field, e.reason, e.message) from None
    if decon is not None and (decon.match(norm.question) is not None or
                              (norm.choices_from_question and decon.match(draft["question"]) is not None)):
        return None
    s.choices_from_question += norm.choices_from_question
    blobs = [_image_bytes(ref, root, f"images[{i}]", row, importer.images_hint) for i, ref in enumerate(refs)]
    extra = dict(draft.get("extra") or {})
    if draft.get("answer_is_response") and clean_answer_space(extra.get("response", "")) == norm.answer:
        extra.pop("response", None)  # the response was its own final answer: nothing more to keep
    line = {"id": draft["id"], "question": norm.question, "answer": norm.answer, "source": draft.get("source")}
    if norm.choices is not None:
        line["choices"] = norm.choices
    if draft.get("caption") is not None:
        line["caption"] = draft["caption"]
    for k, v in extra.items():
        line[f"raw_{k}" if k in _FIELDS else k] = v
    phase = 1 if not blobs else (2 if line.get("caption") is not None else 3)
    rec = validate(RawRow(row.path, row.line, data={**line, "images": blobs}), phase,
                   max_image_pixels=max_image_pixels)
    line["answer"] = rec.answer  # the schema writes a choice given as its text as its letter
    return rec, line, normalize_question(norm.question)


def _image_bytes(ref, root: str, fld: str, row: RawRow, hint: str) -> bytes:
    err = lambda reason, msg: RecordError(row.path, row.line, fld, reason, msg)  # noqa: E731
    if isinstance(ref, dict):  # Hugging Face's Image feature in parquet
        ref = ref.get("bytes") or ref.get("path")
        if ref is None:
            raise err("wrong_type", "image struct has neither bytes nor path")
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if not isinstance(ref, str):
        raise err("wrong_type", f"expected an image path, bytes or {{bytes, path}}, got {type(ref).__name__}")
    if not ref.strip():
        raise err("empty_field", "empty image path")
    full = ref if os.path.isabs(ref) else os.path.join(root, ref)
    try:
        with open(full, "rb") as f:
            return f.read()
    except OSError as e:
        raise err("unreadable_image", f"cannot read {ref} under {root} ({e.strerror or e}); pass --images-root "
                  f"with {hint}") from None


def _ordered(line: dict) -> dict:
    head = {k: line[k] for k in _FIELDS if line.get(k) is not None}
    return {**head, **{k: v for k, v in line.items() if k not in _FIELDS}}


def _rejected(row: RawRow, e: RecordError) -> dict:
    entry = {"file": row.path, "row": row.line, "field": e.field, "reason": e.reason, "message": e.message}
    if row.raw is not None:
        entry["raw"] = row.raw
    elif row.data is not None:
        entry["data"] = _printable(row.data)
    return entry


def _printable(v):
    """A row for the rejected file: bytes as their size, long lists and strings cut."""
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, dict):
        return {str(k): _printable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_printable(x) for x in v[:50]]
    if isinstance(v, str) and len(v) > 4000:
        return v[:4000] + "..."
    return v if isinstance(v, (int, float, str, bool)) or v is None else repr(v)


class _Progress:
    """A tqdm bar when stderr is a terminal, else one line every `every` rows (logs, Slurm)."""

    def __init__(self, total: int, enabled: bool, every: int, label: str):
        self.every, self.label, self.bar, self.enabled = max(1, every), label, None, enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total or None, desc=f"import {label}", unit="row", file=sys.stderr,
                            dynamic_ncols=True)
        self.total = total

    def update(self, s: ImportSummary):
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and s.read % self.every == 0:
            of = f"/{self.total}" if self.total else ""
            print(f"megammr data import {self.label}: {s.read}{of} rows read, {s.written} written, "
                  f"{sum(s.skipped.values())} skipped", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
