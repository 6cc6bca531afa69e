"""`megammr bench kernels` end to end at a small size: three fresh processes, equal results."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_kernels_small(tmp_path):
    out = tmp_path / "k.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "megammr.cli", "bench", "kernels", "-T", "96", "-V", "3001",
                        "--json", str(out)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["cpu"]["rows"]}
    assert set(rows) == {"naive", "ours", "ours-oop"}
    for r in rows.values():
        assert r["rel_err"] < 1e-4 and r["extra_gib"] > 0
    assert "extra peak memory above inputs" in p.stdout
