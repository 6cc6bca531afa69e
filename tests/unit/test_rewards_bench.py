"""`megammr bench rewards` runs and reports (a smoke test; the figure lives in BENCHMARKS.md)."""
import json
import os
import subprocess
import sys

from megammr.bench.rewards import make_mix

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mix_is_deterministic_and_varied():
    a, b = make_mix(200, 16, seed=3), make_mix(200, 16, seed=3)
    assert [x.response for x in a] == [x.response for x in b]
    assert len({x.answer for x in a}) >= 10 and any(x.choices for x in make_mix(2000, 16))


def _parse_keys_per_item(items, monkeypatch):
    """The (text, boxed) keys each item sends to the cached math-verify parse, in one process."""
    from megammr.rewards import core
    from megammr.rewards.core import Weights, score_item
    from megammr.config import RewardConfig

    core.ensure_ready()  # its warm-up parses trusted constants; not part of any item
    raw, seen = core.parse.__wrapped__, []
    monkeypatch.setattr(core, "parse", lambda text, boxed: (seen[-1].add((text, boxed)), raw(text, boxed))[1])
    w = Weights.from_config(RewardConfig())
    for it in items:
        seen.append(set())
        score_item(it, w)
    return seen


def test_group_1_is_all_distinct(monkeypatch):
    """--group 1 (and its warm-up batch): no gold, response or parsed string is shared by two items,
    so no parse cache can hit across items."""
    from megammr.bench.rewards import groups_in
    n = 800
    items = make_mix(n, 1) + make_mix(64, 1, seed=1, first=groups_in(n, 1))
    assert len({x.response for x in items}) == len(items)
    golds = [x.answer for x in items if x.answer not in "ABCD"]  # letters are never parsed
    assert len(set(golds)) == len(golds) and len(golds) > 0.9 * len(items)
    keys = _parse_keys_per_item(items, monkeypatch)
    owner = {}
    for i, ks in enumerate(keys):
        for key in ks:
            assert owner.setdefault(key, i) == i, f"items {owner[key]} and {i} both parse {key}"
    assert len(owner) > len(items)  # the verifier did parse (gold and prediction of most items)


def test_group_1_responses_are_distinct_at_the_benchmarks_size():
    """The benchmark's 4096 items and its warm-up batch: every response distinct (malformed ones too)."""
    from megammr.bench.rewards import groups_in
    n = 4096
    items = make_mix(n, 1) + make_mix(64, 1, seed=1, first=groups_in(n, 1))
    assert len({x.response for x in items}) == len(items)
    golds = [x.answer for x in items if x.answer not in "ABCD"]
    assert len(set(golds)) == len(golds)


def test_groups_share_only_their_own_gold(monkeypatch):
    """Groups of 16: the 16 responses of a group share its gold and repeat answers; two groups share
    nothing a parser sees."""
    items = make_mix(320, 16)
    for g in range(20):
        assert len({x.answer for x in items[16 * g:16 * (g + 1)]}) == 1
    keys = _parse_keys_per_item(items, monkeypatch)
    per_group = [set().union(*keys[16 * g:16 * (g + 1)]) for g in range(20)]
    for g in range(20):
        for h in range(g):
            assert not per_group[g] & per_group[h]
    assert sum(len(k) for k in keys) > 1.5 * sum(len(k) for k in per_group)  # repeats within groups


def test_bench_rewards_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "megammr.cli", "bench", "rewards", "--n", "128", "--workers", "1",
                        "--json"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    assert rep["verifications"] == 128 and rep["verifications_per_s"] > 0
    assert 0 <= rep["p50_ms"] <= rep["p99_ms"] <= rep["max_ms"] and rep["timeouts"] == 0


def test_cache_report_counts_hits_by_side():
    from megammr.bench.rewards import cache_report, groups_in
    from megammr.config import RewardConfig
    from megammr.rewards import core
    from megammr.rewards.core import Weights

    w = Weights.from_config(RewardConfig())
    shipped = core.parse
    g16 = cache_report(make_mix(96, 16), w, make_mix(8, 16, seed=1, first=groups_in(96, 16)))
    assert core.parse is shipped  # the benchmark's swap is undone
    a, p, n = g16["as shipped"], g16["predictions not cached"], g16["nothing cached"]
    assert a["hits_reference"] > 0 and a["hits_prediction"] > 0
    assert p["hits_reference"] == a["hits_reference"] and p["hits_prediction"] == 0
    assert n["hits_reference"] == n["hits_prediction"] == 0
    assert a["calls_prediction"] == p["calls_prediction"] == n["calls_prediction"]  # the same work each time
    g1 = cache_report(make_mix(96, 1), w, make_mix(8, 1, seed=1, first=96))["as shipped"]
    assert g1["hits_reference"] == 0
