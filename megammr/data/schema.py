"""Record schema of one training example, and its validation.

Input (one JSON object per JSONL line, or one parquet row):

    id        str or int, unique within the build            (required)
    question  str, non-empty                                  (required)
    answer    str, int or float (stored as str), non-empty    (required)
    images    list of image paths relative to the JSONL file; parquet rows may also carry
              bytes or {"bytes": ..., "path": ...} structs     (phase 2 and 3: >= 1; phase 1: none)
    caption   str                                             (phase 2: required; phase 3: dropped)
    choices   list of >= 2 str; the answer must be a choice letter (A, B, ...) or one of the
              choices, and is stored as the letter            (optional)
    source    str; default: the input file's stem              (optional)
    any other key is kept under `extra` when it is plain JSON.

Every problem is a `RecordError` that names file, line, field and one reason of `REASONS`,
so a build can stop on the first one or count them per reason (--skip-invalid).
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from PIL import Image

# Reasons a record is rejected; the build summary counts skips under these names.
REASONS = (
    "invalid_utf8", "invalid_json", "missing_field", "wrong_type", "empty_field", "duplicate_id",
    "unreadable_image", "truncated_image", "image_too_large", "image_aspect_ratio", "bad_choices",
    "phase_mismatch",
    # raised by the importers (megammr/data/importers/, megammr/data/normalize.py)
    "bad_answer", "bad_conversation", "image_count_mismatch",
)
PHASES = (1, 2, 3)
# Qwen2.5-VL's resizing refuses images whose long side is over 200x the short side.
MAX_ASPECT_RATIO = 200
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
_FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_KNOWN = ("id", "question", "answer", "images", "caption", "choices", "source")


class RecordError(ValueError):
    """A record that does not fit the schema: `file:line: field: message` (reason in .reason)."""

    def __init__(self, path: str, line: int, field: str, reason: str, message: str):
        assert reason in REASONS, reason
        self.path, self.line, self.field, self.reason, self.message = path, line, field, reason, message
        super().__init__(f"{path}:{line}: {field}: {message} [{reason}]")


@dataclass
class Record:
    """A validated record; `images` hold the original encoded bytes (written to shards byte-equal)."""
    id: str
    question: str
    answer: str
    source: str
    images: list[bytes] = field(default_factory=list)
    image_exts: list[str] = field(default_factory=list)
    caption: Optional[str] = None
    choices: Optional[list[str]] = None
    extra: dict = field(default_factory=dict)

    def meta(self, phase: int) -> dict:
        """The JSON part of a shard sample; images are referenced by their part names."""
        d = {"id": self.id, "question": self.question, "answer": self.answer, "source": self.source,
             "phase": phase, "images": [f"img{i}.{e}" for i, e in enumerate(self.image_exts)]}
        if self.caption is not None:
            d["caption"] = self.caption
        if self.choices is not None:
            d["choices"] = self.choices
        if self.extra:
            d["extra"] = self.extra
        return d


def choice_letter(i: int) -> str:
    return chr(ord("A") + i)


# --------------------------------------------------------------------------- reading
@dataclass
class RawRow:
    """One input row before validation: `data` is the parsed object, `raw` the original line text."""
    path: str
    line: int
    data: Any = None
    raw: Optional[str] = None
    raw_bytes: Optional[bytes] = None
    error: Optional[RecordError] = None


_BOM = b"\xef\xbb\xbf"


def read_rows(path: str) -> Iterator[RawRow]:
    """Rows of a .jsonl or .parquet file; undecodable lines come back with `.error` set."""
    if path.endswith(".parquet"):
        yield from _read_parquet(path)
        return
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            body = line.rstrip(b"\r\n")
            if n == 1 and body.startswith(_BOM):
                body = body[len(_BOM):]  # editors on Windows start UTF-8 files with a BOM
            if not body.strip():
                continue  # blank lines (often a trailing one) are not records
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(path, n, raw_bytes=body, error=RecordError(
                    path, n, "<line>", "invalid_utf8", f"invalid UTF-8 at byte {e.start}"))
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                yield RawRow(path, n, raw=text, error=RecordError(
                    path, n, "<line>", "invalid_json", f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            yield RawRow(path, n, data=data, raw=text)


def _read_parquet(path: str) -> Iterator[RawRow]:
    try:  # lazy here and in count_rows: pyarrow is needed (and imported) for parquet inputs only
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise SystemExit("reading parquet needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    n = 0
    for batch in pf.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            n += 1  # 1-based row number, reported as the "line"
            yield RawRow(path, n, data=row)


def count_rows(path: str) -> Optional[int]:
    """Cheap row count for the progress bar (None if unknown)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# --------------------------------------------------------------------------- validation
