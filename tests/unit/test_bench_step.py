"""`megammr bench step` runs and reports (smoke tests; the figures live in BENCHMARKS.md)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megammr.bench import step as bench_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--prompts", "2", "--n", "2", "--max-new-tokens", "8", "--micro-batch-size", "2", "--warmup", "1",
        "--steps", "1", "--threads", "1"]


def _bench(tmp_path, *extra, timeout=240):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "step.json"
    p = subprocess.run([sys.executable, "-m", "megammr.cli", "bench", "step", *TINY, "--work-dir",
                        str(tmp_path / "work"), "--json", str(out), *extra],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text()), p.stdout


def test_bench_step_megammr_only(tmp_path):
    rep, stdout = _bench(tmp_path, "--no-trl", "--no-hf-compute")
    assert {"config", "machine", "overhead_definition", "megammr", "model_compute", "overhead", "trl",
            "ratio"} <= set(rep)
    m = rep["megammr"]
    assert len(m["steps"]) == 2 and m["prompts_match"]
    for k in ("rollout_s", "reward_s", "logprobs_s", "train_s", "sync_s", "step_s", "wall_s"):
        assert m["median"][k] is not None and m["median"][k] >= 0, k
    assert m["median"]["other_s"] is not None
    assert m["median"]["generated_tokens"] > 0 and m["median"]["prompt_tokens"] > 0
    comp = rep["model_compute"]["megatron"]
    assert comp["median"]["total_s"] > 0 and len(comp["steps"]) == 1
    assert rep["model_compute"]["hf"] is None
    o = rep["overhead"]["megammr"]
    assert o is not None and o["seconds"] == pytest.approx(
        m["steps"][1]["step_s"] - m["steps"][1]["rollout_s"] - comp["steps"][0]["total_s"])
    bp = rep["overhead"]["megammr_by_parts"]
    # stages are the trainer's own timers (>= 0); the train-path extra is a difference of two timings
    # of the same work, so noise can make it, and the sum, negative on a busy machine
    assert bp["stages_s"] >= 0 and bp["train_path_extra_s"] is not None
    assert bp["seconds"] == pytest.approx(bp["stages_s"] + bp["train_path_extra_s"]) and -1 < bp["share"] < 1
    assert comp["trainer_path"]["median"]["total_s"] > 0
    assert rep["trl"] == {"skipped": "--no-trl"} and rep["ratio"] is None
    assert "framework overhead" in stdout and "time/step" in stdout


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed (megammr[bench])")
def test_bench_step_with_trl(tmp_path):
    rep, stdout = _bench(tmp_path)
    t = rep["trl"]
    assert len(t["steps"]) == 2 and t["generate_calls"] == 2
    assert all(s["unique_prompts"] == 2 for s in t["steps"])
    # Same prompts in the same order on both sides: equal prompt tokens per step.
    assert [s["prompt_tokens"] for s in t["steps"]] == [s["prompt_tokens"] for s in rep["megammr"]["steps"]]
    assert t["median"]["generated_tokens"] > 0 and t["median"]["wall_s"] > 0
    assert rep["model_compute"]["hf"]["median"]["total_s"] > 0
    assert rep["engine_outside_trainer"]["median"]["generate_s"] > 0
    assert rep["ratio"]["step_megammr_over_trl"] > 0 and rep["overhead"]["trl"] is not None
    assert t["config"]["num_generations"] == 2 and t["config"]["max_completion_length"] == 8
    assert t["config"]["generation_batch_size"] == 4 and t["config"]["gradient_checkpointing"] is False
    assert "megammr/TRL" in stdout


def test_overhead_pairs_steps_with_their_compute():
    rows = [{"round": 0, "index": 0, "step_s": 2.0, "rollout_s": 1.0},
            {"round": 0, "index": 1, "step_s": 3.0, "rollout_s": 1.0},
            {"round": 1, "index": 0, "step_s": 4.0, "rollout_s": 2.0}]
    comp = [{"round": 0, "index": 0, "total_s": 0.5}, {"round": 0, "index": 1, "total_s": 1.5},
            {"round": 1, "index": 0, "total_s": 1.0}]
    o = bench_step._overhead(rows, "step_s", "rollout_s", comp)
    assert o["seconds"] == pytest.approx(0.5) and o["share"] == pytest.approx(0.25)
    assert bench_step._overhead(rows, "step_s", "rollout_s", []) is None


def test_arguments_reject_a_cold_only_run():
    import argparse
    p = argparse.ArgumentParser()
    bench_step.add_arguments(p)
    with pytest.raises(SystemExit):
        bench_step.run(p.parse_args(["--warmup", "0"]))
