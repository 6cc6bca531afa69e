"""Inputs a user hits on day one: byte-order marks, reused output paths, interrupted builds,
parquet images in the caption tool, bad eval arguments (regression tests)."""
import json
import os

from megammr.data.shards import build_shards

BOM = b"\xef\xbb\xbf"


def _p1(i):
    return json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)})


def test_utf8_bom_is_not_an_invalid_first_line(tmp_path):
    src = tmp_path / "bom.jsonl"
    src.write_bytes(BOM + ("\r\n".join(_p1(i) for i in range(3)) + "\r\n").encode())
    s = build_shards([str(src)], 1, str(tmp_path / "out"), progress=False)
    assert s.written == 3 and not s.skipped

    from megammr.rewards.score_cli import _lines, _parse_line
    line = BOM + json.dumps({"response": "<think>a</think><answer>1</answer>", "answer": "1"}).encode()
    (tmp_path / "s.jsonl").write_bytes(line + b"\n")
    [(n, raw)] = list(_lines(str(tmp_path / "s.jsonl")))
    assert _parse_line(n, raw)[2] is None

    from megammr.eval.readers import load_benchmark
    rec = {"pid": "1", "question": "q?", "answer": "3", "question_type": "free_form", "answer_type": "integer"}
    (tmp_path / "mv.json").write_bytes(BOM + json.dumps({"1": rec}).encode())
    (tmp_path / "mv.jsonl").write_bytes(BOM + json.dumps(rec).encode() + b"\n")
    assert [x.answer for x in load_benchmark("mathvista", str(tmp_path / "mv.json"))] == ["3"]
    assert [x.answer for x in load_benchmark("mathvista", str(tmp_path / "mv.jsonl"))] == ["3"]

    from megammr.data.decontam import Decontaminator
    (tmp_path / "eval.jsonl").write_bytes(BOM + json.dumps({"question": "What is 1 + 1?"}).encode() + b"\n")
    assert Decontaminator([str(tmp_path / "eval.jsonl")]).match("what is 1+1") is not None


def test_score_output_may_be_the_input_and_bad_paths_are_clear(tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def score(*args):
        return subprocess.run([sys.executable, "-m", "megammr.cli", "score", *args], cwd=tmp_path, env=env,
                              capture_output=True, timeout=120)

    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps({"id": i, "response": f"<think>a</think><answer>{i}</answer>", "answer": str(i)})
                         + "\n" for i in range(3)))
    p = score("--input", "r.jsonl", "--output", "r.jsonl", "--workers", "1")  # relative, same file
    assert p.returncode == 0, p.stderr.decode()
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and all(r["reward"] == 1.5 for r in rows)
    assert sorted(os.listdir(tmp_path)) == ["r.jsonl"]  # no temporary file left behind
    (tmp_path / "d").mkdir()
    for out in ("d", "missing/x.jsonl"):
        p = score("--input", "r.jsonl", "--output", out, "--workers", "1")
        assert p.returncode == 2 and b"Traceback" not in p.stderr and out.encode() in p.stderr
    p = score("--input", "r.jsonl", "--workers", "0")
    assert p.returncode == 2 and b"--workers must be >= 1" in p.stderr


def test_build_out_checks_never_delete_what_is_not_a_build(tmp_path):
    import pytest
    from megammr.data.shards import BuildError
    src = tmp_path / "raw" / "p1.jsonl"
    src.parent.mkdir()
    src.write_text("".join(_p1(i) + "\n" for i in range(3)))
    with pytest.raises(BuildError, match="not a directory"):
        build_shards([str(src)], 1, str(src), progress=False, overwrite=True)
    with pytest.raises(BuildError, match="not a shard directory"):  # the input's own folder
        build_shards([str(src)], 1, str(src.parent), progress=False, overwrite=True)
    assert src.exists()
    out = tmp_path / "shards"
    build_shards([str(src)], 1, str(out), progress=False)
    (out / "p1.jsonl").write_bytes(src.read_bytes())  # an input kept inside a previous build
    with pytest.raises(BuildError, match="inside the output directory"):
        build_shards([str(out / "p1.jsonl")], 1, str(out), progress=False, overwrite=True)
    assert build_shards([str(src)], 1, str(out), progress=False, overwrite=True).written == 3


_SLOW_BUILD = r"""
import sys, time
import megammr.data.shards as sh
real = sh.validate
def slow(*a, **k):
    time.sleep(0.02)
    return real(*a, **k)
sh.validate = slow
sys.path.insert(0, sys.argv[1])
import build_shards
sys.exit(build_shards.main(sys.argv[2:]))
"""


def test_sigterm_during_build_leaves_no_staging_and_stale_stages_go(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src = tmp_path / "p1.jsonl"
    src.write_text("".join(_p1(i) + "\n" for i in range(2000)))
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_BUILD)
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, str(script), os.path.join(repo, "tools"), "--phase", "1", "--input",
                          str(src), "--out", str(tmp_path / "out"), "--no-progress"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not any(".building-" in n for n in os.listdir(tmp_path)):
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err.decode()
    assert sorted(os.listdir(tmp_path)) == ["p1.jsonl", "slow.py"]
    # A staging directory left by a killed build (SIGKILL: no handler runs) is removed by the next one.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".out.building-{dead.pid}").mkdir()
    (tmp_path / f".out.building-{dead.pid}" / "shard-000000.tar.part").write_bytes(b"x" * 1024)
    assert build_shards([str(src)], 1, str(tmp_path / "out"), progress=False).written == 2000
    assert not any(".building-" in n for n in os.listdir(tmp_path))