def validate(row: RawRow, phase: int, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Record:
    """Check one row against the schema of `phase`; return a Record or raise RecordError."""
    if row.error is not None:
        raise row.error
    p, n, d = row.path, row.line, row.data

    def err(fld, reason, msg):
        return RecordError(p, n, fld, reason, msg)

    if not isinstance(d, dict):
        raise err("<record>", "wrong_type", f"expected a JSON object, got {type(d).__name__}")
    for key in ("id", "question", "answer"):
        if d.get(key) is None:
            raise err(key, "missing_field", "required field is missing")

    rid = d["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise err("id", "wrong_type", f"expected str or int, got {type(rid).__name__}")
    rid = str(rid).strip()
    if not rid:
        raise err("id", "empty_field", "empty id")

    question = d["question"]
    if not isinstance(question, str):
        raise err("question", "wrong_type", f"expected str, got {type(question).__name__}")
    if not question.strip():
        raise err("question", "empty_field", "empty question")

    answer = d["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise err("answer", "wrong_type", f"expected str or number, got {type(answer).__name__}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise err("answer", "wrong_type", f"non-finite number {answer}")
    answer = answer.strip() if isinstance(answer, str) else json.dumps(answer)
    if not answer:
        raise err("answer", "empty_field", "empty answer")

    source = d.get("source")
    if source is None:
        source = os.path.splitext(os.path.basename(p))[0]
    elif not isinstance(source, str):
        raise err("source", "wrong_type", f"expected str, got {type(source).__name__}")

    caption = d.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise err("caption", "wrong_type", f"expected str, got {type(caption).__name__}")
    if phase == 2 and caption is None:
        raise err("caption", "missing_field", "phase 2 records need a caption")
    if phase == 2 and not caption.strip():
        raise err("caption", "empty_field", "empty caption")
    if phase != 2:
        # Phase 3 is caption-free by definition (the language shortcut is what it removes);
        # phase 1 has no image to describe. A caption there is dropped, not carried silently.
        caption = None

    choices = d.get("choices")
    if choices is not None:
        answer, choices = _check_choices(choices, answer, err)

    images = d.get("images")
    if images is None:
        images = []
    if not isinstance(images, list):
        raise err("images", "wrong_type", f"expected a list, got {type(images).__name__}")
    if phase == 1 and images:
        raise err("images", "phase_mismatch", "phase 1 records are text-only; build image records as phase 2 or 3")
    if phase in (2, 3) and not images:
        raise err("images", "missing_field", f"phase {phase} records need at least one image")
    blobs, exts = [], []
    for i, ref in enumerate(images):
        data = _image_bytes(ref, p, f"images[{i}]", err)
        exts.append(check_image(data, f"images[{i}]", err, max_image_pixels))
        blobs.append(data)

    extra = {k: v for k, v in d.items() if k not in _KNOWN and is_plain_json(v)}
    return Record(id=rid, question=question, answer=answer, source=source, images=blobs,
                  image_exts=exts, caption=caption, choices=choices, extra=extra)


def _check_choices(choices, answer: str, err):
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise err("choices", "wrong_type", "expected a list of str")
    if len(choices) < 2 or len(choices) > 26:
        raise err("choices", "bad_choices", f"expected 2 to 26 choices, got {len(choices)}")
    if any(not c.strip() for c in choices):
        raise err("choices", "bad_choices", "empty choice")
    letters = [choice_letter(i) for i in range(len(choices))]
    a = answer.strip()
    if a.upper() in letters and len(a) == 1:
        return a.upper(), choices
    stripped = [c.strip() for c in choices]
    if stripped.count(a) == 1:
        return letters[stripped.index(a)], choices
    raise err("answer", "bad_choices", f"answer {answer!r} is neither a choice letter ({letters[0]}-{letters[-1]}) "
              "nor exactly one of the choices")


def _image_bytes(ref, path: str, fld: str, err) -> bytes:
    if isinstance(ref, dict):  # HF datasets' parquet image struct
        if ref.get("bytes"):
            ref = ref["bytes"]
        elif ref.get("path"):
            ref = ref["path"]
        else:
            raise err(fld, "wrong_type", "image struct has neither bytes nor path")
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if not isinstance(ref, str):
        raise err(fld, "wrong_type", f"expected an image path, got {type(ref).__name__}")
    if not ref.strip():
        raise err(fld, "empty_field", "empty image path")
    full = ref if os.path.isabs(ref) else os.path.join(os.path.dirname(os.path.abspath(path)), ref)
    try:
        with open(full, "rb") as f:
            return f.read()
    except OSError as e:
        raise err(fld, "unreadable_image", f"cannot read {ref}: {e.strerror or e}") from None


def check_image(data: bytes, fld: str, err, max_image_pixels: int) -> str:
    """Fully decode the image once (catches truncation); return its file extension."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise err(fld, "image_too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for garbage input
        raise err(fld, "unreadable_image", f"not a readable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > max_image_pixels:
        raise err(fld, "image_too_large", f"{w}x{h} = {w * h} pixels is over the limit {max_image_pixels}")
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise err(fld, "image_aspect_ratio", f"{w}x{h}: aspect ratio over {MAX_ASPECT_RATIO}")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise err(fld, "truncated_image", f"image data is truncated or corrupt ({type(e).__name__}: {e})") from None
    fmt = img.format or "PNG"
    return _FORMAT_EXT.get(fmt, fmt.lower())


def is_plain_json(v) -> bool:
    """Whether a record field survives json.dumps (extra fields that do not are dropped)."""
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
