"""`megammr bench curriculum`'s accounting: preparation and phase windows read from the trainer's
own output lines, per-phase figures from metrics rows (hand-built here; the real run is checked in
tests/dist/test_curriculum.py), and a work directory that is not empty is refused."""
import os

import pytest

from conftest import REPO

from megammr.bench.curriculum import phase_figures, timeline

LINES = [
    (1.0, "megammr train: phase 1/2 phase1: text prompts, 3 steps -> outputs/tiny/phase1"),
    (1.5, "megammr train: preparing the bundled data in outputs/data (tools/make_synthetic_data.py)"),
    (4.0, "megammr train: bundled data ready in 2.5 s"),
    (14.0, "megammr train: tiny model ready in 10.0 s"),
    (20.0, "step 1/3 | reward 0.000"),
    (30.0, "megammr train: phase 2/2 phase2: caption prompts, 3 steps -> outputs/tiny/phase2"),
    (41.0, "megammr train: done: phase1 (3 steps), phase2 (3 steps)"),
]


def test_timeline_reads_preparation_and_phase_windows():
    tl = timeline(LINES)
    assert tl["prep"] == {"data": 2.5, "model": 10.0}
    assert tl["phases"] == {"phase1": (1.0, 30.0), "phase2": (30.0, 41.0)}


def test_phase_figures_split_steps_stages_and_the_rest():
    rows = [{"time/step": 2.0, "time/rollout": 1.0, "time/train": 0.5, "reward/mean": r} for r in
            (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    ph = phase_figures("phase1", rows, (1.0, 30.0), prep_s=12.5)
    assert ph["steps"] == 10 and ph["steps_s"] == 20.0 and ph["s_per_step"] == 2.0
    assert ph["stages_s"]["rollout"] == 10.0 and ph["stages_s"]["train"] == 5.0 and ph["stages_s"]["sync"] == 0.0
    assert ph["other_s"] == pytest.approx(29.0 - 20.0 - 12.5)
    assert ph["reward_first_fifth"] == pytest.approx(0.05) and ph["rise"] == pytest.approx(0.8)


def test_a_work_dir_with_files_is_refused(tmp_path, capsys):
    from megammr.cli import main
    (tmp_path / "old").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        main(["bench", "curriculum", os.path.join(REPO, "recipes", "tiny", "curriculum.yaml"), "--work-dir", str(tmp_path)])
