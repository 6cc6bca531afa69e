"""Evaluation harness: readers of the four published formats, scoring conventions, and
`megammr eval` end to end on a tiny random model (scores are meaningless; the pipeline is checked)."""
import json
import os

import pytest

from megammr.config import RewardConfig
from megammr.eval import EvalDataError, load_benchmark
from megammr.rewards import RewardItem, Weights, score_item

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "eval")
DATA = {
    "mathvista": os.path.join(FIX, "mathvista", "testmini.json"),
    "mathverse": os.path.join(FIX, "mathverse", "testmini.json"),
    "mathvision": os.path.join(FIX, "mathvision", "test.jsonl"),
    "olympiadbench": os.path.join(FIX, "olympiadbench"),
}
W = Weights.from_config(RewardConfig(require_answer_tag=False))


def right(sample, response):
    return score_item(RewardItem(response, sample.answer, sample.choices, sample.precision), W).accuracy == 1.0


def test_mathvista_reader_and_conventions():
    s = {x.id: x for x in load_benchmark("mathvista", DATA["mathvista"])}
    assert set(s) == {"1", "2", "3"}
    assert s["1"].precision == 1 and s["1"].subset == "textbook question answering"
    assert os.path.isfile(s["1"].images[0])
    assert right(s["1"], "<answer>1.24</answer>") and not right(s["1"], "<answer>1.3</answer>")  # 1 decimal
    assert s["3"].choices == ["circle", "square", "triangle"] and s["3"].answer == "square"
    assert right(s["3"], "<answer>(B)</answer>") and right(s["3"], "<answer>square</answer>")
    assert not right(s["3"], "<answer>A</answer>")
    assert right(s["2"], "<answer>1000 g</answer>")


def test_mathverse_reader():
    s = load_benchmark("mathverse", DATA["mathverse"])
    assert [x.subset for x in s] == ["Text Dominant", "Vision Only", "Text Lite"]
    assert s[1].question  # 'Vision Only' has an empty question field: a generic one is used
    assert right(s[0], "<answer>B</answer>") and right(s[0], "<answer>B:8</answer>") and not right(s[0], "<answer>C</answer>")
    assert right(s[2], "<answer>12.5</answer>")


def test_mathvision_reader():
    s = load_benchmark("mathvision", DATA["mathvision"])
    assert "<image1>" not in s[0].question and s[0].choices is None
    assert s[1].choices == ["A", "B", "C", "D", "E"] and right(s[1], "<answer>(C)</answer>")
    assert right(s[2], "<answer>12</answer>") and not right(s[2], "<answer>8</answer>")  # option text
    assert s[2].subset == "solid geometry"


def test_olympiadbench_reader():
    s = load_benchmark("olympiadbench", DATA["olympiadbench"])
    assert [x.id for x in s] == ["2166", "2167", "1"]  # the theorem-proving item has no answer: left out
    assert s[0].answer == "2 \\sqrt{3}" and "<image_1>" not in s[0].question and len(s[0].images) == 1
    assert right(s[0], "<answer>\\boxed{2\\sqrt{3}}</answer>")
    assert s[1].answer == "-2, 2" and right(s[1], "<answer>2, -2</answer>")
    assert s[2].images == [] and s[2].meta["file"] == "OE_TO_maths_en_COMP.json"


def test_reader_errors(tmp_path):
    with pytest.raises(EvalDataError, match="data not found"):
        load_benchmark("mathvista", str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"pid": "9", "question": "q"}]))
    with pytest.raises(EvalDataError, match=r"bad.json: record 0: missing field 'answer'"):
        load_benchmark("mathvista", str(bad))
    with pytest.raises(EvalDataError, match="unknown benchmark"):
        load_benchmark("mmlu", str(bad))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from megammr.models.tiny import write_tiny_model
    return write_tiny_model(str(tmp_path_factory.mktemp("tinyvl")), seed=0)


@pytest.mark.parametrize("bench", sorted(DATA))
def test_megammr_eval_end_to_end(bench, tiny_dir, tmp_path, capsys):
    from megammr.cli import main
    out = tmp_path / "eval"
    rc = main(["eval", "--model", tiny_dir, "--bench", bench, "--data", DATA[bench], "--out", str(out),
               "--max-new-tokens", "6", "--batch-size", "2", "--device", "cpu", "reward.workers=1"])
    assert rc == 0
    table = capsys.readouterr().out
    paper = {"mathvista": "67.20", "mathverse": "43.68", "mathvision": "27.04", "olympiadbench": "21.33"}[bench]
    # The terminal gets aligned columns (no Markdown markup); the .md file the Markdown table.
    head = table.splitlines()[0]
    assert head.split("  ")[0] == "benchmark / subset" and head.endswith("Infi-MMR-3B paper (%)") and paper in table
    assert "&nbsp;" not in table and "**" not in table and "|" not in table
    md = (out / f"{bench}_summary.md").read_text()
    assert "| benchmark / subset | n | ours (%) | Infi-MMR-3B paper (%) |" in md and paper in md
    rows = [json.loads(x) for x in (out / f"{bench}_samples.jsonl").read_text().splitlines()]
    summary = json.loads((out / f"{bench}_summary.json").read_text())
    expected = len(load_benchmark(bench, DATA[bench])) - summary["skipped"]
    assert len(rows) == summary["n"] == expected > 0
    for r in rows:
        assert {"id", "subset", "answer", "response", "extracted", "correct", "format", "status"} <= set(r)
        assert r["status"] == "ok"
    assert sum(v["n"] for v in summary["subsets"].values()) == summary["n"]
    assert summary["paper_infi_mmr_3b"] == float(paper)
    if bench == "mathvision":  # the record whose image file is missing is a counted skip
        assert summary["skipped"] == 1 and "missing.png" in summary["skipped_samples"][0]["reason"]
    assert (out / f"{bench}_summary.md").read_text().startswith("| benchmark")
