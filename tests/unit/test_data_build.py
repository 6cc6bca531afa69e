"""Record validation, shard building (errors, --skip-invalid, determinism, atomicity), read-back."""
import base64
import collections
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from megammr.data.schema import RecordError, read_rows, validate
from megammr.data.shards import BuildError, build_shards, read_manifest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _png(seed: int, size=(40, 30), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(), mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# (line content, expected (field, reason) or None for a good record); line numbers follow the list.
def _mixed(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "a.png").write_bytes(_png(1))
    (img / "b.jpg").write_bytes(_jpg(2))
    (img / "c.png").write_bytes(_png(3, mode="RGBA"))
    (img / "trunc.png").write_bytes(_png(4, size=(64, 64))[:300])
    (img / "text.png").write_bytes(b"this is not an image")
    (img / "big.png").write_bytes(_png(5, size=(300, 300)))
    (img / "thin.png").write_bytes(_png(6, size=(402, 2)))

    def rec(i, **kw):
        d = {"id": f"r{i}", "question": f"What is shown in picture {i}?", "answer": str(i), "caption": f"cap {i}",
             "images": ["img/a.png"]}
        d.update(kw)
        return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()

    lines = [
        (rec(1), None),
        (rec(2, images=["img/b.jpg", "img/c.png"], choices=["1", "2", "3"], answer="2"), None),
        (rec(3, answer=...), ("answer", "missing_field")),
        (rec(4, question=7), ("question", "wrong_type")),
        (rec(5, question="   "), ("question", "empty_field")),
        (b'{"id": "r6", "question": "broken', ("<line>", "invalid_json")),
        (b'{"id": "r7", "question": "caf\xe9?", "answer": "1"}', ("<line>", "invalid_utf8")),
        (rec(1), ("id", "duplicate_id")),
        (rec(9, images=["img/missing.png"]), ("images[0]", "unreadable_image")),
        (rec(10, images=["img/text.png"]), ("images[0]", "unreadable_image")),
        (rec(11, images=["img/a.png", "img/trunc.png"]), ("images[1]", "truncated_image")),
        (rec(12, images=["img/big.png"]), ("images[0]", "image_too_large")),
        (rec(13, answer=""), ("answer", "empty_field")),
        (rec(14, caption=...), ("caption", "missing_field")),
        (rec(15, choices=["x", "y"], answer="z"), ("answer", "bad_choices")),
        (rec(16, images="img/a.png"), ("images", "wrong_type")),
        (rec(17, images=["img/thin.png"]), ("images[0]", "image_aspect_ratio")),
        (rec(18, answer=4.5, choices=...), None),
        (b"[1, 2]", ("<record>", "wrong_type")),
        (rec(20, images=[]), ("images", "missing_field")),
        (rec(21, question="caf\u00e9 \u2013 \u00fcber?"), None),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(body for body, _ in lines) + b"\n\n")
    return str(path), lines


MAX_PIX = 200 * 200  # big.png (300x300) is over it


def test_each_bad_record_names_file_line_field(tmp_path):
    path, lines = _mixed(tmp_path)
    seen = set()
    got = {}
    for row in read_rows(path):
        try:
            r = validate(row, 2, max_image_pixels=MAX_PIX)
            if r.id in seen:  # duplicates are checked by the build (it holds the ids)
                raise RecordError(row.path, row.line, "id", "duplicate_id", "dup")
            seen.add(r.id)
            got[row.line] = None
        except RecordError as e:
            assert str(e).startswith(f"{path}:{row.line}: {e.field}: ")
            got[row.line] = (e.field, e.reason)
    assert got == {i + 1: exp for i, (_, exp) in enumerate(lines)}


def test_default_stops_at_first_error_and_writes_nothing(tmp_path):
    path, _ = _mixed(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(RecordError) as ei:
        build_shards([path], 2, str(out), max_image_pixels=MAX_PIX, progress=False)
    assert ei.value.line == 3 and ei.value.field == "answer"
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if "building" in p]
    # The CLI prints file:line: field and exits 1.
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools/build_shards.py"), "--phase", "2", "--input", path,
                        "--out", str(out), "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1 and f"{path}:3: answer: required field is missing" in p.stderr


def _read_webdataset(out):
    import webdataset as wds
    tars = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tar"))
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))


def _read_energon(out):
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset
    from megammr.data.loader import PhaseTaskEncoder

    class RawEnc(PhaseTaskEncoder):  # the project's cooker, without prompt encoding: raw parts back
        def encode_sample(self, s):
            return s

    wc = WorkerConfig(rank=0, world_size=1, num_workers=0)
    ds = get_train_dataset(out, worker_config=wc, batch_size=None, shuffle_buffer_size=None,
                           max_samples_per_sequence=None, repeat=False,
                           task_encoder=RawEnc("image", None, None, 3136, 1003520))
    loader = get_loader(ds)
    loader.pin_memory = False  # CPU only: torch warns about pinned memory otherwise
    return list(loader)


