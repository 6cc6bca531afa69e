"""`megammr bench rewards` runs and reports (a smoke test; the figure lives in BENCHMARKS.md)."""
import json
import os
import subprocess
import sys

from megammr.bench.rewards import make_mix

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mix_is_deterministic_and_varied():
    a, b = make_mix(200, 16, seed=3), make_mix(200, 16, seed=3)
    assert [x.response for x in a] == [x.response for x in b]
    assert len({x.answer for x in a}) >= 10 and any(x.choices for x in make_mix(2000, 16))


def test_bench_rewards_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "megammr.cli", "bench", "rewards", "--n", "128", "--workers", "1",
                        "--json"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    assert rep["verifications"] == 128 and rep["verifications_per_s"] > 0
    assert 0 <= rep["p50_ms"] <= rep["p99_ms"] <= rep["max_ms"] and rep["timeouts"] == 0
