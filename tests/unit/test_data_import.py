"""`megammr data import`: each published layout (fixtures built here, in the column names and types
of the dataset cards), every field's destination, the documented errors and counted skips, image
deduplication, decontamination, --part, and the normalisation rules one by one."""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megammr import cli
from megammr.data import normalize as nz
from megammr.data.importers.base import ImportFailure
from megammr.data.importers.pipeline import in_part, import_dataset
from megammr.data.schema import RecordError, read_rows, validate
from megammr.data.shards import build_shards, read_manifest


def _img(seed: int, fmt="PNG", size=(24, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _run(fmt, inp, out, **kw):
    kw.setdefault("skip_invalid", False)
    kw.setdefault("overwrite", False)
    kw.setdefault("show_progress", False)
    return import_dataset(fmt, str(inp), str(out), **kw)


def _records(out):
    return [json.loads(x) for x in open(out, encoding="utf-8")]


def _valid(out, phase):
    """Every output line passes the record schema as `phase` (images read from OUT_images/)."""
    for row in read_rows(str(out)):
        validate(row, phase)


def _cli(capsys, *argv):
    code = cli.main(["data", "import", "--no-progress", *map(str, argv)])
    got = capsys.readouterr()
    return code, got.out, got.err


# --------------------------------------------------------------------------- DeepScaleR
def _deepscaler(tmp_path, rows):
    d = tmp_path / "deepscaler"
    d.mkdir()
    (d / "deepscaler.json").write_text(json.dumps(rows), encoding="utf-8")
    return d


GOOD_DS = [
    {"problem": "Compute $1+1$.", "answer": "2", "solution": "Add: $1+1=2$."},
    {"problem": "What is half of one?", "answer": "\\boxed{\\frac{1}{2}}", "solution": "Divide."},
    {"problem": "Which is prime?\n(A) 4 (B) 6 (C) 7", "answer": "7", "solution": "7 is prime."},
    {"problem": "  How many   sides\r\nhas a square?  ", "answer": 4, "solution": "Four."},
]


def test_deepscaler_fields_and_shards(tmp_path):
    out = tmp_path / "rec" / "phase1.jsonl"
    s = _run("deepscaler", _deepscaler(tmp_path, GOOD_DS), out)  # a directory: deepscaler.json is found
    assert (s.read, s.written, s.images_dir) == (4, 4, None)
    r = _records(out)
    assert [x["id"] for x in r] == ["deepscaler-0", "deepscaler-1", "deepscaler-2", "deepscaler-3"]
    assert r[0] == {"id": "deepscaler-0", "question": "Compute $1+1$.", "answer": "2", "source": "deepscaler",
                    "solution": "Add: $1+1=2$."}
    assert r[1]["answer"] == "\\frac{1}{2}"                       # box stripped, nested braces kept
    assert (r[2]["question"], r[2]["choices"], r[2]["answer"]) == ("Which is prime?", ["4", "6", "7"], "C")
    assert (r[3]["question"], r[3]["answer"]) == ("How many   sides\nhas a square?", "4")
    assert s.choices_from_question == 1
    _valid(out, 1)
    b = build_shards([str(out)], 1, str(tmp_path / "shards"), progress=False)
    assert b.written == 4 and read_manifest(str(tmp_path / "shards"))["samples"] == 4


@pytest.mark.parametrize("row, fld, reason", [
    ({"problem": "No answer here", "answer": "", "solution": "?"}, "answer", "empty_field"),  # the card's 6 rows
    ({"problem": "No answer key", "solution": "?"}, "answer", "missing_field"),
    ({"problem": 7, "answer": "7"}, "problem", "wrong_type"),
    ("just a string", "<record>", "wrong_type"),
    ({"problem": "Unclosed", "answer": "\\boxed{3"}, "answer", "bad_answer"),
    ({"problem": "Too long", "answer": "x" * 300}, "answer", "bad_answer"),
    ({"problem": "Pick (A) 1 (B) 2", "answer": "(E)"}, "answer", "bad_choices"),
])
def test_deepscaler_broken_rows(tmp_path, capsys, row, fld, reason):
    inp = _deepscaler(tmp_path, [GOOD_DS[0], row, GOOD_DS[1]])
    out = tmp_path / "p1.jsonl"
    with pytest.raises(RecordError) as e:
        _run("deepscaler", inp, out)
    assert (e.value.line, e.value.field, e.value.reason) == (2, fld, reason)
    assert str(e.value).startswith(f"{inp / 'deepscaler.json'}:2: {fld}: ")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # nothing written
    code, _, err = _cli(capsys, "--format", "deepscaler", "--input", inp, "--out", out)
    assert code == 1 and f"deepscaler.json:2: {fld}:" in err and "--skip-invalid" in err and "Traceback" not in err
    code, stdout, _ = _cli(capsys, "--format", "deepscaler", "--input", inp, "--out", out, "--skip-invalid")
    assert code == 0 and f"skipped invalid: 1 ({reason}: 1)" in stdout
    assert [x["id"] for x in _records(out)] == ["deepscaler-0", "deepscaler-2"]
    rej = _records(tmp_path / "p1.rejected.jsonl")
    assert [(x["row"], x["field"], x["reason"]) for x in rej] == [(2, fld, reason)]


def test_file_level_errors(tmp_path, capsys):
    (tmp_path / "deepscaler.json").write_text('[{"problem": "x", "answer": "1"}', encoding="utf-8")
    code, _, err = _cli(capsys, "--format", "deepscaler", "--input", tmp_path / "deepscaler.json",
                        "--out", tmp_path / "o.jsonl")
    assert code == 1 and "not valid JSON" in err and "truncated" in err
    code, _, err = _cli(capsys, "--format", "deepscaler", "--input", tmp_path / "nope", "--out", tmp_path / "o.jsonl")
    assert code == 1 and "no such file or directory" in err
    code, _, err = _cli(capsys, "--format", "deepscaler", "--input", tmp_path, "--out", tmp_path / "o.txt")
    assert code == 1 and "JSONL" in err
    code, _, err = _cli(capsys, "--format", "virl39k", "--input", tmp_path, "--out", tmp_path / "o.jsonl",
                        "--map", "question=q")
    assert code == 2 and "--format columns" in err
    code, _, err = _cli(capsys, "--format", "virl39k", "--input", tmp_path, "--out", tmp_path / "o.jsonl",
                        "--part", "3/2")
    assert code == 2 and "I/N" in err


# --------------------------------------------------------------------------- ViRL39K
def _virl_table(root, rows):
    """The release's columns and types: image a list of strings (paths under images/)."""
    (root / "images").mkdir(exist_ok=True)
    cols = {k: [r[k] for r in rows] for k in ("question", "answer", "image", "PassRate_32BTrained",
                                               "PassRate_7BBase", "category", "source", "qid")}
    schema = pa.schema([("question", pa.string()), ("answer", pa.string()), ("image", pa.list_(pa.string())),
                        ("PassRate_32BTrained", pa.float64()), ("PassRate_7BBase", pa.float64()),
                        ("category", pa.string()), ("source", pa.string()), ("qid", pa.string())])
    pq.write_table(pa.table(cols, schema=schema), root / "39Krelease.parquet")


def _virl_row(i, **kw):
    r = {"question": f"<image>What is the value {i} in the chart?", "answer": f"\\boxed{{{i}}}",
         "image": [f"images/q{i}-0.png"], "PassRate_32BTrained": 0.5, "PassRate_7BBase": -1.0,
         "category": "Charts", "source": "MM-Eureka", "qid": f"q{i}"}
    r.update(kw)
    return r


def test_virl39k_fields_dedup_and_shards(tmp_path):
    root = tmp_path / "virl39k"
    root.mkdir()
    _virl_table(root, [])  # creates images/
    shared = _img(1)
    for name, blob in [("q1-0.png", shared), ("q2-0.png", shared), ("q3-0.jpg", _img(3, "JPEG")),
                       ("q3-1.png", _img(4))]:
        (root / "images" / name).write_bytes(blob)
    rows = [_virl_row(1), _virl_row(2, PassRate_7BBase=0.25),
            _virl_row(3, question="<image><image>Which colour is larger?\nChoices:\nA. red\nB. blue",
                      answer="\\boxed{B}", image=["images/q3-0.jpg", "images/q3-1.png"], category="Spatial"),
            _virl_row(4, qid="q1b", image=["images/q1-0.png"], question="<image>What is the value 1 in the chart?",
                      answer="\\boxed{1}")]  # the same record as q1 under another id
    _virl_table(root, rows)
    out = tmp_path / "rec" / "virl.jsonl"
    s = _run("virl39k", root, out)
    assert (s.read, s.written, s.duplicate_records) == (4, 3, 1)
    assert (s.images_written, s.duplicate_images) == (3, 1)  # q1/q2 share bytes: stored once
    r = {x["id"]: x for x in _records(out)}
    q1 = r["q1"]
    assert (q1["question"], q1["answer"], q1["source"]) == ("What is the value 1 in the chart?", "1", "virl39k")
    assert (q1["category"], q1["origin"], q1["PassRate_32BTrained"], q1["PassRate_7BBase"]) == \
        ("Charts", "MM-Eureka", 0.5, -1.0)
    assert r["q2"]["PassRate_7BBase"] == 0.25
    assert q1["images"] == r["q2"]["images"] and q1["images"][0].startswith("virl_images/")
    assert os.path.isfile(out.parent / q1["images"][0])
    q3 = r["q3"]
    assert (q3["question"], q3["choices"], q3["answer"]) == ("Which colour is larger?", ["red", "blue"], "B")
    assert len(q3["images"]) == 2 and q3["images"][0].endswith(".jpg")
    assert open(out.parent / q3["images"][0], "rb").read() == (root / "images" / "q3-0.jpg").read_bytes()
    _valid(out, 3)
    b = build_shards([str(out)], 3, str(tmp_path / "shards"), progress=False)
    assert b.written == 3


def test_virl39k_image_bytes_and_structs(tmp_path):
    """HF `Image` features: bytes, and {bytes, path} structs."""
    a, b = _img(5), _img(6, "JPEG")
    t = pa.table({"question": ["Q one?", "Q two?"], "answer": ["\\boxed{1}", "\\boxed{2}"],
                  "image": pa.array([[{"bytes": a, "path": "x.png"}], [{"bytes": b, "path": None}]],
                                    pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
                  "qid": ["a", "b"], "PassRate_32BTrained": [0.1, 0.9]})
    pq.write_table(t, tmp_path / "s.parquet")
    t2 = pa.table({"question": ["Q three?"], "answer": ["\\boxed{3}"], "image": pa.array([[a]], pa.list_(pa.binary())),
                   "qid": ["c"]})
    pq.write_table(t2, tmp_path / "b.parquet")
    out = tmp_path / "o.jsonl"
    s = _run("virl39k", tmp_path / "s.parquet", out)
    assert s.written == 2
    r = _records(out)
    assert open(tmp_path / r[0]["images"][0], "rb").read() == a and r[1]["images"][0].endswith(".jpg")
    s = _run("virl39k", tmp_path / "b.parquet", tmp_path / "o2.jsonl")
    assert s.written == 1 and open(tmp_path / _records(tmp_path / "o2.jsonl")[0]["images"][0], "rb").read() == a


@pytest.mark.parametrize("kw, fld, reason", [
    ({"image": ["images/missing.png"]}, "images[0]", "unreadable_image"),
    ({"question": "<image><image>Two placeholders, one image?"}, "question", "image_count_mismatch"),
    ({"image": []}, "image", "missing_field"),
    ({"answer": ""}, "answer", "empty_field"),
])
def test_virl39k_broken_rows(tmp_path, kw, fld, reason):
    root = tmp_path / "v"
    root.mkdir()
    _virl_table(root, [])
    (root / "images" / "q1-0.png").write_bytes(_img(1))
    (root / "images" / "q2-0.png").write_bytes(_img(2))
    _virl_table(root, [_virl_row(1), _virl_row(2, **kw)])
    with pytest.raises(RecordError) as e:
        _run("virl39k", root, tmp_path / "o.jsonl")
    assert (e.value.line, e.value.field, e.value.reason) == (2, fld, reason)
    if reason == "unreadable_image":
        assert "--images-root" in e.value.message and "images.zip" in e.value.message
    s = _run("virl39k", root, tmp_path / "o.jsonl", skip_invalid=True)
    assert (s.written, dict(s.skipped)) == (1, {reason: 1})


def test_virl39k_missing_columns_and_bad_pass_rate(tmp_path):
    pq.write_table(pa.table({"problem": ["x"], "answer": ["1"]}), tmp_path / "39Krelease.parquet")
    with pytest.raises(ImportFailure, match="no column question, image.*--format columns"):
        _run("virl39k", tmp_path, tmp_path / "o.jsonl")
    (tmp_path / "i.png").write_bytes(_img(1))
    pq.write_table(pa.table({"question": ["x?"], "answer": ["\\boxed{1}"], "image": [["i.png"]],
                             "PassRate_7BBase": ["high"]}), tmp_path / "39Krelease.parquet")
    with pytest.raises(RecordError) as e:
        _run("virl39k", tmp_path, tmp_path / "o.jsonl")
    assert (e.value.field, e.value.reason) == ("PassRate_7BBase", "wrong_type")


# --------------------------------------------------------------------------- LLaVA
def _llava(tmp_path, rows, name="train_samples_all_tuning.json"):
    img = tmp_path / "data_images" / "Geometry3K" / "images"
    img.mkdir(parents=True, exist_ok=True)
    (img / "1.png").write_bytes(_img(11))
    (img / "2.png").write_bytes(_img(12))
    (tmp_path / name).write_text(json.dumps(rows), encoding="utf-8")
    return tmp_path / name


def _conv(q, a, *extra):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}, *extra]


LLAVA_ROWS = [
    {"id": "geo-1", "image": "Geometry3K/images/1.png",
     "conversations": _conv("<image>\nFind x.\nChoices:\nA: 9.0\nB: 14.0\nC: 18.0", "The answer is B")},
    {"image": "Geometry3K/images/2.png",  # MathV360K rows have no id
     "conversations": _conv("<image>\nWhat is the area?", "Area = 6 * 2 = 12, so the answer is \\boxed{12}.")},
    {"id": "multi", "images": ["Geometry3K/images/1.png", "Geometry3K/images/2.png"],
     "conversations": [{"from": "system", "value": "Be brief."}, *_conv("<image> and <image>: same shape?", "Yes")],
     "data_source": "synthetic"},
    {"id": "text", "conversations": _conv("What is 3*3?", "9")},
]


def test_llava_fields(tmp_path):
    inp = _llava(tmp_path, LLAVA_ROWS)
    out = tmp_path / "out" / "geo.jsonl"
    s = _run("llava", inp, out, images_root=tmp_path / "data_images")
    assert s.written == 4
    r = {x["id"]: x for x in _records(out)}
    g = r["geo-1"]
    assert (g["question"], g["choices"], g["answer"], g["response"]) == \
        ("Find x.", ["9.0", "14.0", "18.0"], "B", "The answer is B")
    area = r["train_samples_all_tuning-1"]
    assert (area["question"], area["answer"], area["source"]) == ("What is the area?", "12", "train_samples_all_tuning")
    assert "\\boxed{12}" in area["response"]
    m = r["multi"]
    assert (m["question"], m["answer"], len(m["images"]), m["data_source"]) == ("and : same shape?", "Yes", 2,
                                                                                 "synthetic")
    assert "response" not in m and "images" not in r["text"]
    for row in read_rows(str(out)):  # every record passes the schema at its phase (3: images, 1: text)
        validate(row, 3 if row.data.get("images") else 1)


@pytest.mark.parametrize("row, fld, reason", [
    ({"id": "m", "image": "Geometry3K/images/1.png",
      "conversations": _conv("<image>\nQ1", "A1", {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"})},
     "conversations", "bad_conversation"),
    ({"id": "s", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "1"}]},
     "conversations[0].from", "bad_conversation"),
    ({"id": "n", "image": "Geometry3K/images/1.png"}, "conversations", "missing_field"),
    ({"id": "t", "conversations": _conv("<image>\nWhat is this?", "A cat")}, "question", "image_count_mismatch"),
    ({"id": "e", "conversations": _conv("Q?", "   ")}, "conversations[1].value", "empty_field"),
    ({"id": "geo-1", "conversations": _conv("Again?", "1")}, "id", "duplicate_id"),
])
def test_llava_broken_rows(tmp_path, row, fld, reason):
    inp = _llava(tmp_path, [LLAVA_ROWS[0], row])
    with pytest.raises(RecordError) as e:
        _run("llava", inp, tmp_path / "o.jsonl", images_root=tmp_path / "data_images")
    assert (e.value.line, e.value.field, e.value.reason) == (2, fld, reason)
    s = _run("llava", inp, tmp_path / "o.jsonl", images_root=tmp_path / "data_images", skip_invalid=True)
    assert (s.written, dict(s.skipped)) == (1, {reason: 1})


def test_llava_parquet_with_image_struct(tmp_path):
    """Hugging Face's parquet conversion of a LLaVA set: image as {bytes, path}, turns as structs."""
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    t = pa.table({"id": ["p1"], "image": pa.array([{"bytes": _img(9), "path": "a.png"}],
                                                  pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "conversations": pa.array([[{"from": "human", "value": "<image>\nHow many?"},
                                              {"from": "gpt", "value": "Answer: 3"}]], pa.list_(turn)),
                  "source": ["Geometry3K(MathV360K)"]})
    pq.write_table(t, tmp_path / "geo.parquet")
    s = _run("llava", tmp_path / "geo.parquet", tmp_path / "o.jsonl")
    r = _records(tmp_path / "o.jsonl")[0]
    assert s.written == 1 and (r["answer"], r["source"], r["question"]) == ("3", "Geometry3K(MathV360K)", "How many?")


# --------------------------------------------------------------------------- columns
def test_columns_map_and_phase2_shards(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_img(21))
    t = pa.table({"uid": ["u1", "u2"], "prompt": ["Which is bigger?", "How many dots?"], "gold": ["10", "3"],
                  "opts": [["5", "10"], None], "pic": ["pics/a.png", None],
                  "pic_bytes": [None, _img(22)], "desc": ["two bars", "three dots"], "difficulty": [1, 2],
                  "blob": [b"\x00", b"\x01"]})
    pq.write_table(t, tmp_path / "t.parquet")
    out = tmp_path / "o.jsonl"
    with pytest.raises(ImportFailure, match="no column for question, answer"):
        _run("columns", tmp_path / "t.parquet", out)
    with pytest.raises(ImportFailure, match="--map question=nope: no such column"):
        _run("columns", tmp_path / "t.parquet", out, column_map={"question": "nope", "answer": "gold"})
    with pytest.raises(ImportFailure, match="unknown target"):
        _run("columns", tmp_path / "t.parquet", out, column_map={"qestion": "prompt"})
    # images from a path column for one row: a second table maps the bytes column
    s = _run("columns", tmp_path / "t.parquet", out, column_map={
        "id": "uid", "question": "prompt", "answer": "gold", "choices": "opts", "images": "pic", "caption": "desc"},
        skip_invalid=True)
    r = _records(out)
    assert s.written == 2 and s.dropped_columns == {"blob", "pic_bytes"}
    assert r[0] == {"id": "u1", "question": "Which is bigger?", "answer": "B", "choices": ["5", "10"],
                    "images": r[0]["images"], "caption": "two bars", "source": "t", "difficulty": 1}
    assert "images" not in r[1]
    s = _run("columns", tmp_path / "t.parquet", tmp_path / "o2.jsonl", overwrite=False, column_map={
        "id": "uid", "question": "prompt", "answer": "gold", "images": "pic_bytes", "caption": "desc"},
        skip_invalid=True)
    assert s.written == 2  # row 1 has no image bytes: a text record
    out3 = tmp_path / "p2.jsonl"
    _run("columns", tmp_path / "t.parquet", out3, column_map={
        "id": "uid", "question": "prompt", "answer": "gold", "images": "pic", "caption": "desc", "choices": "opts"},
        limit=1)
    _valid(out3, 2)
    assert build_shards([str(out3)], 2, str(tmp_path / "sh2"), progress=False).written == 1


def test_columns_jsonl_identity_and_missing(tmp_path):
    lines = [{"id": 1, "question": "2+2?", "answer": 4}, {"id": 2, "question": "No answer"},
             {"id": 3, "question": "Pick", "answer": "A", "choices": '["x", "y"]'}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    with pytest.raises(RecordError) as e:
        _run("columns", tmp_path / "t.jsonl", tmp_path / "o.jsonl")
    assert (e.value.line, e.value.field, e.value.reason) == (2, "answer", "missing_field")
    s = _run("columns", tmp_path / "t.jsonl", tmp_path / "o.jsonl", skip_invalid=True)
    r = _records(tmp_path / "o.jsonl")
    assert s.written == 2 and r[0]["answer"] == "4" and r[1]["choices"] == ["x", "y"]


# --------------------------------------------------------------------------- pipeline
def test_decontamination_part_progress_overwrite(tmp_path, capsys):
    rows = [{"problem": f"Problem number {i}: find the sum of the first {i} odd numbers.", "answer": str(i * i)}
            for i in range(1, 21)]
    inp = _deepscaler(tmp_path, rows)
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"id": "e", "question": rows[4]["problem"]}) + "\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    s = _run("deepscaler", inp, out, exclude=[str(ev)], show_progress=True, progress_every=5)
    assert s.written == 19 and s.decontaminated == {str(ev): 1}
    err = capsys.readouterr().err
    assert "5 rows read" in err and "20 rows read" in err  # not a terminal: a line every N rows
    with pytest.raises(ImportFailure, match="exists.*--overwrite"):
        _run("deepscaler", inp, out)
    p1 = _run("deepscaler", inp, tmp_path / "a.jsonl", part=(1, 2))
    p2 = _run("deepscaler", inp, tmp_path / "b.jsonl", part=(2, 2))
    ids1 = {x["id"] for x in _records(tmp_path / "a.jsonl")}
    ids2 = {x["id"] for x in _records(tmp_path / "b.jsonl")}
    assert not ids1 & ids2 and len(ids1 | ids2) == 20 and p1.outside_part == len(ids2) and p2.written == len(ids2)
    assert all(in_part(i, (1, 2)) for i in ids1)
    code, stdout, _ = _cli(capsys, "--format", "deepscaler", "--input", inp, "--out", out, "--overwrite",
                           "--decontam-against", ev, "--limit", "10")
    assert code == 0 and "decontaminated against" in stdout and len(_records(out)) == 9
    # an images folder that is not ours is never replaced
    (tmp_path / "x_images").mkdir()
    with pytest.raises(ImportFailure, match="not the images folder of a megammr import"):
        _run("deepscaler", inp, tmp_path / "x.jsonl")


def test_same_input_same_bytes(tmp_path):
    inp = _llava(tmp_path, LLAVA_ROWS)
    for name in ("a", "b"):
        _run("llava", inp, tmp_path / name / "r.jsonl", images_root=tmp_path / "data_images")
    assert (tmp_path / "a" / "r.jsonl").read_bytes() == (tmp_path / "b" / "r.jsonl").read_bytes()
    assert sorted(os.listdir(tmp_path / "a" / "r_images")) == sorted(os.listdir(tmp_path / "b" / "r_images"))


# --------------------------------------------------------------------------- normalisation rules
def test_rule_image_tokens():
    assert nz.strip_image_tokens("<image>\nWhat is x?") == ("What is x?", 1)
    assert nz.strip_image_tokens("Compare <image> with <image>.") == ("Compare with .", 2)
    assert nz.strip_image_tokens("no placeholder") == ("no placeholder", 0)
    with pytest.raises(nz.NormalizeError) as e:
        nz.normalize("<image>Q?", "1", num_images=2, max_answer_chars=10)
    assert e.value.reason == "image_count_mismatch"
    assert nz.normalize("Q?", "1", num_images=2, max_answer_chars=10).question == "Q?"  # no placeholder: fine


def test_rule_question_whitespace():
    assert nz.clean_text("  a  \r\nb \r\n\r\n\r\n\nc  ") == "a\nb\n\nc"


def test_rule_answer_whitespace():
    assert nz.normalize_answer("  12 \n cm ") == "12 cm"
    assert nz.normalize_answer(3) == "3" and nz.normalize_answer(2.5) == "2.5"
    with pytest.raises(nz.NormalizeError):
        nz.normalize_answer(True)


def test_rule_boxed():
    assert nz.normalize_answer("\\boxed{5}") == "5"
    assert nz.normalize_answer("\\boxed{\\frac{\\sqrt{3}}{2}}") == "\\frac{\\sqrt{3}}{2}"  # nested braces
    assert nz.normalize_answer("\\boxed {\\{1, 2\\}}") == "\\{1, 2\\}"                 # escaped braces
    assert nz.normalize_answer("The answer is \\boxed{17^\\circ}.") == "17^\\circ"
    assert nz.normalize_answer("\\boxed{2}, \\boxed{3}") == "2, 3"                     # multi-part answer
    assert nz.normalize_answer("\\fbox{7}") == "7"
    assert nz.normalize_answer("x^{2}") == "x^{2}"                                     # no box: unchanged
    with pytest.raises(nz.NormalizeError) as e:
        nz.normalize_answer("\\boxed{\\frac{1}{2}")
    assert e.value.reason == "bad_answer" and "never closed" in e.value.message


def test_rule_final_answer_of_a_response():
    assert nz.final_answer("so \\boxed{3}, then \\boxed{4}") == "4"                    # last box
    assert nz.final_answer("<think>..</think><answer> 7 </answer>").strip() == "7"
    assert nz.final_answer("Reasoning.\nThe answer is B.") == "B"
    assert nz.final_answer("Reasoning.\nAnswer: 14.0") == "14.0"
    assert nz.final_answer("Yes") == "Yes"


def test_rule_math_delimiters():
    assert nz.unwrap_math("$5$") == "5" and nz.unwrap_math("$$x+1$$") == "x+1"
    assert nz.unwrap_math("\\(\\pi\\)") == "\\pi" and nz.unwrap_math("\\[2\\]") == "2"
    assert nz.unwrap_math("\\text{B}") == "B" and nz.unwrap_math("$\\text{(C)}$") == "(C)"
    assert nz.unwrap_math("$a$ and $b$") == "$a$ and $b$"                              # not one span
    assert nz.unwrap_math("\\text{a} + \\text{b}") == "\\text{a} + \\text{b}"


def test_rule_answer_length():
    assert nz.normalize("Q", "x" * 10, num_images=0, max_answer_chars=10).answer == "x" * 10
    with pytest.raises(nz.NormalizeError) as e:
        nz.normalize("Q", "x" * 11, num_images=0, max_answer_chars=10)
    assert e.value.reason == "bad_answer" and "--max-answer-chars" in e.value.message


def test_rule_choices_in_question():
    header = nz.split_choices("Find x.\nChoices:\nA: 9.0\nB: 14.0\nC: 18.0\nAnswer with the letter.")
    assert (header.stem, header.options, header.rest) == ("Find x.", ["9.0", "14.0", "18.0"], "Answer with the letter.")
    inline = nz.split_choices("Which? Options: (A) red; (B) blue; (C) green")
    assert (inline.stem, inline.options) == ("Which?", ["red", "blue", "green"])
    lines = nz.split_choices("Pick one.\nA. a cat\nB) a dog")
    assert (lines.stem, lines.options) == ("Pick one.", ["a cat", "a dog"])
    trailing = nz.split_choices("Which is prime? (A) 4 (B) 7")
    assert (trailing.stem, trailing.options) == ("Which is prime?", ["4", "7"])
    assert nz.split_choices("Point A. lies on line B.") is None          # labels must start options
    assert nz.split_choices("Is (A) bigger?") is None                    # one label is not a choice list
    assert nz.split_choices("Options: A. x C. y") is None                # not consecutive from A


def test_rule_choices_answer_matching():
    q = "Find x.\nChoices: A. 3 B. 4"
    assert (nz.normalize(q, "B", num_images=0, max_answer_chars=50).answer,
            nz.normalize(q, "4", num_images=0, max_answer_chars=50).answer) == ("B", "B")  # letter or option text
    n = nz.normalize(q, "(A)", num_images=0, max_answer_chars=50)
    assert (n.question, n.choices, n.answer, n.choices_from_question) == ("Find x.", ["3", "4"], "A", True)
    free = nz.normalize(q, "7", num_images=0, max_answer_chars=50)   # names no option: left as written
    assert (free.question, free.choices, free.answer) == ("Find x.\nChoices: A. 3 B. 4", None, "7")
    with pytest.raises(nz.NormalizeError) as e:
        nz.normalize(q, "D", num_images=0, max_answer_chars=50)
    assert e.value.reason == "bad_choices" and "A-B" in e.value.message


def test_rule_choice_labels_and_explicit_choices():
    assert [nz.choice_label(x) for x in ("B", "(B)", "B.", "B)", "B:", "Option B", "answer: (C)")] == \
        ["B", "B", "B", "B", "B", "B", "C"]
    assert nz.choice_label("b") is None and nz.choice_label("Bob") is None
    n = nz.normalize("Which?\n(A) x (B) y", "Option B", choices=["x", "y"], num_images=0, max_answer_chars=50)
    assert (n.question, n.choices, n.answer) == ("Which?", ["x", "y"], "B")   # the repeated options are cut
    n = nz.normalize("Which?", "y", choices={"B": "y", "A": "x"}, num_images=0, max_answer_chars=50)
    assert (n.choices, n.answer) == (["x", "y"], "B")
    with pytest.raises(nz.NormalizeError):
        nz.normalize("Which?", "y", choices="x, y", num_images=0, max_answer_chars=50)