def test_skip_invalid_counts_rejects_and_reads_back_byte_equal(tmp_path):
    path, lines = _mixed(tmp_path)
    out = str(tmp_path / "out")
    s = build_shards([path], 2, out, skip_invalid=True, max_image_pixels=MAX_PIX, progress=False,
                     shard_max_samples=2)
    want = collections.Counter(exp[1] for _, exp in lines if exp)
    assert s.skipped == want and s.read == len(lines) and s.written == 4 and s.shards == 2
    rejected = [json.loads(x) for x in open(os.path.join(out, "rejected.jsonl"))]
    assert [(r["line"], r["field"], r["reason"]) for r in rejected] == \
        [(i + 1, *exp) for i, (_, exp) in enumerate(lines) if exp]
    utf8 = next(r for r in rejected if r["reason"] == "invalid_utf8")
    assert base64.b64decode(utf8["raw_base64"]) == lines[6][0]
    assert next(r for r in rejected if r["reason"] == "invalid_json")["raw"] == lines[5][0].decode()
    assert read_manifest(out)["skipped"] == dict(want)

    img = tmp_path / "img"
    expected = {  # id -> (answer, image bytes)
        "r1": ("1", [(img / "a.png").read_bytes()]),
        "r2": ("B", [(img / "b.jpg").read_bytes(), (img / "c.png").read_bytes()]),
        "r18": ("4.5", [(img / "a.png").read_bytes()]),
        "r21": ("21", [(img / "a.png").read_bytes()]),
    }
    plain = _read_webdataset(out)
    assert len(plain) == 4
    for smp in plain:
        meta = json.loads(smp["json"])
        ans, imgs = expected[meta["id"]]
        assert meta["answer"] == ans and meta["phase"] == 2 and meta["caption"].startswith("cap ")
        assert [smp[name] for name in meta["images"]] == imgs
    assert json.loads(plain[3]["json"])["question"] == "caf\u00e9 \u2013 \u00fcber?"
    en = _read_energon(out)
    assert sorted(x.meta["id"] for x in en) == sorted(expected)
    for x in en:
        assert x.images == expected[x.meta["id"]][1] and x.meta["answer"] == expected[x.meta["id"]][0]


def test_deterministic_and_overwrite(tmp_path):
    from megammr.data.synthetic import write_phase
    jsonl = write_phase(str(tmp_path / "raw"), 3, 12, seed=5)
    digests = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        build_shards([jsonl], 3, out, shard_max_bytes=40_000, progress=False)
        tars = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
        assert len(tars) > 1  # bounded by bytes
        digests.append({f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest() for f in tars})
        for f in (".nv-meta/split.yaml", ".nv-meta/dataset.yaml"):
            assert os.path.isfile(os.path.join(out, f))
    assert digests[0] == digests[1]
    with pytest.raises(BuildError, match="exists"):
        build_shards([jsonl], 3, str(tmp_path / "a"), progress=False)
    s = build_shards([jsonl], 3, str(tmp_path / "a"), overwrite=True, progress=False)
    assert s.written == 12


def test_phase_rules_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    png = _png(7)
    table = pa.table({"id": [1, 2, 3], "question": ["q one?", "q two?", "q three?"], "answer": ["a", "b", "c"],
                      "caption": ["c1", "c2", "c3"],
                      "images": [[{"bytes": png, "path": None}], [{"bytes": png, "path": None}], []]})
    path = str(tmp_path / "rows.parquet")
    pq.write_table(table, path)
    s = build_shards([path], 3, str(tmp_path / "p3"), skip_invalid=True, progress=False)
    assert s.written == 2 and s.skipped == {"missing_field": 1} and s.captions_dropped == 2
    got = _read_webdataset(str(tmp_path / "p3"))
    assert all("caption" not in json.loads(x["json"]) for x in got) and got[0]["img0.png"] == png
    # Phase 1 refuses images; the error names the parquet row.
    with pytest.raises(RecordError, match=r"rows\.parquet:1: images: phase 1 records are text-only"):
        build_shards([path], 1, str(tmp_path / "p1"), progress=False)


def test_decontamination(tmp_path):
    train = tmp_path / "train.jsonl"
    long_q = "A farmer has seventeen sheep and all but nine run away from the farm during the storm, how many are left"
    rows = [{"id": 1, "question": "What is 2 + 2?", "answer": "4"},
            {"id": 2, "question": "WHAT is 2+2 ?", "answer": "4"},          # exact after normalisation
            {"id": 3, "question": "Story: " + long_q + " in the end?", "answer": "9"},  # 13-gram overlap
            {"id": 4, "question": "How many legs does a spider have?", "answer": "8"}]
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ev1, ev2 = tmp_path / "ev1.jsonl", tmp_path / "ev2.jsonl"
    ev1.write_text(json.dumps({"question": "what is 2 + 2"}) + "\n")
    ev2.write_text(json.dumps({"problem": long_q}) + "\n")
    s = build_shards([str(train)], 1, str(tmp_path / "out"), exclude=(str(ev1), str(ev2)), progress=False)
    assert s.written == 1 and s.decontaminated == {str(ev1): 2, str(ev2): 1}
    assert [json.loads(x["json"])["id"] for x in _read_webdataset(str(tmp_path / "out"))] == ["4"]
