"""`megammr bench curriculum`: the README's first command, timed, with where the time went.

Runs `python -m megammr train CURRICULUM [overrides]` exactly as a user does, in a fresh working
directory (so the bundled data and the tiny model are prepared from nothing, as in a fresh clone),
then `megammr plot` on its run directory. Install time is not included (the README's figure adds it).

What it reports, from the run's own output and files (nothing is re-measured differently):
- wall seconds of the whole command and the CPU seconds it used (user + system, all its processes:
  on a shared machine the wall time is inflated by others' work, the CPU time much less);
- preparation: bundled data and tiny model (the "... ready in S s" lines the trainer prints);
- per phase: wall (from its "phase k/N" line to the next phase's or the end), the sum of its step
  times and their stages (rollout, reward, log-probs, train, sync: metrics.jsonl), the rest (model
  build, checkpoints, HF export), and the mean reward of the first and last fifth of its steps;
- the issue's requirements checked: phase-1 rise >= 0.15, whole curriculum < 15 min (goal < 10).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import shutil
import tempfile
import threading
import time

from megammr.bench.machine import loadavg, versions
from megammr.plot import clock, fifths, read_rows

STAGES = ("time/rollout", "time/reward", "time/logprobs", "time/train", "time/sync")
RISE_MIN, LIMIT_S, GOAL_S = 0.15, 15 * 60, 10 * 60


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("curriculum", nargs="?", default=os.path.join("recipes", "tiny", "curriculum.yaml"),
                   help="curriculum file (default: recipes/tiny/curriculum.yaml, read from the current directory)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides for every phase")
    p.add_argument("--work-dir", default=None,
                   help="fresh working directory the run writes outputs/ into (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed for the whole run")
    p.add_argument("--json", default=None, metavar="FILE", help="also write all figures to this JSON file")


# ----------------------------------------------------------------------------- parsing the run's output
_PHASE = re.compile(r"^megammr train: phase (\d+)/(\d+) (\S+): ")
_READY = re.compile(r"^megammr train: (bundled data|tiny model) ready in ([0-9.]+) s")


def timeline(lines: list[tuple[float, str]]) -> dict:
    """From (seconds since start, line) pairs: preparation seconds and each phase's wall window."""
    prep, starts = {}, []
    for t, line in lines:
        m = _READY.match(line)
        if m:
            prep["data" if m.group(1) == "bundled data" else "model"] = float(m.group(2))
        m = _PHASE.match(line)
        if m:
            starts.append((m.group(3), t))
    end = lines[-1][0] if lines else 0.0
    phases = {name: (t0, starts[i + 1][1] if i + 1 < len(starts) else end) for i, (name, t0) in enumerate(starts)}
    return {"prep": prep, "phases": phases}


def phase_figures(name: str, rows: list[dict], window: tuple[float, float], prep_s: float) -> dict:
    first, last = fifths(rows)
    steps_s = sum(r.get("time/step") or 0.0 for r in rows)
    wall = window[1] - window[0]
    return {
        "phase": name, "steps": len(rows), "wall_s": wall, "steps_s": steps_s,
        "s_per_step": steps_s / len(rows) if rows else None,
        "stages_s": {k.split("/")[1]: sum(r.get(k) or 0.0 for r in rows) for k in STAGES},
        # model build, engine setup, checkpoints, HF export (phase 1: minus the preparation)
        "other_s": wall - steps_s - prep_s,
        "reward_first_fifth": first, "reward_last_fifth": last, "rise": last - first,
    }


# ----------------------------------------------------------------------------- run
def _stream(cmd: list[str], cwd: str, timeout: float) -> tuple[int, list[tuple[float, str]], float]:
    """Run `cmd`, echo and timestamp its output lines; (exit code, lines, wall seconds)."""
    t0 = time.perf_counter()
    lines = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as p:
        timer = threading.Timer(timeout, p.kill)  # also ends a run that hangs without printing
        timer.start()
        try:
            for line in p.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))
                sys.stdout.write(line)
        except KeyboardInterrupt:
            p.kill()
            raise
        finally:
            timer.cancel()
        rc = p.wait()
    if time.perf_counter() - t0 >= timeout:
        raise SystemExit(f"megammr bench curriculum: the run exceeded --timeout {timeout:.0f} s and was stopped")
    return rc, lines, time.perf_counter() - t0


