"""`megammr bench rewards`: verifications per second and latency of the reward pool.

The mix imitates a GRPO batch on math data: groups of `--group` responses share one gold
answer and repeat a few answers (so the verifiers' caches behave as in training), no two groups
share anything (so `--group 1` is all distinct: no cache can help), about half are right,
answers come in the forms models write (integers, decimals, fractions in several notations,
LaTeX expressions, percentages, intervals, sets, tuples, units, degrees, multiple choice), each
response carries a few hundred characters of reasoning, and a few are malformed or hostile.
Throughput is the wall time of `pool.score` over the whole batch after the workers are up.
`--cache-report` adds what the parse cache of rewards/core.py contributes (see cache_report).
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


def make_mix(n: int, group: int, seed: int = 0, first: int = 0) -> list:
    """Deterministic list of RewardItem: `n` responses in groups of `group` sharing a gold answer.

    Every group has its own values: its k-th group (counting from `first`) builds every string
    from a = 8 (first + k) + 4, so no two groups share a gold answer, an option text or an answer
    (a pure number a, a + 1, a + 3 or -a of one group is never one of another's; twice a is a
    multiple of 8, never another group's a). Within a group, responses repeat the same few answers,
    as a model's samples of one prompt do. So with group=1 every gold and every response is
    distinct and no string a verifier parses comes up in two items; the only exception are
    multiple-choice golds given as a letter (A-D), which are matched without parsing.
    """
    from megammr.rewards import RewardItem
    rng = random.Random(seed)
    items = []
    k = first
    while len(items) < n:
        a, b = 8 * k + 4, rng.randint(2, 12)
        k += 1
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
            choices = [str(a), str(a + 1), f"\\frac{{{a}}}{{{b}}}", str(a + 3)]
            gold = rng.choice(["C", choices[2]])
            right, wrong = ["C", "(C)", "C.", f"{a}/{b}"], ["A", "(B)", "D"]
        for _ in range(group):
            u = rng.random()
            if u < 0.03:      # malformed: no tags, truncated (the group's value keeps them distinct too)
                resp = (f"I think the answer is {rng.choice(right)} (item {a})" if rng.random() < 0.5
                        else f"<think>{_think(rng)} {a}")
            elif u < 0.04:    # hostile: a power tower, 60-deep braces, a Python payload, NUL bytes
                think = f"<think>{_think(rng)}</think>"
                resp = think + rng.choice([f"<answer>10^{{10^{{{a + 10}}}}}</answer>",
                                           "<answer>" + "{" * 60 + str(a) + "}" * 60 + "</answer>",
                                           f"<answer>__import__('os').system('echo {a}')</answer>",
                                           "<answer>\x00\x00</answer>"])
            else:
                resp = _wrap(rng, rng.choice(right) if u < 0.52 else rng.choice(wrong))
            items.append(RewardItem(resp, gold, choices))
    return items[:n]


def groups_in(n: int, group: int) -> int:
    """Groups (hence value indices) that make_mix(n, group) uses."""
    return -(-n // group)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--n", type=int, default=4096, help="verifications in the timed batch")
    p.add_argument("--group", type=int, default=16, help="responses per gold answer (GRPO group size)")
    p.add_argument("--workers", type=int, default=None, help="verifier processes (default: RewardConfig.workers)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per verification (default: RewardConfig.timeout_s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--cache-report", action="store_true",
                   help="also score the mix in this process three times (parse cache as shipped, predictions "
                        "not cached, nothing cached): parse calls, cache hits by side, CPU seconds")


CACHE_MODES = ("as shipped", "predictions not cached", "nothing cached")


def cache_report(items, weights, warm_items) -> dict:
    """What rewards.core's parse cache (one lru_cache for gold and predicted answers) does for this
    mix, measured in this process, one verification after another (no pool, no time limit: the
    mix is known to finish). Each mode starts from empty caches (ours and sympy's). "predictions not cached" caches
    only reference strings (gold answers and option texts) by routing every other parse past the
    cache; "nothing cached" parses every time. The swap is local to this benchmark process."""
    from megammr.rewards import core
    from megammr.rewards import extract as ex
    from megammr.rewards.core import score_item

    from sympy.core.cache import clear_cache as clear_sympy_cache

    core.ensure_ready()
    for it in warm_items:  # first-use costs (lazy imports, parser tables), as in the pool's warm-up
        score_item(it, weights)
    cached = core.parse
    raw = cached.__wrapped__
    refs = set()
    for it in items:
        refs.add(ex.to_text(it.answer).replace("\x00", "").strip())
        refs.update(ex.strip_option_prefix(t) for _, t in ex.option_list(it.choices))
    out = {}
    try:
        for mode in CACHE_MODES:
            cached.cache_clear()
            clear_sympy_cache()  # sympy memoises its own operations; each mode starts cold there too
            counts = {"calls_reference": 0, "calls_prediction": 0, "hits_reference": 0, "hits_prediction": 0}

            def parse(text, boxed, mode=mode, counts=counts):
                side = "reference" if text in refs else "prediction"
                counts["calls_" + side] += 1
                if mode == "nothing cached" or (mode != "as shipped" and side == "prediction"):
                    return raw(text, boxed)
                before = cached.cache_info().hits
                res = cached(text, boxed)
                counts["hits_" + side] += cached.cache_info().hits - before
                return res

            core.parse = parse
            c0, t0 = time.process_time(), time.perf_counter()
            for it in items:
                score_item(it, weights)
            out[mode] = dict(counts, cpu_s=round(time.process_time() - c0, 2),
                             wall_s=round(time.perf_counter() - t0, 2))
    finally:
        core.parse = cached
        cached.cache_clear()
    return out


def run(args) -> int:
    from megammr.config import RewardConfig
    from megammr.rewards import RewardPool, latency_percentile

    cfg = RewardConfig()
    items = make_mix(args.n, args.group, args.seed)
    with RewardPool(cfg, workers=args.workers, timeout_s=args.timeout) as pool:
        t0 = time.monotonic()
        pool.wait_ready()
        startup = time.monotonic() - t0
        # Warm the workers (imports, sympy's lazy paths) on values the timed mix does not use,
        # so that with --group 1 not one parse of the timed batch is a cache hit.
        warm = make_mix(64, args.group, args.seed + 1, first=groups_in(args.n, args.group))
        pool.score(warm)
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
    if args.cache_report:
        from megammr.rewards.core import Weights
        report["cache_report"] = cache_report(items, Weights.from_config(cfg), warm)
    if args.json:
        print(json.dumps(report))
    else:
        width = max(len(k) for k in report)
        for k, v in report.items():
            if k != "cache_report":
                print(f"{k:<{width}}  {v}")
        for mode, r in report.get("cache_report", {}).items():
            print(f"in-process, {mode:<23} {r['cpu_s']:7.2f} s CPU ({r['wall_s']:.2f} s wall); parse calls "
                  f"{r['calls_reference']} gold/option + {r['calls_prediction']} prediction, cache hits "
                  f"{r['hits_reference']} + {r['hits_prediction']}")
    over = [x for x in lat if x > pool.timeout_s + 0.5]
    if over:
        print(f"WARNING: {len(over)} verification(s) exceeded the timeout", file=sys.stderr)
        return 1
    return 0
