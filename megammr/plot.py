"""`megammr plot RUN_DIR`: learning curves of a phase or a whole curriculum, as one PNG.

RUN_DIR is a phase's output directory (it has metrics.jsonl) or a curriculum's (phase
directories below it, each with metrics.jsonl, drawn in name order: phase1, phase2, phase3).
Panels: reward, accuracy, format rate, response length and KL against the global step, one colour
per phase; the summary table (steps, wall time, first and last fifth of every phase) is printed too.
"""
from __future__ import annotations

import json
import os
import sys

PANELS = (("reward/mean", "reward"), ("reward/accuracy", "accuracy"), ("reward/format", "format rate"),
          ("response/length_mean", "response length (tokens)"), ("kl", "KL to reference"))


def read_rows(path: str) -> list[dict]:
    """The rows of one metrics.jsonl."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_phases(run_dir: str) -> list[tuple[str, list[dict]]]:
    read = read_rows
    own = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(own):
        return [(os.path.basename(os.path.abspath(run_dir)), read(own))]
    phases = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name, "metrics.jsonl")
        if os.path.isfile(path):
            phases.append((name, read(path)))
    return phases


def fifths(rows: list[dict], key: str = "reward/mean") -> tuple[float, float]:
    """Mean of `key` over the first and the last fifth of the steps (at least one step each)."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return float("nan"), float("nan")
    k = max(1, len(vals) // 5)
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


# (metrics key, column name) of the summary table: first and last fifth of each phase's steps.
SUMMARY = (("reward/mean", "reward"), ("reward/accuracy", "accuracy"), ("reward/format", "format rate"),
           ("response/length_mean", "response length"))


def wall_seconds(rows: list[dict]) -> float:
    """Seconds from the phase's start (setup included) to its last step: `time/elapsed` of the last
    row, which the trainer carries across resumes; the sum of step times for rows without it."""
    if rows and rows[-1].get("time/elapsed") is not None:
        return float(rows[-1]["time/elapsed"])
    return float(sum(r.get("time/step") or 0.0 for r in rows))


def clock(seconds: float) -> str:
    """'3 min 07 s' (or '42 s'): the summary table's and the benchmarks' wall-time format."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def summary_table(phases) -> str:
    """One row per phase: steps, wall time, and the mean over the first and the last fifth of the
    steps of reward (with the rise), accuracy, format rate and response length ("first -> last").
    A Markdown table, padded so that it also reads as plain text on a terminal."""
    head = ["phase", "steps", "wall", "reward first 1/5", "last 1/5", "rise"] + [name for _, name in SUMMARY[1:]]
    body = []
    for name, rows in phases:
        a, b = fifths(rows)
        cells = [name, str(len(rows)), clock(wall_seconds(rows)), f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}"]
        for key, col in SUMMARY[1:]:
            x, y = fifths(rows, key)
            cells.append(f"{x:.1f} -> {y:.1f}" if key == "response/length_mean" else f"{x:.3f} -> {y:.3f}")
        body.append(cells)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), rule] + [line(c) for c in body])


def write_summary(run_dir: str, phases) -> str:
    """RUN_DIR/summary.md: the summary table of these phases (written atomically); returns its path."""
    path = os.path.join(run_dir, "summary.md")
    text = (f"# megammr run summary: {run_dir}\n\n{summary_table(phases)}\n\n"
            "Means over the first and the last fifth of each phase's steps (at least one step each); accuracy, "
            "format rate and response length as first -> last fifth; wall: from "
            "the phase's start (data and model preparation included) to its last step, summed over resumed runs "
            "up to their last checkpoint. Per-step values: metrics.jsonl of each phase; curves: `megammr plot`.\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def print_summary(run_dir: str, phases) -> str:
    """The summary table on stdout and in RUN_DIR/summary.md (the end of a phase or a curriculum, rank 0)."""
    path = write_summary(run_dir, phases)
    print(f"\n{summary_table(phases)}\n(summary: {path})", flush=True)
    return path


def plot(phases, out: str) -> str:
    import matplotlib  # lazy here and in run(): matplotlib is an optional extra ([plot])
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 2.3 * len(PANELS)), sharex=True)
    offset = 0
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, rows) in enumerate(phases):
        steps = [offset + r["step"] for r in rows]
        for ax, (key, label) in zip(axes, PANELS):
            ys = [r.get(key) for r in rows]
            pts = [(x, y) for x, y in zip(steps, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), color=colours[i % len(colours)], label=name, marker="." if len(pts) < 60 else None)
            ax.set_ylabel(label, fontsize=8)
        if i:
            for ax in axes:
                ax.axvline(offset + 0.5, color="grey", lw=0.8, ls="--")
        offset = steps[-1] if steps else offset
    for ax, (key, _) in zip(axes, PANELS):
        if not any(r.get(key) for _, rows in phases for r in rows):  # all zero or absent: say why
            why = " (algo.kl_coef = 0: no reference model)" if key == "kl" else ""
            ax.text(0.5, 0.8, f"{key} is 0 at every step{why}", transform=ax.transAxes, ha="center",
                    va="center", fontsize=9, color="grey")
    axes[0].legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("step (phases in order)")
    fig.suptitle(f"megammr: {os.path.dirname(out) or '.'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_arguments(p):
    p.add_argument("run_dir", help="a phase's or a curriculum's output directory")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")


def run(args) -> int:
    phases = [(n, rows) for n, rows in read_phases(args.run_dir) if rows]
    if not phases:
        print(f"megammr plot: error: no metrics.jsonl in {args.run_dir} or its phase directories", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("megammr plot: error: needs matplotlib (pip install -e '.[plot]')", file=sys.stderr)
        return 2
    out = plot(phases, args.out or os.path.join(args.run_dir, "curves.png"))
    print(summary_table(phases))
    print(f"wrote {out}")
    return 0
