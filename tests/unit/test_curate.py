"""Curation by pass rate (megammr/curate.py, `megammr curate`, a curriculum phase's data.curate).

The engine is tests/unit/curate_fakes.FakeEngine, registered first in the engine registry: easy
prompts always solved, hard never, medium sometimes (seed-dependent). Everything else (registry
resolution, prompts, the reward pool's verifier, resume, outputs, shards) is the code users run."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import REPO
from curate_fakes import FakeEngine, register

from megammr import curriculum
from megammr.config import load_recipe
from megammr.curate import curate, read_rates
from megammr.rollout import registry

FAKES = os.path.join(REPO, "tests", "unit", "curate_fakes.py")
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
OVR = ["reward.workers=1"]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(registry, "ENGINES", dict(registry.ENGINES))
    register(registry)
    FakeEngine.builds = 0
    return FakeEngine


def _records(path, n_each=3):
    rows = []
    for i in range(n_each):
        rows.append({"id": f"easy{i}", "question": f"Easy {i}. The answer is {i + 2}.", "answer": str(i + 2),
                     "source": "easyset"})
        rows.append({"id": f"hard{i}", "question": f"Hard {i}.", "answer": str(i + 7), "source": "hardset"})
        rows.append({"id": f"med{i}", "question": f"Medium {i}. The answer is {i + 4}.", "answer": str(i + 4),
                     "source": "medset"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _model(tmp_path):
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    (m / "model.safetensors").write_bytes(b"weights-v1")
    return m


def _cli(args, **kw):
    return subprocess.run([sys.executable, FAKES, "curate", *args], env={**ENV, **kw.pop("env", {})},
                          capture_output=True, text=True, timeout=300, cwd=REPO, **kw)


def _kept_ids(out):
    return [json.loads(line)["id"] for line in open(os.path.join(out, "records.jsonl"))]


def test_keeps_the_prompts_solved_sometimes_and_is_deterministic(fake, tmp_path):
    data = tmp_path / "data.jsonl"
    _records(data)
    recipe = load_recipe(None, OVR)

    def run(out, seed, keep=(0.1, 0.9)):
        return curate(str(data), str(out), recipe, keep=keep, n=8, seed=seed, phase=1, model=None,
                      engine_factory=lambda: registry.engine_class("fake").build(recipe, None, group=None, leader=0,
                                                                                 is_leader=True),
                      keep_unlabelled=False, batch_size=2, progress=False)

    s = run(tmp_path / "a", 5)
    assert _kept_ids(tmp_path / "a") == ["med0", "med1", "med2"]
    assert s.kept == 3 and s.read == 9
    assert dict(s.per_source["easyset"]) == {"dropped_high": 3}
    assert dict(s.per_source["hardset"]) == {"dropped_low": 3}
    rates = read_rates(str(tmp_path / "a" / "pass_rates.jsonl"))
    assert rates["easy0"]["pass_rate"] == 1.0 and rates["hard1"]["pass_rate"] == 0.0
    assert all(0 < rates[f"med{i}"]["pass_rate"] < 1 for i in range(3))
    kept = [json.loads(line) for line in open(tmp_path / "a" / "records.jsonl")]
    assert kept[0]["pass_rate"] == rates["med0"]["pass_rate"] and kept[0]["answer"] == "4"
    assert (tmp_path / "a" / "pass_rates.png").exists() and (tmp_path / "a" / "DONE").exists()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["per_source"]["medset"] == {"kept": 3}

    run(tmp_path / "b", 5)  # same seed: same files
    for f in ("pass_rates.jsonl", "records.jsonl"):
        assert (tmp_path / "a" / f).read_text() == (tmp_path / "b" / f).read_text()
    run(tmp_path / "c", 6)  # another seed: other medium pass rates
    other = read_rates(str(tmp_path / "c" / "pass_rates.jsonl"))
    assert [other[f"med{i}"] for i in range(3)] != [rates[f"med{i}"] for i in range(3)]
    # a finished run is not redone; other settings in the same directory are refused
    builds = FakeEngine.builds
    run(tmp_path / "a", 5)
    assert FakeEngine.builds == builds
    assert run(tmp_path / "a", 5, keep=(0.0, 1.0)).kept == 9 and FakeEngine.builds == builds  # reselects only
    with pytest.raises(RuntimeError, match="other settings"):
        run(tmp_path / "a", 7)


def test_cli_resumes_after_kill_9_with_the_same_result(tmp_path):
    data = tmp_path / "data.jsonl"
    _records(data, n_each=4)  # 12 prompts, 6 batches of 2
    model = _model(tmp_path)
    args = ["--model", str(model), "--input", str(data), "--phase", "1", "--n", "8", "--keep", "0.1:0.9",
            "--seed", "3", "--batch-size", "2", "--no-progress", *OVR]
    full = _cli([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    assert "4 of 12 record(s) kept" in full.stdout, full.stdout

    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, FAKES, "curate", *args, "--out", str(out)], cwd=REPO,
                         env={**ENV, "FAKE_ENGINE_DELAY_S": "0.7"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rates = out / "pass_rates.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (rates.exists() and len(rates.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    partial = len(rates.read_text().splitlines())
    assert 4 <= partial < 12 and not (out / "DONE").exists(), partial

    again = _cli([*args, "--out", str(out)])
    assert again.returncode == 0, again.stderr[-3000:]
    lines = rates.read_text().splitlines()
    assert len(lines) == 12  # nothing scored twice
    key = lambda f: sorted(open(f).read().splitlines())  # noqa: E731
    assert key(rates) == key(tmp_path / "full" / "pass_rates.jsonl")
    assert (out / "records.jsonl").read_text() == (tmp_path / "full" / "records.jsonl").read_text()


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_pass_rate_column_and_duplicate_images(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    rows = []
    for i, rate in enumerate([0.5, 1.0, 0.0, -1, None, 0.25]):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png((40 * i, 10, 200)))
        r = {"id": f"r{i}", "question": f"q{i}?", "answer": "1", "images": [f"img/{i}.png"], "source": "virl"}
        if rate is not None:
            r["PassRate_7BBase"] = rate
        rows.append(r)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a benchmark file whose image is byte-identical to r5's (another name, another folder)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "x.png").write_bytes((tmp_path / "img" / "5.png").read_bytes())
    (tmp_path / "bench" / "b.jsonl").write_text(json.dumps({"question": "?", "image": "x.png"}) + "\n")

    from megammr.curate_cli import add_arguments, run
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "out"
    args = p.parse_args(["--pass-rate-column", "PassRate_7BBase", "--input", str(data), "--phase", "3",
                         "--keep", "0.1:0.9", "--out", str(out), "--shards",
                         "--exclude-images", str(tmp_path / "bench" / "b.jsonl")])
    assert run(args) == 0
    assert _kept_ids(out) == ["r0"]
    summary = json.loads((out / "summary.json").read_text())["per_source"]["virl"]
    assert summary == {"kept": 1, "dropped_high": 1, "dropped_low": 1, "dropped_unlabelled": 2,
                       "dropped_duplicate_image(b.jsonl)": 1}
    assert (out / "shards" / "megammr.json").exists()
    kept = json.loads((out / "records.jsonl").read_text())
    assert (out / kept["images"][0]).read_bytes() == (tmp_path / "img" / "0.png").read_bytes()

    # the curated shards as input and as an exclusion list: every image is a duplicate
    args = p.parse_args(["--pass-rate-column", "PassRate_7BBase", "--input", str(out / "shards"),
                         "--keep-unlabelled", "--out", str(tmp_path / "again"),
                         "--exclude-images", str(out / "shards")])
    assert run(args) == 1  # nothing kept
    assert "dropped_duplicate_image(shards) 1" in capsys.readouterr().out


def test_curriculum_phase_curates_with_the_previous_export_and_caches(fake, tmp_path, monkeypatch):
    from megammr.data.shards import build_shards
    data = tmp_path / "data.jsonl"
    _records(data)
    build_shards([str(data)], 1, str(tmp_path / "shards"), progress=False)
    for name in ("p1", "p2"):
        (tmp_path / f"{name}.yaml").write_text(
            "extends: " + os.path.join(REPO, "recipes/tiny/phase1.yaml") + f"\nphase:\n  name: {name}\n"
            f"data:\n  datasets:\n    - path: {tmp_path / 'shards'}\n"
            + ("  curate: {n: 4, keep: [0.1, 0.9]}\n" if name == "p2" else ""))
    cur = tmp_path / "curriculum.yaml"
    cur.write_text(f"curriculum:\n  output_dir: {tmp_path / 'run'}\n  phases: [p1.yaml, p2.yaml]\n")

    import megammr.trainer as trainer
    seen = []

    def fake_train(recipe, shutdown, summary):  # phase 1 "trains" and exports; phase 2 records its data
        seen.append([d.path for d in recipe.data.datasets])
        hf = os.path.join(recipe.train.output_dir, "hf")
        os.makedirs(hf, exist_ok=True)
        for f, body in (("config.json", "{}"), ("model.safetensors", "w")):
            with open(os.path.join(hf, f), "w") as fh:
                fh.write(body)
        return {"step": 1}

    monkeypatch.setattr(trainer, "train", fake_train)
    curriculum.run(str(cur), OVR)
    assert seen[0] == [str(tmp_path / "shards")]
    (curated,) = seen[1]
    assert curated.startswith(str(tmp_path / "run" / "p2" / "curated")) and curated.endswith("shards")
    out = os.path.dirname(curated)
    assert _kept_ids(out) == ["med0", "med1", "med2"] and FakeEngine.builds == 1

    # a rerun of the phase (DONE removed) reuses the cache: no engine built, same directory
    os.remove(tmp_path / "run" / "p2" / "DONE")
    curriculum.run(str(cur), OVR)
    assert seen[2] == [curated] and FakeEngine.builds == 1
    # other weights in the previous export: another cache entry, sampled again
    (tmp_path / "run" / "p1" / "hf" / "model.safetensors").write_text("w2")
    os.remove(tmp_path / "run" / "p2" / "DONE")
    curriculum.run(str(cur), OVR)
    assert seen[3] != [curated] and FakeEngine.builds == 2


def test_first_phase_cannot_curate_with_a_previous_model(tmp_path):
    from megammr.config import RecipeError
    (tmp_path / "p1.yaml").write_text("extends: " + os.path.join(REPO, "recipes/tiny/phase1.yaml")
                                      + "\ndata:\n  curate: {n: 4}\n")
    (tmp_path / "c.yaml").write_text("curriculum:\n  phases: [p1.yaml]\n")
    with pytest.raises(RecipeError, match="first phase"):
        curriculum.load(str(tmp_path / "c.yaml"))


def test_import_drops_records_with_an_excluded_image(tmp_path):
    from megammr.data.importers.pipeline import import_dataset
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png((60 * i, 30, 90)))
        rows.append({"id": i, "question": f"How many {i}?", "answer": str(i), "images": [f"img/{i}.png"]})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "other").mkdir()  # another phase's records hold image 1 under another name
    (tmp_path / "other" / "z.png").write_bytes((tmp_path / "img" / "1.png").read_bytes())
    (tmp_path / "other" / "p2.jsonl").write_text(json.dumps({"id": "x", "images": ["z.png"]}) + "\n")
    s = import_dataset("columns", str(tmp_path / "t.jsonl"), str(tmp_path / "o.jsonl"), skip_invalid=False,
                       overwrite=False, show_progress=False, exclude_images=[str(tmp_path / "other" / "p2.jsonl")])
    assert s.written == 2 and s.excluded_images == {str(tmp_path / "other" / "p2.jsonl"): 1}
    assert "same sha256) dropped: 1" in s.text()
    ids = [json.loads(line)["id"] for line in open(tmp_path / "o.jsonl")]
    assert len(ids) == 2 and not any(i.endswith("1") for i in ids), ids


def test_eval_questions_are_dropped_before_scoring(fake, tmp_path):
    # --exclude: text decontamination against evaluation JSONL, as build_shards --exclude does; the
    # dropped questions are counted per eval file and never sampled.
    data = tmp_path / "data.jsonl"
    _records(data)
    bench = tmp_path / "mathvista.jsonl"
    bench.write_text(json.dumps({"question": "Medium 1. The answer is 5."}) + "\n")
    recipe = load_recipe(None, OVR)
    s = curate(str(data), str(tmp_path / "out"), recipe, keep=(0.0, 1.0), n=8, seed=5, phase=1, model=None,
               engine_factory=lambda: registry.engine_class("fake").build(recipe, None, group=None, leader=0,
                                                                          is_leader=True),
               keep_unlabelled=False, exclude=[str(bench)], batch_size=2, progress=False)
    assert s.kept == 8 and dict(s.per_source["medset"]) == {"decontaminated(mathvista.jsonl)": 1, "kept": 2}
    assert "med1" not in read_rates(str(tmp_path / "out" / "pass_rates.jsonl"))
