"""What a user sees of a run: the per-step progress (a bar on a terminal, plain lines with an ETA
elsewhere), the summary table at the end of a phase or curriculum (RUN_DIR/summary.md), and the
optional W&B logging (a clear error without the package; offline logging when it is installed)."""
import io
import json
import os

import pytest

from megammr import metrics
from megammr.config import load_recipe
from megammr.metrics import MetricsLog, Progress
from megammr.plot import summary_table, wall_seconds, write_summary
from megammr.train.report import wandb_args
from megammr.train.setup import check_recipe


def row(step, reward=0.25, t=2.0, **kw):
    m = {"step": step, "reward/mean": reward, "reward/accuracy": 0.125, "reward/format": 0.5,
         "response/length_mean": 30.0, "loss": 0.01, "grad_norm": 0.5, "kl": 0.0, "time/step": t,
         "step_skipped": False, "groups/dropped": 0}
    m.update(kw)
    return m


class Clock:
    """A controllable perf_counter for the ETA arithmetic."""
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_every_interval_with_the_fields_and_an_eta(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    out = io.StringIO()
    p = Progress(total=5, interval=2, mode="auto", file=out)  # a StringIO is not a terminal: lines
    assert p.bar is None
    for step in range(1, 6):
        clock.now = 10.0 * step  # 10 s per step
        p.update(row(step, t=10.0))
    lines = out.getvalue().splitlines()
    assert [ln.split(" |")[0] for ln in lines] == ["step 2/5", "step 4/5", "step 5/5"]  # every 2nd and the last
    assert "reward 0.250 acc 0.125 fmt 0.500" in lines[0] and "10.0 s/step" in lines[0]
    assert lines[0].endswith("eta 0:30")  # 20 s for 2 steps, 3 to go
    assert lines[1].endswith("eta 0:10") and lines[2].endswith("eta 0:00")


def test_resumed_eta_counts_only_this_runs_steps(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    out = io.StringIO()
    p = Progress(total=10, done_before=6, interval=1, mode="lines", file=out)  # steps 1-6 ran before the restart
    clock.now = 5.0
    p.update(row(7))
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("step 7/10 ") and out.getvalue().rstrip().endswith("eta 0:15")  # 5 s x 3


def test_notes_of_skipped_steps_and_dropped_groups():
    out = io.StringIO()
    Progress(total=3, interval=1, mode="lines", file=out).update(row(1, step_skipped=True, **{"groups/dropped": 2}))
    assert "SKIPPED (non-finite)" in out.getvalue() and "2 uniform-reward groups dropped" in out.getvalue()


def test_progress_bar_on_a_terminal():
    out = TTY()
    p = Progress(total=4, done_before=1, interval=1, mode="auto", desc="phase2", file=out)
    assert p.bar is not None
    for step in (2, 3, 4):
        p.update(row(step, reward=0.5))
    text = out.getvalue()
    last = text.split("\r")[-1]
    assert "phase2: 100%" in last and "4/4" in last and "s/step" in last
    assert "reward 0.500 acc 0.125 fmt 0.50 len 30" in last
    assert "3/4 [" in text and "<" in text  # elapsed<remaining: the ETA
    assert p.bar is None  # closed at the last step
    forced = io.StringIO()
    assert Progress(total=2, interval=1, mode="bar", file=forced).bar is not None  # train.progress=bar, even into a file
    assert Progress(total=2, interval=1, mode="lines", file=TTY()).bar is None


def _rows(rewards, elapsed=None):
    return [row(i + 1, reward=r, t=3.0, **({"time/elapsed": elapsed * (i + 1) / len(rewards)} if elapsed else {}))
            for i, r in enumerate(rewards)]


def _table(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]


def test_summary_table_and_file(tmp_path):
    # phase1: 10 steps -> fifths of 2 steps: first (0.0 + 0.1) / 2 = 0.05, last (0.8 + 0.9) / 2 = 0.85
    p1 = _rows([0.1 * i for i in range(10)], elapsed=125.0)
    for i, r in enumerate(p1):
        r["reward/format"], r["response/length_mean"] = (0.2, 40.0) if i < 2 else (0.9, 20.0)
    # phase2: 3 steps -> fifths of 1 step; no time/elapsed: wall is the sum of step times (9 s)
    p2 = _rows([0.3, 0.0, 0.2])
    path = write_summary(str(tmp_path), [("phase1", p1), ("phase2", p2)])
    assert path == str(tmp_path / "summary.md")
    text = open(path).read()
    assert text.startswith("# megammr run summary") and summary_table([("phase1", p1), ("phase2", p2)]) in text
    head, body = _table(text)
    assert head[:6] == ["phase", "steps", "wall", "reward first 1/5", "last 1/5", "rise"]
    assert head[6:] == ["accuracy", "format rate", "response length"]
    assert body[0] == ["phase1", "10", "2 min 05 s", "0.050", "0.850", "+0.800", "0.125 -> 0.125", "0.200 -> 0.900",
                       "40.0 -> 20.0"]
    assert body[1][:6] == ["phase2", "3", "9 s", "0.300", "0.200", "-0.100"]
    assert wall_seconds(p1) == 125.0 and wall_seconds(p2) == 9.0


def test_metrics_log_drives_the_progress_and_keeps_jsonl(tmp_path, capsys):
    log = MetricsLog(str(tmp_path), True, total_steps=2, log_interval=1, progress="lines", desc="phase1")
    log.log(row(1))
    log.log(row(2, reward=float("nan")))
    log.close()
    out = capsys.readouterr().out
    assert "step 1/2" in out and "step 2/2 | reward nan" in out
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["reward/mean"] is None



def _tb_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_every_numeric_metric_and_a_resume_replaces_later_steps(tmp_path, capsys):
    """The events that TensorBoard itself reads back: one scalar per numeric metric and step (none for
    a non-finite value, which the JSONL holds as null); a run resumed after step 2 purges steps > 2,
    so the steps it computes again are not shown twice."""
    pytest.importorskip("tensorboard", reason="tensorboard is optional (pip install -e '.[dev]' has it)")
    log = MetricsLog(str(tmp_path), True, 3, 1, progress="lines")
    for s in (1, 2, 3):
        log.log(row(s, reward=0.1 * s if s != 3 else float("nan")))
    log.close()
    got = _tb_scalars(tmp_path / "tensorboard")
    assert got["reward/mean"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))]
    assert [s for s, _ in got["loss"]] == [1, 2, 3]
    log = MetricsLog(str(tmp_path), True, 3, 1, progress="lines", resume_after=2)
    log.log(row(3, reward=0.9))
    log.close()
    got = _tb_scalars(tmp_path / "tensorboard")
    assert got["reward/mean"][-1] == (3, pytest.approx(0.9)) and [s for s, _ in got["loss"]] == [1, 2, 3]
    rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["reward/mean"] == pytest.approx(0.9)