class _CaptionEngine:
    def generate(self, prompts, n, sampling):
        from megammr.rollout import Rollout
        return [Rollout(prompt_index=i, sample_index=0, text=f"a {p.images[0].size[0]}px picture", token_ids=[],
                        logprobs=[], finish_reason="stop") for i, p in enumerate(prompts)]


def test_caption_parquet_with_image_bytes(tmp_path):
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from megammr.data.caption import caption_file
    from megammr.rollout import SamplingParams
    blobs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (40 + i, 30), (i * 40, 0, 0)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    rows = [{"id": f"r/{i}", "question": "How many?", "answer": str(i), "stamp": b"\x00binary",
             "images": [{"bytes": b, "path": f"{i}.png"}]} for i, b in enumerate(blobs)]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "in.parquet"))
    out = tmp_path / "cap" / "out.jsonl"
    sp = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=8)
    s = caption_file(str(tmp_path / "in.parquet"), str(out), _CaptionEngine(), sampling=sp, progress=False)
    assert s.captioned == 3
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["caption"] for r in recs] == ["a 40px picture", "a 41px picture", "a 42px picture"]
    assert all("stamp" not in r for r in recs)  # bytes have no JSON form
    build_shards([str(out)], 2, str(tmp_path / "p2"), progress=False)
    with tarfile.open(tmp_path / "p2" / "shard-000000.tar") as t:
        imgs = [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".png")]
    assert imgs == blobs  # images intact through caption -> shards


def test_eval_arguments_limit_model_dir_and_all_images_missing(tmp_path, capsys):
    from megammr.cli import main
    from megammr.eval.readers import load_benchmark
    from megammr.models.tiny import write_tiny_model
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "eval",
                        "mathvista", "testmini.json")
    assert load_benchmark("mathvista", data, limit=0) == []
    assert len(load_benchmark("mathvista", data, limit=2)) == 2
    base = ["eval", "--bench", "mathvista", "--data", data, "--out", str(tmp_path / "ev"), "--max-new-tokens", "2",
            "--device", "cpu", "reward.workers=1"]
    assert main(base + ["--model", str(tmp_path / "no-such-model")]) == 2  # not a Hub download attempt
    assert "not a directory" in capsys.readouterr().err
    model = write_tiny_model(str(tmp_path / "tiny"), seed=0)
    assert main(base + ["--model", model, "--limit", "0"]) == 2
    assert main(base + ["--model", model, "--images-root", str(tmp_path / "nowhere")]) == 1
    assert "none of the 3 sample(s) could be evaluated" in capsys.readouterr().err


def test_reward_near_misses_are_not_credited():
    from megammr.config import RewardConfig
    from megammr.rewards import RewardItem
    from megammr.rewards.core import Weights, score_item

    def acc(response, gold, choices=None):
        return score_item(RewardItem(response, gold, choices), Weights.from_config(RewardConfig())).accuracy

    # An <answer> inside the reasoning is a draft: closed think, or a think cut off at max tokens.
    assert acc("<think>maybe <answer>5</answer> hmm</think>", "5") == 0.0
    assert acc("<think>maybe <answer>5</answer> wait, let me check", "5") == 0.0
    assert acc("<think>draft <answer>4</answer></think><answer>5</answer>", "5") == 1.0
    assert acc("<answer>5</answer>", "5") == 1.0  # no think block at all: the format reward handles it
    # Hedging between option letters picks nothing, however it is phrased.
    opts = ["1", "2", "3"]
    for hedge in ("The answer is A or B", "Answer: A, B", "the answer is (A)/B", "The answer is A and B"):
        assert acc(f"<think>x</think><answer>{hedge}</answer>", "A", opts) == 0.0, hedge
    assert acc("<think>x</think><answer>The answer is A, because 1 < 2</answer>", "A", opts) == 1.0
    # Other near misses stay wrong.
    for pred, gold in (("0.50001", "0.5"), ("2", "1/2"), ("AB", "A"), ("A", "AB")):
        assert acc(f"<think>x</think><answer>{pred}</answer>", gold) == 0.0, (pred, gold)


def test_loader_names_a_missing_dataset_path(tmp_path, monkeypatch):
    import pytest
    from megammr.config import DataConfig, DatasetConfig
    from megammr.data.loader import DataConfigError, check_datasets
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataConfigError, match=r"datasets\[0\]\.path: outputs/x: no such directory \(relative to"):
        check_datasets(DataConfig(datasets=[DatasetConfig(path="outputs/x")]))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataConfigError, match=r"not a prepared shard directory \(no \.nv-meta\)"):
        check_datasets(DataConfig(datasets=[DatasetConfig(path="plain")]))
