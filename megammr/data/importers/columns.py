"""Any parquet / JSONL / JSON-list table, its columns named with --map.

    megammr data import --format columns --input t.parquet --out r.jsonl \\
        --map question=problem answer=final_answer images=image_paths choices=options id=uid

Targets: id, question, answer, images, caption, choices, source. A target not mapped reads the
column of its own name when there is one (so a table already in the record schema needs no
--map); `question` and `answer` must come from somewhere. `images`: one image or a list (paths
relative to --images-root, bytes, or {bytes, path} structs); `choices`: a list of option texts, a
{letter: text} object or a JSON string of a list. Every other plain-JSON column is kept under
`extra` (binary ones cannot be, and are named in the summary). The record schema this writes is
megammr/data/schema.py; the table is the user's, so there is no card to cite.
"""
from __future__ import annotations

from megammr.data.importers.base import Context, ImportFailure, Importer, as_object, image_list, plain_extra, record_id
from megammr.data.schema import RawRow, RecordError, is_plain_json

TARGETS = ("id", "question", "answer", "images", "caption", "choices", "source")
_REQUIRED = ("question", "answer")


def resolve_map(column_map: dict, columns) -> dict:
    """target -> column: --map, then same-named columns (`columns` None: any key of a JSON row)."""
    bad = sorted(set(column_map) - set(TARGETS))
    if bad:
        raise ImportFailure(f"--map {bad[0]}=...: unknown target (targets: {', '.join(TARGETS)})")
    out = dict(column_map)
    for t in TARGETS:
        if t not in out and (columns is None or t in columns):
            out[t] = t
    if columns is not None:
        missing = [f"{t}={c}" for t, c in out.items() if t in column_map and c not in columns]
        if missing:
            raise ImportFailure(f"--map {missing[0]}: no such column (columns: {', '.join(columns)})")
        unset = [t for t in _REQUIRED if t not in out]
        if unset:
            raise ImportFailure(f"no column for {', '.join(unset)}: pass --map {unset[0]}=COLUMN "
                                f"(columns: {', '.join(columns)})")
    return out


class Columns(Importer):
    name = "columns"
    card = "megammr/data/schema.py (the record schema); the columns are named with --map"
    extensions = (".parquet", ".jsonl", ".json")

    def check_file(self, ctx: Context):
        ctx.column_map = resolve_map(ctx.column_map, ctx.columns)

    def convert(self, row: RawRow, ctx: Context) -> dict:
        d = as_object(row)
        m = ctx.column_map
        for t in _REQUIRED:
            col = m.get(t, t)
            if d.get(col) is None:
                hint = "" if t in m and m[t] != t else f"; name its column with --map {t}=COLUMN"
                raise RecordError(row.path, row.line, col, "missing_field", f"no {t} (column {col!r}){hint}")
        question, answer = d[m["question"]], d[m["answer"]]
        if not isinstance(question, str):
            raise RecordError(row.path, row.line, m["question"], "wrong_type",
                              f"the question must be a string, got {type(question).__name__}")
        images = image_list(row, d.get(m["images"]) if "images" in m else None, m.get("images", "images"))
        caption = d.get(m["caption"]) if "caption" in m else None
        if caption is not None and not isinstance(caption, str):
            raise RecordError(row.path, row.line, m["caption"], "wrong_type",
                              f"the caption must be a string, got {type(caption).__name__}")
        source = d.get(m["source"]) if "source" in m else None
        if source is not None and not isinstance(source, str):
            raise RecordError(row.path, row.line, m["source"], "wrong_type",
                              f"the source must be a string, got {type(source).__name__}")
        ctx.dropped.update(k for k, v in d.items() if k not in m.values() and v is not None and not is_plain_json(v))
        draft = {"id": record_id(row, ctx, d.get(m["id"]) if "id" in m else None), "question": question,
                 "answer": answer, "images": images, "source": source or ctx.source,
                 "extra": plain_extra(d, set(m.values()))}
        if caption is not None:
            draft["caption"] = caption
        if "choices" in m and d.get(m["choices"]) is not None:
            draft["choices"] = d[m["choices"]]
        return draft
