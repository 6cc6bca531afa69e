"""Synthetic data (deterministic, verifiable), the caption tool (batching, resume), bench data."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from megammr.data.caption import caption_file
from megammr.data.shards import build_shards
from megammr.data.synthetic import write_phase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tree_digest(root):
    h = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h


def test_synthetic_is_deterministic_and_valid(tmp_path):
    for name in ("a", "b"):
        for phase in (1, 2, 3):
            write_phase(str(tmp_path / name), phase, 24, seed=3)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    recs = {p: [json.loads(x) for x in open(tmp_path / "a" / f"phase{p}.jsonl")] for p in (1, 2, 3)}
    assert all("images" not in r for r in recs[1])
    assert all(r["caption"] and len(r["images"]) == 1 for r in recs[2])
    assert all("caption" not in r and len(r["images"]) == 1 for r in recs[3])
    assert any("choices" in r for p in (1, 2, 3) for r in recs[p])
    assert {r["source"] for r in recs[3]} == {f"synthetic/{k}" for k in ("bar_chart", "counting", "reading", "geometry")}
    for p in (1, 2, 3):  # every record passes validation as its phase (default: stop on the first error)
        s = build_shards([str(tmp_path / "a" / f"phase{p}.jsonl")], p, str(tmp_path / f"s{p}"), progress=False)
        assert s.written == 24
    # Answers follow from the rendered facts (the caption states them): spot-check the readable kinds.
    for r in recs[2]:
        if r["question"].startswith("What is the number shown in the image plus "):
            k = int(r["question"].rsplit(" ", 1)[1].rstrip("?"))
            assert int(r["answer"]) == int(r["caption"].rsplit(" ", 1)[1].rstrip(".")) + k
        if r["question"] == "What is the area of the rectangle in the image?" and "choices" not in r:
            w, h = [int(t.rstrip(".")) for t in r["caption"].split() if t.rstrip(".").isdigit()]
            assert int(r["answer"]) == w * h


class FakeEngine:
    """Implements the rollout protocol; can be told to fail on a given call (an interruption)."""

    def __init__(self, fail_on_call=None):
        self.calls, self.seen, self.fail_on_call = 0, [], fail_on_call

    def generate(self, prompts, n, sampling):
        from megammr.rollout import Rollout
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        out = []
        for i, p in enumerate(prompts):
            assert p.text.count("<|image_pad|>") == len(p.images) == 1 and n == 1
            self.seen.append(p.images[0].size)
            out.append(Rollout(prompt_index=i, sample_index=0, text=f" a {p.images[0].size[0]}px picture ",
                               token_ids=[], logprobs=[], finish_reason="stop"))
        return out


def test_caption_batches_and_resumes(tmp_path):
    from megammr.rollout import SamplingParams
    jsonl = write_phase(str(tmp_path / "raw"), 3, 10, seed=0)
    out = str(tmp_path / "cap" / "captioned.jsonl")
    sp = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=8)
    eng = FakeEngine(fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        caption_file(jsonl, out, eng, sampling=sp, batch_size=3, progress=False)
    assert len(open(out).readlines()) == 6  # two full batches were written before the interruption
    with open(out, "a") as f:
        f.write('{"id": "torn')  # a kill in the middle of a write
    eng2 = FakeEngine()
    s = caption_file(jsonl, out, eng2, sampling=sp, batch_size=3, progress=False)
    assert s.already_done == 6 and s.captioned == 4 and eng2.calls == 2 and len(eng2.seen) == 4
    recs = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in recs] == [f"synthetic-p3-{i:06d}" for i in range(10)]
    assert all(r["caption"] == "a 224px picture" for r in recs)
    # Image paths were rebased next to the output: the result builds as phase 2 directly.
    assert build_shards([out], 2, str(tmp_path / "p2"), progress=False).written == 10
    # A third run has nothing to do.
    eng3 = FakeEngine()
    assert caption_file(jsonl, out, eng3, sampling=sp, batch_size=3, progress=False).already_done == 10
    assert eng3.calls == 0


def test_caption_tool_with_tiny_model(tmp_path):
    """tools/caption.py end to end with the transformers engine and the tiny random model."""
    from megammr.models.tiny import write_tiny_model
    model = write_tiny_model(str(tmp_path / "tiny"))
    jsonl = write_phase(str(tmp_path / "raw"), 3, 3, seed=0)
    out = str(tmp_path / "cap.jsonl")
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools/caption.py"), "--input", jsonl, "--model", model,
                        "--out", out, "--batch-size", "2", "--max-new-tokens", "6", "--no-progress"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "captioned" in p.stdout
    recs = [json.loads(x) for x in open(out)]
    # A random model can emit an end-of-turn token at once (empty caption: counted, retried on rerun).
    assert len(recs) + p.stdout.count("empty_caption") >= 1 and all(r["caption"] for r in recs)


def test_bench_data_runs(tmp_path):
    p = subprocess.run([sys.executable, "-m", "megammr.cli", "bench", "data", "--samples", "24", "--workers", "1",
                        "--work-dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "plain webdataset" in p.stdout and "energon" in p.stdout and "samples/s" in p.stdout
