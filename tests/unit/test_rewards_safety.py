"""Hostile inputs: no code execution, every call within its time limit, a pool that recovers."""
import os
import subprocess
import sys
import time

import pytest

from megammr.config import RewardConfig
from megammr.rewards import RewardItem, RewardPool, Weights, score_item
from megammr.rewards import safe_parse

TIMEOUT = 2.0


def payloads(marker: str) -> list[str]:
    """Responses that would create `marker` if any parsing path eval'd them."""
    code = f"__import__('os').system('touch {marker}')"
    forms = [
        code,
        f"1 + {code}",
        f"$${code}$$",
        f"\\({code}\\)",
        f"\\boxed{{{code}}}",
        f"\\operatorname{{{code}}}(1)",
        f"\\text{{{code}}}",
        f"\\frac{{{code}}}{{2}}",
        f"\\mathrm{{__import__}}('os').system('touch {marker}')",
        f"The final answer is {code}",
        f"answer: (lambda: {code})()",
        f"2**(3) + eval(\"{code}\")",
    ]
    out = []
    for f in forms:
        out += [f"<think>x</think><answer>{f}</answer>", f"<think>x</think><answer>\\boxed{{{f}}}</answer>", f]
    return out


def test_payload_is_real(tmp_path):
    """The payload does create the file when sympy's own parse_expr reads it (so the test below
    would catch a leak)."""
    marker = tmp_path / "proof"
    code = (f"from sympy.parsing.sympy_parser import parse_expr\n"
            f"parse_expr(\"__import__('os').system('touch {marker}')\")")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert marker.exists()


def test_payloads_change_nothing_in_process(tmp_path):
    marker = tmp_path / "pwned"
    w = Weights.from_config(RewardConfig(require_answer_tag=False))
    for p in payloads(str(marker)):
        for gold, choices in [("1", None), (p, None), ("B", [p, "2"])]:
            score_item(RewardItem(p, gold, choices), w)
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == []


def test_parse_expr_is_replaced_everywhere():
    score_item(RewardItem("<answer>1</answer>", "1"), Weights.from_config(RewardConfig()))  # installs the guard
    import latex2sympy2_extended.latex2sympy2 as l2s
    import math_verify.parser as mvp
    import sympy.parsing.sympy_parser as sp
    for mod in (sp, mvp, l2s):
        assert mod.parse_expr is safe_parse.safe_parse_expr
    import sympy
    with pytest.raises(ValueError):
        sympy.sympify("__import__('os').getcwd()")
    with pytest.raises(ValueError):
        safe_parse.safe_parse_expr("(1).__class__")
    assert safe_parse.safe_parse_expr("2**3 + 1/2", evaluate=True) == sympy.Rational(17, 2)
    assert safe_parse.safe_parse_expr("-(1 + 2) × 3 ÷ 2", evaluate=True) == sympy.Rational(-9, 2)
    with pytest.raises(ValueError):
        safe_parse.safe_parse_expr("(" * 500 + "1" + ")" * 500)


def test_answer_forms_never_hit_the_guard():
    """Every legitimate path of math-verify stays on the arithmetic the guard reads."""
    before = safe_parse.refused
    for gold, pred in [("1/2", "answer: 1/2"), ("2", "the final answer is 1+1"), ("50%", "50 percent"),
                       ("x^2", "x^2"), ("[1,2)", "[1,2)"), ("3", "x=3")]:
        score_item(RewardItem(f"<answer>{pred}</answer>", gold), Weights.from_config(RewardConfig()))
    assert safe_parse.refused == before


class _Hang:
    """Unpickling this in a worker sleeps: a stand-in for a verification that never returns."""
    def __reduce__(self):
        return (time.sleep, (600,))


class _Crash:
    """Unpickling this in a worker kills the process: a stand-in for a segfault."""
    def __reduce__(self):
        return (os._exit, (3,))


@pytest.fixture(scope="module")
def pool():
    with RewardPool(RewardConfig(timeout_s=TIMEOUT), workers=2) as p:
        p.wait_ready()
        yield p


def test_hostile_inputs_finish_within_timeout(pool, tmp_path):
    marker = tmp_path / "pwned"
    hostile = [
        "<think>x</think><answer>" + "9" * 1_000_000 + "</answer>",          # 1 MB answer
        "x" * 1_000_000,                                                       # 1 MB of nothing
        "<think>" + "a " * 500_000 + "</think><answer>1</answer>",            # 1 MB think, right answer
        "<think>x</think><answer>" + "{" * 200_000 + "1" + "}" * 200_000 + "</answer>",
        "<think>x</think><answer>\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}</answer>",
        "<think>x</think><answer>\\frac{" * 300 + "1" + "}{2}</answer>" * 300,
        "<think>x</think><answer>$10^{10^{10^{10}}}$</answer>",
        "<think>x</think><answer>9^9^9^9^9</answer>",
        "<think>x</think><answer>\\boxed{10^{10^{10^{10}}}}</answer>",
        "<think>x</think><answer>1\x00</answer>",
        "<think>\x00\x00</think><answer>\x00</answer>",
        b"<think>x</think><answer>\xff\xfe\xc3\x28 1</answer>",              # invalid UTF-8
        "<think>x</think><answer>\udcff1</answer>",                           # lone surrogate
    ] + payloads(str(marker))
    items = [RewardItem(h, "1") for h in hostile]
    t0 = time.monotonic()
    res = pool.score(items)
    wall = time.monotonic() - t0
    assert len(res) == len(items)
    for h, r in zip(hostile, res):
        assert r.latency_s <= TIMEOUT + 1.0, (h[:60], r)
        assert r.status in ("ok", "timeout"), (h[:60], r)
        if r.status != "ok":
            assert r.reward == 0.0
    assert res[2].status == "ok" and res[2].reward == 1.5  # a long response can still be right
    # power towers are recognised without being computed: scored 0 at once, no timeout
    towers = [i for i, h in enumerate(hostile) if isinstance(h, str) and ("10^{10^" in h or "9^9^" in h)]
    assert towers and all(res[i].status == "ok" and res[i].latency_s < 1.0 for i in towers)
    assert wall < 30
    assert not marker.exists()
    # the pool still verifies normally afterwards
    again = pool.score([RewardItem("<think>a</think><answer>\\frac{1}{2}</answer>", "0.5")])
    assert again[0].reward == 1.5


def test_pool_recovers_from_hang_and_crash(pool):
    good = RewardItem("<think>a</think><answer>2</answer>", "2")
    before = pool.stats.as_dict()
    t0 = time.monotonic()
    res = pool.score([good, RewardItem(_Hang(), "1"), good, RewardItem(_Crash(), "1"), good, good])
    assert time.monotonic() - t0 < TIMEOUT + 10
    assert [r.status for r in res] == ["ok", "timeout", "ok", "crash", "ok", "ok"]
    assert [r.reward for r in res] == [1.5, 0.0, 1.5, 0.0, 1.5, 1.5]
    after = pool.stats.as_dict()
    assert after["timeouts"] == before["timeouts"] + 1
    assert after["crashes"] == before["crashes"] + 1
    assert after["restarts"] >= before["restarts"] + 2
    assert [r.reward for r in pool.score([good] * 4)] == [1.5] * 4


def test_results_keep_input_order(pool):
    items = [RewardItem(f"<think>a</think><answer>{i}</answer>", str(i if i % 3 else i + 1)) for i in range(50)]
    res = pool.score(items)
    assert [r.accuracy for r in res] == [0.0 if i % 3 == 0 else 1.0 for i in range(50)]
    assert pool.score([]) == []
