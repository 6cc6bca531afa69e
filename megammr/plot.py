"""`megammr plot RUN_DIR`: learning curves of a phase or a whole curriculum, as one PNG.

RUN_DIR is a phase's output directory (it has metrics.jsonl) or a curriculum's (phase
directories below it, each with metrics.jsonl, drawn in name order: phase1, phase2, phase3).
Panels: reward, accuracy, format rate, response length and KL against the global step, one colour
per phase; a summary table (first and last fifth of every phase) is printed too.
"""
from __future__ import annotations

import json
import os
import sys

PANELS = (("reward/mean", "reward"), ("reward/accuracy", "accuracy"), ("reward/format", "format rate"),
          ("response/length_mean", "response length (tokens)"), ("kl", "KL to reference"))


def read_phases(run_dir: str) -> list[tuple[str, list[dict]]]:
    def read(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
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


def summary_table(phases) -> str:
    lines = [f"{'phase':<10} {'steps':>5} {'reward first 1/5':>17} {'last 1/5':>9} {'rise':>7} "
             f"{'accuracy last 1/5':>18} {'format last 1/5':>16}"]
    for name, rows in phases:
        a, b = fifths(rows)
        _, acc = fifths(rows, "reward/accuracy")
        _, fmt = fifths(rows, "reward/format")
        lines.append(f"{name:<10} {len(rows):>5} {a:>17.3f} {b:>9.3f} {b - a:>+7.3f} {acc:>18.3f} {fmt:>16.3f}")
    return "\n".join(lines)


def plot(phases, out: str) -> str:
    import matplotlib
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
