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
    assert set(rows) == {"naive", "ours", "ours-oop", "naive-nograd", "ours-nograd"}
    for r in rows.values():
        assert r["rel_err"] < 1e-4 and r["extra_gib"] > 0
        # CPU time of the call (what a shared machine does not inflate) beside its wall time
        assert r["cpu_user_s"] >= 0 and r["cpu_sys_s"] >= 0 and r["seconds"] > 0
    assert {r["mode"] for r in rows.values()} == {"train", "forward"}
    assert rows["ours-nograd"]["temperature"] == 0.7
    assert "extra peak memory above inputs" in p.stdout and "under torch.no_grad()" in p.stdout
    assert "cpu s" in p.stdout


def test_bench_kernels_rejects_bad_options(capsys, tmp_path):
    import pytest

    from megammr.cli import main
    for argv, needle in ((["-T", "0"], "positive integer"), (["-V", "-3"], "positive integer"),
                         (["--variants", "naive,oops"], "unknown variant(s) oops"),
                         (["--temperature", "0"], "positive number"), (["--temperature", "x"], "positive number")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "kernels", *argv])
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
    # --json into a missing directory fails before any benchmarking, not after it.
    assert main(["bench", "kernels", "--json", str(tmp_path / "missing" / "k.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_kernels_failed_variant_fails_the_run(monkeypatch, capsys):
    import argparse

    import megammr.bench.kernels as bk

    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 137, "", "Killed")

    monkeypatch.setattr(bk.subprocess, "run", fail)
    monkeypatch.setattr(bk.torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace(tokens=8, vocab=16, variants="naive,ours", skip_cpu=False, json=None)
    assert bk.run(args) == 1
    assert "child failed" in capsys.readouterr().err
