"""`megammr score` on a file with good and malformed lines."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_score(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "megammr.cli", "score", *args], cwd=tmp_path, env=env,
                          capture_output=True, timeout=120)


def test_score_good_and_malformed_lines(tmp_path):
    lines = [
        json.dumps({"id": "a", "response": "<think>x</think><answer>\\boxed{\\frac{1}{2}}</answer>", "answer": "0.5"}).encode(),
        b"{not json",
        json.dumps({"id": "c", "response": "<think>x</think><answer>3</answer>"}).encode(),      # no answer
        json.dumps({"id": "d", "response": "<think>x</think><answer>(B)</answer>", "answer": "B",
                    "choices": ["1", "2", "3"]}).encode(),
        b"",                                                                                        # blank: skipped
        json.dumps({"id": "e", "response": "no tags, answer 7", "answer": 7}).encode(),
        json.dumps(["a", "list"]).encode(),
        b'{"id": "g", "response": "<think>x</think><answer>\xff 4</answer>", "answer": "4"}',  # invalid UTF-8
        json.dumps({"id": "h", "response": 5, "answer": "5"}).encode(),                        # wrong type
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    p = run_score(["--input", str(inp), "--output", str(out), "--workers", "1", "--timeout", "5"], tmp_path)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8  # one per non-blank input line, in order
    assert rows[0]["id"] == "a" and (rows[0]["format"], rows[0]["accuracy"], rows[0]["reward"]) == (1.0, 1.0, 1.5)
    assert rows[1] == {"line": 2, "error": rows[1]["error"]} and "invalid JSON" in rows[1]["error"]
    assert rows[2]["id"] == "c" and "missing field 'answer'" in rows[2]["error"] and "reward" not in rows[2]
    assert rows[3]["id"] == "d" and rows[3]["reward"] == 1.5
    assert rows[4]["id"] == "e" and (rows[4]["format"], rows[4]["accuracy"]) == (0.0, 0.0)
    assert rows[5]["line"] == 7 and "JSON object" in rows[5]["error"]
    assert rows[6]["id"] == "g" and rows[6]["reward"] == 1.5 and rows[6]["status"] == "ok"
    assert rows[7]["id"] == "h" and "must be a string" in rows[7]["error"]
    for n in (2, 3, 7, 9):
        assert f"line {n}:" in err
    assert "scored 4 lines" in err and "mean reward 1.1250" in err and "timeouts 0" in err
    assert "4 malformed line(s)" in err


def test_score_stdout_and_recipe_weights(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"response": "<think>x</think><answer>2</answer>", "answer": "2"}) + "\n")
    p = run_score(["--input", str(inp), "--workers", "1", "reward.format_weight=0.25",
                   "reward.accuracy_weight=2"], tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    row = json.loads(p.stdout.decode().strip())
    assert row["reward"] == 2.25


def test_score_missing_input(tmp_path):
    p = run_score(["--input", str(tmp_path / "nope.jsonl")], tmp_path)
    assert p.returncode == 2 and b"input not found" in p.stderr