def _recipe(tmp_path, *extra):
    (tmp_path / "config.json").write_text("{}")
    return load_recipe(None, [f"model.hf_path={tmp_path}", *extra])


def test_wandb_without_the_package_is_a_clear_recipe_error(tmp_path, monkeypatch):
    import sys

    from megammr.config import RecipeError
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(RecipeError, match=r"train.wandb_project is set but the wandb package is not installed: "
                                          r"pip install wandb"):
        check_recipe(_recipe(tmp_path, "train.wandb_project=megammr-test"), world_size=1, cuda=False)
    check_recipe(_recipe(tmp_path), world_size=1, cuda=False)  # off by default: nothing imported, no error
    with pytest.raises(RecipeError, match="not installed"):
        MetricsLog(str(tmp_path / "run"), True, 2, 1, progress="lines", wandb={"project": "p", "name": "n", "config": {}})


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install wandb); its offline logging is checked "
                                        "where it is installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "tiny" / "phase1"
    r = load_recipe(None, [f"train.output_dir={out}", "train.wandb_project=megammr-test"])
    args = wandb_args(r)
    assert args["name"] == "tiny/phase1" and args["group"] == "tiny" and args["config"]["train"]["steps"] == 100
    log = MetricsLog(str(out), True, 2, 1, progress="lines", wandb=args)
    log.log(row(1))
    log.log(row(2))
    log.close()
    runs = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(out / "wandb" / runs[0]))