def report(res: dict) -> str:
    out = [f"tiny curriculum: {clock(res['wall_s'])} wall, {clock(res['cpu_s'])} CPU (user+system), "
           f"load average before {res['loadavg_before']}, after {res['loadavg_after']}",
           f"preparation: bundled data {res['prep_s'].get('data', 0):.1f} s, tiny model {res['prep_s'].get('model', 0):.1f} s",
           "",
           "| phase | steps | wall | in steps | s/step | rollout | reward | log-probs | train | sync | other | "
           "reward first 1/5 | last 1/5 | rise |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for ph in res["phases"]:
        st = ph["stages_s"]
        out.append(f"| {ph['phase']} | {ph['steps']} | {ph['wall_s']:.0f} s | {ph['steps_s']:.0f} s | "
                   f"{ph['s_per_step']:.2f} | {st['rollout']:.1f} s | {st['reward']:.1f} s | {st['logprobs']:.1f} s | "
                   f"{st['train']:.1f} s | {st['sync']:.1f} s | {ph['other_s']:.0f} s | "
                   f"{ph['reward_first_fifth']:.3f} | {ph['reward_last_fifth']:.3f} | {ph['rise']:+.3f} |")
    ok = res["checks"]
    out += ["", f"phase-1 rise {res['phases'][0]['rise']:+.3f} (needs >= {RISE_MIN}): "
                f"{'ok' if ok['phase1_rise'] else 'NOT MET'}; "
                f"wall {clock(res['wall_s'])} (needs < 15 min, goal < 10): "
                f"{'ok' if ok['under_15_min'] else 'NOT MET'}{', goal met' if ok['under_10_min'] else ''}"]
    return "\n".join(out)


def run(args) -> int:
    recipe = os.path.abspath(args.curriculum)
    if not os.path.isfile(recipe):
        raise SystemExit(f"megammr bench curriculum: {args.curriculum}: no such curriculum file "
                         "(run from the repository root, or pass its path)")
    from megammr import curriculum as cur
    phases = cur.load(recipe, args.overrides)  # a bad recipe or override fails here, before the clock starts
    temp = None
    if args.work_dir is None:
        temp = tempfile.mkdtemp(prefix="megammr-bench-curriculum-")
        work = temp
    else:
        work = os.path.abspath(args.work_dir)
        os.makedirs(work, exist_ok=True)
        if os.listdir(work):
            raise SystemExit(f"megammr bench curriculum: --work-dir {args.work_dir} is not empty: the run must "
                             "prepare its data and model from nothing")
    try:
        run_dir = os.path.dirname(os.path.normpath(phases[0].output_dir)) or "."
        print(f"megammr bench curriculum: megammr train {args.curriculum} {' '.join(args.overrides)} in {work}", flush=True)
        before, cpu0 = loadavg(), resource.getrusage(resource.RUSAGE_CHILDREN)
        rc, lines, wall = _stream([sys.executable, "-m", "megammr", "train", recipe, *args.overrides], work, args.timeout)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = loadavg()
        if rc != 0:
            raise SystemExit(f"megammr bench curriculum: the run failed (exit {rc}); its output is above")
        t_plot = time.perf_counter()
        prc = subprocess.run([sys.executable, "-m", "megammr", "plot", run_dir], cwd=work, capture_output=True, text=True)
        plot_s = time.perf_counter() - t_plot
        if prc.returncode != 0:
            raise SystemExit(f"megammr bench curriculum: megammr plot failed:\n{prc.stdout}{prc.stderr}")
        tl = timeline(lines)
        prep_total = sum(tl["prep"].values())
        figs = []
        for i, ph in enumerate(phases):
            rows = read_rows(os.path.join(work, ph.output_dir, "metrics.jsonl"))
            figs.append(phase_figures(ph.name, rows, tl["phases"].get(ph.name, (0.0, 0.0)), prep_total if i == 0 else 0.0))
        res = {
            "curriculum": args.curriculum, "overrides": args.overrides, "wall_s": wall + plot_s, "train_wall_s": wall,
            "plot_s": plot_s, "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
            "prep_s": tl["prep"], "phases": figs, "loadavg_before": before, "loadavg_after": after,
            "cpus": os.cpu_count(), "versions": versions(),
            "date": time.strftime("%Y-%m-%d"),
        }
        res["checks"] = {"phase1_rise": figs[0]["rise"] >= RISE_MIN, "under_15_min": res["wall_s"] < LIMIT_S,
                         "under_10_min": res["wall_s"] < GOAL_S}
        print()
        print(report(res), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    finally:
        if temp and not args.keep:
            shutil.rmtree(temp, ignore_errors=True)
        elif temp:
            print(f"kept {temp}")
    return 0
