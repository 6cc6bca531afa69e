"""What every importer shares: the `Importer` interface, reading a published file into rows, ids.

An importer turns one row of a dataset, in its published layout, into a draft record: a dict with
`id`, `question`, `answer`, `images` (references as the dataset ships them: bytes, {"bytes",
"path"} structs, or paths relative to the images root), optional `caption`, `choices`, `source`
and `extra` (plain-JSON fields kept with the record). The pipeline (importers/pipeline.py) then
normalises it (megammr.data.normalize), reads and checks its images, validates it with the record
schema (megammr.data.schema) and writes it. A problem with one row is a `RecordError` naming
file:row, field, reason and the fix; a problem with the whole file is an `ImportFailure`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

from megammr.data.schema import RawRow, RecordError, count_rows, is_plain_json, read_rows


class ImportFailure(RuntimeError):
    """A problem with an input as a whole (missing, wrong layout, missing columns): nothing written."""


@dataclass
class Context:
    """What an importer knows about the file it reads."""
    path: str                                   # the input file
    source: str                                 # the records' default `source`
    id_prefix: str                              # for rows without an id of their own
    column_map: dict = field(default_factory=dict)  # --map (the columns format)
    columns: Optional[list[str]] = None         # a parquet file's column names (None: JSON/JSONL)
    dropped: set = field(default_factory=set)   # columns that could not be kept (not JSON), for the summary


class Importer:
    """One published layout. Subclasses set the class attributes and implement `convert`."""
    name = ""
    card = ""            # the dataset card / format documentation the layout follows (URL)
    source = ""          # default `source` of the records ("": the input file's stem)
    extensions = (".json", ".jsonl", ".parquet")
    preferred = ()       # file names looked for first when --input is a directory
    required_columns = ()  # columns a parquet input must have (checked before any row)
    images_hint = "the folder the dataset's image paths are relative to"

    def find_inputs(self, path: str) -> list[str]:
        """The files to read: `path` itself, or the matching files of a directory (not recursive)."""
        if os.path.isfile(path):
            return [path]
        if not os.path.isdir(path):
            raise ImportFailure(f"--input {path}: no such file or directory")
        names = sorted(os.listdir(path))
        found = [n for n in self.preferred if n in names] or [n for n in names if n.endswith(self.extensions)
                                                                and not n.startswith(".")]
        if not found:
            raise ImportFailure(f"--input {path}: no {' or '.join(self.preferred or self.extensions)} file in this "
                                f"directory (the {self.name} layout); pass the file itself")
        return [os.path.join(path, n) for n in found]

    def check_file(self, ctx: Context):
        """File-level checks before the first row (default: the required parquet columns)."""
        if ctx.columns is None:
            return
        missing = [c for c in self.required_columns if c not in ctx.columns]
        if missing:
            raise ImportFailure(f"{ctx.path}: no column {', '.join(missing)} (columns: {', '.join(ctx.columns)}); "
                                f"this is not the {self.name} layout ({self.card}); --format columns --map "
                                "question=COL answer=COL ... reads other tables")

    def rows(self, path: str) -> Iterator[RawRow]:
        return read_any(path)

    def count(self, path: str) -> Optional[int]:
        return count_any(path)

    def convert(self, row: RawRow, ctx: Context) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------- reading
def read_any(path: str) -> Iterator[RawRow]:
    """Rows of a JSON list (.json: row = 1-based position in the list), JSONL (row = line) or
    parquet (row = 1-based row) file. A .json file that holds one object per line reads as JSONL."""
    if not path.endswith(".json"):
        yield from read_rows(path)
        return
    items = _json_list(path)
    if items is None:
        yield from read_rows(path)
        return
    for i, item in enumerate(items, 1):
        yield RawRow(path, i, data=item)


def count_any(path: str) -> Optional[int]:
    if path.endswith(".json"):
        return None  # known once read; the progress line then shows rows only
    return count_rows(path)


def _json_list(path: str) -> Optional[list]:
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImportFailure(f"{path}: invalid UTF-8 at byte {e.start}; the file is damaged or not JSON") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return None  # JSON Lines saved as .json
        raise ImportFailure(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); a JSON list of "
                            "objects (or one object per line) is expected; the file may be truncated") from None
    if isinstance(items, dict) and len(items) == 1 and isinstance(next(iter(items.values())), list):
        items = next(iter(items.values()))  # {"data": [...]}
    if not isinstance(items, list):
        raise ImportFailure(f"{path}: the JSON is a {type(items).__name__}, not a list of records")
    return items


def parquet_columns(path: str) -> Optional[list[str]]:
    if not path.endswith(".parquet"):
        return None
    import pyarrow.parquet as pq
    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise ImportFailure(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- row helpers
def as_object(row: RawRow) -> dict:
    """The row as a dict (a JSON list or JSONL line may hold anything)."""
    if row.error is not None:
        raise row.error
    if not isinstance(row.data, dict):
        raise RecordError(row.path, row.line, "<record>", "wrong_type",
                          f"expected a JSON object, got {type(row.data).__name__}")
    return row.data


def required(row: RawRow, d: dict, key: str, kinds: tuple, what: str):
    """d[key], which must be present, not empty and of one of `kinds`."""
    v = d.get(key)
    if v is None:
        raise RecordError(row.path, row.line, key, "missing_field", f"{what} is missing or null")
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise RecordError(row.path, row.line, key, "wrong_type",
                          f"{what}: expected {' or '.join(k.__name__ for k in kinds)}, got {type(v).__name__}")
    if isinstance(v, str) and not v.strip():
        raise RecordError(row.path, row.line, key, "empty_field", f"{what} is empty")
    return v


def record_id(row: RawRow, ctx: Context, value=None) -> str:
    """The row's own id when it has one, else `<source>-<row - 1>` (its 0-based position)."""
    if value is None:
        return f"{ctx.id_prefix}{row.line - 1}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError(row.path, row.line, "id", "wrong_type", f"expected str or int, got {type(value).__name__}")
    if not str(value).strip():
        raise RecordError(row.path, row.line, "id", "empty_field", "empty id")
    return str(value).strip()


def image_list(row: RawRow, value, fld: str) -> list:
    """A single image reference or a list of them -> a list (None -> [])."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray, dict)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise RecordError(row.path, row.line, fld, "wrong_type",
                      "expected an image (path, bytes or {bytes, path}) or a list of them, "
                      f"got {type(value).__name__}")


def plain_extra(d: dict, skip) -> dict:
    """The plain-JSON fields of `d` not in `skip` (bytes and other binary values cannot go to JSON)."""
    return {k: v for k, v in d.items() if k not in skip and v is not None and is_plain_json(v)}
