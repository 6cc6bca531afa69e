"""`megammr bench rewards`: verifications per second and latency of the reward pool.

The mix imitates a GRPO batch on math data: groups of `--group` responses share one gold
answer (so each worker's gold-parse cache behaves as in training), about half are right,
answers come in the forms models write (integers, decimals, fractions in several notations,
LaTeX expressions, percentages, intervals, sets, tuples, units, degrees, multiple choice), each
response carries a few hundred characters of reasoning, and a few are malformed or hostile.
Throughput is the wall time of `pool.score` over the whole batch after the workers are up.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time


def _think(rng: random.Random) -> str:
    words = ["so", "the", "area", "is", "then", "we", "get", "x", "=", "3", "+", "\\frac{1}{2}", "because", "angle"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(40, 160)))


def _wrap(rng: random.Random, ans: str) -> str:
    ans = f"\\boxed{{{ans}}}" if rng.random() < 0.5 else ans
    return f"<think>{_think(rng)}</think>\n<answer>{ans}</answer>"


def make_mix(n: int, group: int, seed: int = 0) -> list:
    """Deterministic list of RewardItem: `n` responses in groups sharing a gold answer."""
    from megammr.rewards import RewardItem
    rng = random.Random(seed)
    items = []
    while len(items) < n:
        a, b = rng.randint(1, 60), rng.randint(2, 12)
        kind = rng.choices(["int", "decimal", "fraction", "latex", "percent", "interval", "set", "tuple",
                            "unit", "degree", "mc"], weights=[25, 10, 15, 12, 5, 5, 4, 4, 6, 4, 10])[0]
        choices = None
        if kind == "int":
            gold, right, wrong = str(a), [str(a), f"{a}.0", f"x = {a}"], [str(a + 1), str(-a)]
        elif kind == "decimal":
            gold, right, wrong = f"{a}.25", [f"{a}.25", f"{a * 4 + 1}/4", f"\\frac{{{a * 4 + 1}}}{{4}}"], [f"{a}.5"]
        elif kind == "fraction":
            gold = f"\\frac{{{a}}}{{{b}}}"
            right, wrong = [f"{a}/{b}", f"\\frac{{{a * 2}}}{{{b * 2}}}", f"\\dfrac{{{a}}}{{{b}}}"], [f"{a}/{b + 1}"]
        elif kind == "latex":
            gold = f"{a}\\sqrt{{{b}}}"
            right, wrong = [f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{b}}} \\cdot {a}"], [f"{a}\\sqrt{{{b + 1}}}", f"{a + 1}\\sqrt{{{b}}}"]
        elif kind == "percent":
            gold, right, wrong = f"{a}\\%", [f"{a}\\%", f"{a}", f"{a / 100}"], [f"{a + 5}\\%"]
        elif kind == "interval":
            gold, right, wrong = f"[{-b}, {a})", [f"[{-b},{a})"], [f"({-b}, {a}]", f"[{-b}, {a + 1})"]
        elif kind == "set":
            gold, right, wrong = f"\\{{{a}, {b}\\}}", [f"\\{{{b},{a}\\}}"], [f"\\{{{a}, {b + 1}\\}}"]
        elif kind == "tuple":
            gold, right, wrong = f"({a}, {b})", [f"({a},{b})"], [f"({b}, {a + 1})"]
        elif kind == "unit":
            gold, right, wrong = str(a), [f"{a} \\text{{ cm}}", f"{a} cm^2", f"{a} meters"], [f"{a + 2} cm"]
        elif kind == "degree":
            gold, right, wrong = f"{a}^\\circ", [f"{a}^\\circ", str(a), f"{a}°"], [f"{a + 10}^\\circ"]
        else:
            choices = [str(a), str(a + 1), f"\\frac{{{a}}}{{{b}}}", "none of these"]
            gold = rng.choice(["C", choices[2]])
            right, wrong = ["C", "(C)", "C.", f"{a}/{b}"], ["A", "(B)", "D"]
        for _ in range(group):
            u = rng.random()
            if u < 0.03:      # malformed: no tags, truncated
                resp = f"I think the answer is {rng.choice(right)}" if rng.random() < 0.5 else f"<think>{_think(rng)}"
            elif u < 0.04:    # hostile
                resp = rng.choice(["<think>x</think><answer>10^{10^{10}}</answer>",
                                   "<think>x</think><answer>" + "{" * 60 + "1" + "}" * 60 + "</answer>",
                                   "<think>x</think><answer>__import__('os').getcwd()</answer>",
                                   "<think>x</think><answer>\x00\x00</answer>"])
            else:
                resp = _wrap(rng, rng.choice(right) if u < 0.52 else rng.choice(wrong))
            items.append(RewardItem(resp, gold, choices))
    return items[:n]


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--n", type=int, default=4096, help="verifications in the timed batch")
    p.add_argument("--group", type=int, default=16, help="responses per gold answer (GRPO group size)")
    p.add_argument("--workers", type=int, default=None, help="verifier processes (default: RewardConfig.workers)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per verification (default: RewardConfig.timeout_s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args) -> int:
    from megammr.config import RewardConfig
    from megammr.rewards import RewardPool, latency_percentile

    cfg = RewardConfig()
    items = make_mix(args.n, args.group, args.seed)
    with RewardPool(cfg, workers=args.workers, timeout_s=args.timeout) as pool:
        t0 = time.monotonic()
        pool.wait_ready()
        startup = time.monotonic() - t0
        pool.score(make_mix(64, args.group, args.seed + 1))  # warm caches the way a running trainer has them
        pool.stats.latencies_s.clear()
        t0 = time.monotonic()
        results = pool.score(items)
        wall = time.monotonic() - t0
        stats = pool.stats
        lat = [r.latency_s for r in results]
        report = {
            "verifications": len(results),
            "workers": pool.n_workers,
            "timeout_s": pool.timeout_s,
            "wall_s": round(wall, 3),
            "verifications_per_s": round(len(results) / wall, 1),
            "p50_ms": round(1000 * latency_percentile(lat, 50), 2),
            "p99_ms": round(1000 * latency_percentile(lat, 99), 2),
            "max_ms": round(1000 * max(lat), 2) if lat else 0.0,
            "mean_reward": round(sum(r.reward for r in results) / max(1, len(results)), 4),
            "accuracy": round(sum(r.accuracy for r in results) / max(1, len(results)), 4),
            "timeouts": sum(r.status == "timeout" for r in results),
            "errors": sum(r.status in ("error", "crash") for r in results),
            "worker_startup_s": round(startup, 2),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, Python {platform.python_version()}",
        }
        assert stats.verifications >= len(results)
    if args.json:
        print(json.dumps(report))
    else:
        width = max(len(k) for k in report)
        for k, v in report.items():
            print(f"{k:<{width}}  {v}")
    over = [x for x in lat if x > pool.timeout_s + 0.5]
    if over:
        print(f"WARNING: {len(over)} verification(s) exceeded the timeout", file=sys.stderr)
        return 1
    return 0
