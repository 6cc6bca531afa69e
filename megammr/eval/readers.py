"""Readers for the published files of the four benchmarks, from local paths only.

    mathvista      MathVista testmini: testmini.json / query-style JSON (pid -> record) as in the
                   GitHub release, a JSON list or JSONL of the same records, or the HF parquet
                   (image bytes in `decoded_image`).
    mathverse      MathVerse testmini: testmini.json (a list of records with problem_version).
    mathvision     MATH-Vision test: test.jsonl / JSON list, or the HF parquet.
    olympiadbench  OlympiadBench: one JSON list per subset (e.g. OE_MM_maths_en_COMP.json) or a
                   directory of them, or the HF parquet; images in image_1 ... image_5.

Image fields hold a path (relative to the data file's folder, or to --images-root) or, in the
parquet exports, {"bytes": ..., "path": ...}. A record without a usable question or answer is an
error naming the file and the record; missing image files are found later and counted.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional


class EvalDataError(ValueError):
    pass


@dataclass
class EvalSample:
    id: str
    question: str
    answer: str
    images: list = field(default_factory=list)  # paths (str) or raw bytes
    choices: Optional[list] = None              # option texts lettered A, B, ... (None: open or in-question)
    subset: str = ""                            # summary group (task, problem version, subject, subfield)
    precision: Optional[int] = None             # decimals for numeric answers (MathVista)
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- files
def _load_file(path: str) -> list[tuple[str, dict]]:
    """[(record key, record)] from .json (list or id -> record), .jsonl or .parquet."""
    if path.endswith(".parquet"):
        try:  # lazy: pyarrow is needed (and imported) for parquet files only
            import pyarrow.parquet as pq
        except ImportError:
            raise EvalDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        rows = pq.read_table(path).to_pylist()
        return [(str(i), r) for i, r in enumerate(rows)]
    with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is dropped
        if path.endswith(".jsonl"):
            out = []
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append((str(i), json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise EvalDataError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
            return out
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):
        return [(str(k), v) for k, v in data.items()]
    if isinstance(data, list):
        return [(str(i), r) for i, r in enumerate(data)]
    raise EvalDataError(f"{path}: expected a JSON list or object of records")


def _files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith((".json", ".jsonl", ".parquet")))
        if not files:
            raise EvalDataError(f"{path}: no .json, .jsonl or .parquet files")
        return files
    if not os.path.exists(path):
        raise EvalDataError(f"data not found: {path}")
    return [path]


def _image(value, base: str):
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return value if os.path.isabs(value) else os.path.join(base, value)


def _need(rec: dict, key: str, where: str):
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip() and key != "question"):
        raise EvalDataError(f"{where}: missing field {key!r}")
    return v


_IMG_TAG = re.compile(r"<image_?\d*>")


# --------------------------------------------------------------------------- benchmarks
def read_mathvista(rec: dict, key: str, base: str, where: str) -> EvalSample:
    qtype = rec.get("question_type", "free_form")
    choices = rec.get("choices") if qtype == "multi_choice" else None
    prec = rec.get("precision")
    meta = rec.get("metadata") or {}
    img = rec.get("decoded_image") or rec.get("image")
    return EvalSample(
        id=str(rec.get("pid", key)), question=str(_need(rec, "question", where)), answer=str(_need(rec, "answer", where)),
        images=[i for i in [_image(img, base)] if i is not None], choices=list(choices) if choices else None,
        subset=str(meta.get("task") or meta.get("category") or ""),
        precision=int(prec) if isinstance(prec, (int, float)) and rec.get("answer_type") == "float" else None,
        meta={"question_type": qtype, "answer_type": rec.get("answer_type"), "unit": rec.get("unit")})


def read_mathverse(rec: dict, key: str, base: str, where: str) -> EvalSample:
    q = rec.get("question") or rec.get("question_for_eval") or ""
    if not q.strip():
        # 'Vision Only' problems put the whole question in the image
        q = "Answer the question shown in the image."
    meta = rec.get("metadata") or {}
    return EvalSample(
        id=str(rec.get("sample_index", key)), question=q, answer=str(_need(rec, "answer", where)),
        images=[i for i in [_image(rec.get("image"), base)] if i is not None],
        subset=str(rec.get("problem_version") or ""),
        meta={"question_type": rec.get("question_type"), "subject": meta.get("subject"),
              "problem_index": rec.get("problem_index")})


def read_mathvision(rec: dict, key: str, base: str, where: str) -> EvalSample:
    options = rec.get("options") or None
    img = rec.get("decoded_image") or rec.get("image")
    return EvalSample(
        id=str(rec.get("id", key)), question=_IMG_TAG.sub("", str(_need(rec, "question", where))).strip(),
        answer=str(_need(rec, "answer", where)), images=[i for i in [_image(img, base)] if i is not None],
        choices=list(options) if options else None, subset=str(rec.get("subject") or ""),
        meta={"level": rec.get("level")})


def read_olympiadbench(rec: dict, key: str, base: str, where: str) -> EvalSample:
    final = rec.get("final_answer")
    if isinstance(final, str):
        final = [final]
    if not final:
        raise EvalDataError(f"{where}: missing field 'final_answer' (theorem-proving items have none)")
    answer = ", ".join(str(a).strip().strip("$").strip() for a in final)
    question = str(_need(rec, "question", where))
    if rec.get("context"):
        question = f"{rec['context']}\n{question}"
    if rec.get("unit"):
        question += f"\nThe unit of the answer is {rec['unit']}."
    images = [_image(rec.get(f"image_{k}"), base) for k in range(1, 6)]
    return EvalSample(
        id=str(rec.get("id", key)), question=_IMG_TAG.sub("", question).strip(), answer=answer,
        images=[i for i in images if i is not None], subset=str(rec.get("subfield") or rec.get("subject") or ""),
        meta={"answer_type": rec.get("answer_type"), "is_multiple_answer": rec.get("is_multiple_answer")})


READERS = {
    "mathvista": read_mathvista,
    "mathverse": read_mathverse,
    "mathvision": read_mathvision,
    "olympiadbench": read_olympiadbench,
}

# What the paper reports for Infi-MMR-3B (arXiv 2505.23091), by benchmark: (split, accuracy %).
PAPER = {
    "mathvista": ("testmini", 67.2),
    "mathverse": ("testmini", 43.68),
    "mathvision": ("test", 27.04),
    "olympiadbench": ("", 21.33),
}


# A field that only one benchmark's published records carry: a record with another benchmark's
# field is that benchmark's, and reading it with the wrong reader would score it silently wrong
# (e.g. MathVista items under MathVerse, all in subset "all").
SIGNATURE = {"mathverse": "problem_version", "olympiadbench": "final_answer", "mathvista": "pid",
             "mathvision": "level"}
NAMES = {"mathvista": "MathVista", "mathverse": "MathVerse", "mathvision": "MATH-Vision",
         "olympiadbench": "OlympiadBench"}


def looks_like(rec: dict) -> Optional[str]:
    """The benchmark whose signature field `rec` has, or None (a hand-made file: no verdict)."""
    return next((b for b, key in SIGNATURE.items() if key in rec), None)


def load_benchmark(bench: str, path: str, images_root: Optional[str] = None,
                   limit: Optional[int] = None) -> list[EvalSample]:
    if bench not in READERS:
        raise EvalDataError(f"unknown benchmark {bench!r}; expected one of {', '.join(READERS)}")
    reader = READERS[bench]
    out: list[EvalSample] = []
    for file in _files(path):
        base = images_root or os.path.dirname(os.path.abspath(file))
        for key, rec in _load_file(file):
            where = f"{file}: record {key}"
            if not isinstance(rec, dict):
                raise EvalDataError(f"{where}: expected an object, got {type(rec).__name__}")
            other = looks_like(rec)
            if other not in (None, bench):
                raise EvalDataError(f"{where}: a {NAMES[other]} record (it has {SIGNATURE[other]!r}), not "
                                    f"{NAMES[bench]}: pass --bench {other}")
            if bench == "olympiadbench" and rec.get("question_type") == "Theorem proof":
                continue  # no final answer to verify
            if limit is not None and len(out) >= limit:
                return out
            s = reader(rec, key, base, where)
            if bench == "olympiadbench" and os.path.isdir(path):
                s.meta["file"] = os.path.basename(file)
            out.append(s)
    return out

