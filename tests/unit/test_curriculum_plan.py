"""`megammr train CURRICULUM --plan` and `--phase K` (what slurm/*.sbatch and submit_curriculum.sh call):
the plan lists each phase's state, and a lone phase is refused, with the reason, until the one
before it is done."""
import os
import subprocess
import sys

from conftest import REPO

CURRICULUM = os.path.join(REPO, "recipes", "tiny", "curriculum.yaml")
ENV = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "megammr", "train", *args], env=ENV, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_plan_lists_each_phase_with_its_state(tmp_path):
    p = train("--plan", CURRICULUM, "train.output_dir=run", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"{k}\tphase{k}\ttodo\trun/phase{k}" for k in (1, 2, 3)]
    (tmp_path / "run" / "phase1").mkdir(parents=True)
    (tmp_path / "run" / "phase1" / "DONE").write_text("{}")
    (tmp_path / "run" / "phase2" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "phase2" / "checkpoints" / "latest").write_text("step_000001\n")
    states = [line.split("\t")[2] for line in train("--plan", CURRICULUM, "train.output_dir=run",
                                                     cwd=tmp_path).stdout.splitlines()]
    assert states == ["done", "started", "todo"]
    only = train("--plan", "--phase", "2", CURRICULUM, "train.output_dir=run", cwd=tmp_path)
    assert only.returncode == 0 and only.stdout.strip() == "2\tphase2\tstarted\trun/phase2", only.stderr


def test_a_lone_phase_needs_the_previous_one_done(tmp_path):
    p = train("--phase", "3", CURRICULUM, "train.output_dir=run", cwd=tmp_path)
    assert p.returncode == 2
    assert "phase 3 (phase3) starts from phase 2's final checkpoint, but run/phase2/DONE does not exist" in p.stderr
    assert "run phase 2 first" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was prepared or written


def test_unknown_phase_and_phase_without_a_curriculum_are_clear_errors(tmp_path):
    p = train("--plan", "--phase", "phase9", CURRICULUM, cwd=tmp_path)
    assert p.returncode == 2 and "--phase phase9: no such phase; phases: 1=phase1, 2=phase2, 3=phase3" in p.stderr
    p = train("--phase", "1", os.path.join(REPO, "recipes", "tiny", "phase1.yaml"), cwd=tmp_path)
    assert p.returncode == 2 and "--phase and --plan need a curriculum file" in p.stderr
