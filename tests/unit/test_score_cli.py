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
    # The output holds scored records only (input order), each with every reward field.
    assert [r["id"] for r in rows] == ["a", "d", "e", "g"]
    assert all({"format", "accuracy", "reward", "status"} <= set(r) and "error" not in r for r in rows)
    assert (rows[0]["format"], rows[0]["accuracy"], rows[0]["reward"]) == (1.0, 1.0, 1.5)
    assert rows[1]["reward"] == 1.5
    assert (rows[2]["format"], rows[2]["accuracy"]) == (0.0, 0.0)
    assert rows[3]["reward"] == 1.5 and rows[3]["status"] == "ok"
    # The malformed lines go to the side file, with line number, reason and the line's text.
    rejected = [json.loads(x) for x in (tmp_path / "out.rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rejected] == [2, 3, 7, 9]
    assert "invalid JSON" in rejected[0]["error"] and rejected[0]["text"] == "{not json"
    assert "missing field 'answer'" in rejected[1]["error"] and json.loads(rejected[1]["text"])["id"] == "c"
    assert "JSON object" in rejected[2]["error"] and "must be a string" in rejected[3]["error"]
    for n in (2, 3, 7, 9):
        assert f"line {n}:" in err
    assert "scored 4 lines" in err and "mean reward 1.1250" in err and "timeouts 0" in err
    assert "4 malformed line(s) skipped (written to" in err and "out.rejected.jsonl" in err


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
