"""One verification: format + accuracy of one response against one gold answer.

`score_item` is what a verifier worker runs. It is also safe to call in-process (tests, a
debugger), but then nothing bounds its time: production code goes through `RewardPool`.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

from megammr.rewards import extract as ex

# lazy in this module: math-verify and sympy (~2 s of imports), and safe_parse, which imports them.
# The verifier processes import them once (ensure_ready); the trainer and `megammr score` import
# this module for its dataclasses and never compare answers in-process.


@dataclass(frozen=True)
class Weights:
    """The verifier's knobs: the part of RewardConfig a worker needs, passed to it as plain data.
    No defaults here (they live in RewardConfig): build it with `Weights.from_config(cfg)`."""
    format_weight: float
    accuracy_weight: float
    require_think: bool
    require_answer_tag: bool
    max_answer_chars: int

    @classmethod
    def from_config(cls, cfg) -> "Weights":
        """From a recipe's RewardConfig section."""
        return cls(cfg.format_weight, cfg.accuracy_weight, cfg.require_think, cfg.require_answer_tag,
                   cfg.max_answer_chars)


@dataclass
class RewardItem:
    response: Any                 # str, or bytes that may be invalid UTF-8
    answer: Any                   # gold: str/number; for multiple choice a letter or an option text
    choices: Any = None           # None, [option texts] (lettered A, B, ...) or {letter: text}
    precision: Optional[int] = None  # numeric answers: round the prediction to this many decimals
                                     # first (MathVista's convention for float answers)


@dataclass
class RewardResult:
    format: float = 0.0           # 1.0 when the format is right, else 0.0 (before weighting)
    accuracy: float = 0.0         # 1.0 when the answer is right, else 0.0 (before weighting)
    reward: float = 0.0           # format_weight * format + accuracy_weight * accuracy
    status: str = "ok"            # ok | timeout | crash | error
    extracted: Optional[str] = None  # the answer text that was compared (truncated to 200 chars)
    latency_s: float = 0.0        # wall time of this verification as seen by the pool
    error: Optional[str] = field(default=None, repr=False)


# --------------------------------------------------------------------------- math-verify
_ready = False


def ensure_ready():
    """Import math-verify and close its eval path once per process (see safe_parse)."""
    global _ready
    if not _ready:
        from megammr.rewards import safe_parse
        # math-verify logs a warning for every parse without its signal-based timeout; the
        # pool enforces time limits with processes instead, so that warning is noise.
        for name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.ERROR)
        safe_parse.install(warmup=_warmup)
        _ready = True


def _warmup():
    """Touch every comparison path once (trusted constants only) so sympy's lazy imports happen
    before the parser guard is installed."""
    from math_verify import verify
    pairs = [("\\frac{1}{2}", "0.5"), ("x^2+2x+1", "(x+1)^2"), ("[1,2)", "(1,2]"), ("\\{1,2\\}", "(1,2)"),
             ("x=3", "3"), ("50\\%", "0.5"), ("30^\\circ", "\\frac{\\pi}{6}"), ("\\sqrt{2}", "1.41"),
             ("1 < x < 2", "(1,2)"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)"), ("5 cm", "5")]
    for g, p in pairs:
        verify(parse(g, True), parse(p, True), timeout_seconds=None)
        verify(parse(g, False), parse(p, False), timeout_seconds=None)
    parse.cache_clear()


_PROSE = re.compile(r"[A-Za-z]{3,}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_TEXT_ARG = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{[^{}]*\}")


def _looks_like_prose(s: str) -> bool:
    """'5 meters' or 'The answer is 2' (read by math-verify's anchored text rules) versus LaTeX
    or bare math like 'x = 3' or '\\frac{1}{2}\\text{ cm}' (read as one boxed expression)."""
    bare = _COMMAND.sub(" ", _TEXT_ARG.sub(" ", s))
    return bool(_PROSE.search(bare))


@lru_cache(maxsize=4096)
def parse(text: str, boxed: bool) -> tuple:
    """math-verify parse, signal timeout off (enforced by the pool); cached (gold and predicted
    answers alike) because a gold answer repeats n times per prompt and a group's responses repeat
    answers. The module-level name is what the verifier calls, so `megammr bench rewards
    --cache-report` can route calls past the cache to measure what it saves."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    from math_verify import parse as math_verify_parse
    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    src = "\\boxed{" + text + "}" if boxed else text
    return tuple(math_verify_parse(src, cfg, parsing_timeout=None))


def _parsed(text: str, from_boxed: bool) -> list:
    first = from_boxed or not _looks_like_prose(text)
    out = parse(text, first)
    if not out and not from_boxed:
        out = parse(text, not first)
    return list(out)


_UNITS = {"mm", "cm", "m", "km", "in", "inch", "inches", "ft", "feet", "foot", "yd", "yards", "mi", "miles",
          "mg", "g", "kg", "lb", "lbs", "ml", "l", "s", "sec", "seconds", "min", "minutes", "h", "hr", "hours",
          "days", "years", "units", "unit", "degrees", "degree", "deg", "°", "meters", "metres", "cents",
          "dollars", "square units", "sq units", "cm2", "m2"}
_NUM_UNIT = re.compile(r"^\s*([-+]?\d[\d,]*(?:\.\d+)?)\s*(?:\\[,;! ]\s*)*"
                       r"(?:\\(?:text|mathrm|mbox)\s*\{\s*([^{}]{1,20}?)\s*\}|([A-Za-z°]{1,10}(?: units)?))"
                       r"(?:\s*\^\s*\{?[23]\}?)?\s*\.?$")


def _strip_unit(s: str) -> str:
    """'12 cm^2' or '12\\,\\text{cm}' -> '12' for a known unit word; anything else unchanged
    (an unknown trailing letter such as '5x' is math, not a unit)."""
    m = _NUM_UNIT.match(s)
    if m and (m.group(2) or m.group(3) or "").lower() in _UNITS:
        return m.group(1)
    return s


def _plain_equal(gold: str, pred: str) -> bool:
    """Cheap exact match before any parsing: identical text up to spaces, $ and a final period."""
    def key(s):
        s = s.strip().strip("$").strip().rstrip(".")
        return "".join(s.split())
    g, p = key(gold), key(pred)
    return bool(g) and g == p


MAX_DIGITS = 1e5  # a number with more digits than this is never an answer worth computing


def _log10_mag(e) -> Optional[float]:
    """log10 of |e| for a numeric sympy tree, estimated without evaluating it (inf when the
    exponent alone overflows a float); None when e is not a plain number."""
    try:
        if e.is_Integer:
            return e.p.bit_length() * 0.30103
        if e.is_Rational:
            return e.p.bit_length() * 0.30103 - e.q.bit_length() * 0.30103
        if e.is_Float:
            return 0.0 if e == 0 else math.log10(abs(float(e))) if abs(float(e)) != float("inf") else float("inf")
        if e.is_Pow:
            lb, lx = _log10_mag(e.args[0]), _log10_mag(e.args[1])
            if lb is None or lx is None:
                return None
            if lx > 300:
                return float("inf")
            return abs(lb) * 10 ** lx
        if e.is_Mul or e.is_Add:
            parts = [_log10_mag(a) for a in e.args]
            return None if any(p is None for p in parts) else (sum(parts) if e.is_Mul else max(parts) + 1)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None
    return None


def _too_big(parsed: list) -> bool:
    """True when a parsed answer holds a power tower or factorial whose value has more than
    MAX_DIGITS digits (10^{10^{10^{10}}}): comparing it would compute it, which never ends."""
    import sympy
    for obj in parsed:
        if not isinstance(obj, sympy.Basic):
            continue
        for node in sympy.preorder_traversal(obj):
            if getattr(node, "is_Pow", False):
                mag = _log10_mag(node)
                if mag is not None and mag > MAX_DIGITS:
                    return True
            elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.gamma)):
                mag = _log10_mag(node.args[0])
                if mag is not None and mag > 4:  # 10^4! already has 35,660 digits
                    return True
    return False


def math_equal(gold: str, pred: str, pred_boxed: bool = True) -> bool:
    """math-verify equivalence of two answer strings (gold first: verify is not symmetric)."""
    if _plain_equal(gold, pred):
        return True
    if len(pred) <= 60:
        pred = _strip_unit(pred)
        if _plain_equal(gold, pred):
            return True
    ensure_ready()
    from math_verify import verify
    g = _parsed(gold, from_boxed=not _looks_like_prose(gold))
    p = _parsed(pred, from_boxed=pred_boxed)
    if not g or not p or _too_big(p) or _too_big(g):
        return False
    return bool(verify(g, p, timeout_seconds=None))


# --------------------------------------------------------------------------- the reward
def _clean(s: str) -> str:
    # NUL and other C0 controls carry no math; they only trip up C-level tokenisers.
    return s.replace("\x00", "") if "\x00" in s else s


# Deeper brace nesting than this is never a real answer, and the LaTeX grammar's parse time
# grows steeply with depth (400 levels take seconds), so such answers are not parsed at all.
MAX_BRACE_DEPTH = 40


def _brace_depth(s: str) -> int:
    depth = peak = 0
    for c in s:
        if c == "{":
            depth += 1
            peak = max(peak, depth)
        elif c == "}":
            depth -= 1
    return peak


def accuracy(response: str, gold: str, options: list, w: Weights,
             precision: Optional[int] = None) -> tuple[float, Optional[str]]:
    pred, from_boxed = ex.extract_answer(response, w.require_answer_tag)
    if pred is None:
        return 0.0, None
    pred = _clean(pred)
    shown = pred[:200]
    if not pred or len(pred) > w.max_answer_chars or _brace_depth(pred) > MAX_BRACE_DEPTH:
        return 0.0, shown
    gl = ex.gold_letter(gold, options)
    if gl is None and options:
        # Gold given as the option's value in another notation ('1/2' for option '\frac{1}{2}').
        hits = [letter for letter, text in options
                if text.strip() and math_equal(ex.strip_option_prefix(text), gold, False)]
        gl = hits[0] if len(hits) == 1 else None
    if gl is not None:
        allowed = "".join(letter for letter, _ in options) or ex.LETTERS[:8]
        pl = ex.pred_letter(pred, options, allowed)
        if pl is None and options:
            # 'The option text in another notation' (0.5 for \frac{1}{2}): exactly one option
            # must be math-equal, else nothing is picked.
            hits = [letter for letter, text in options
                    if text.strip() and math_equal(ex.strip_option_prefix(text), pred, from_boxed)]
            pl = hits[0] if len(hits) == 1 else None
        return (1.0 if pl == gl else 0.0), shown
    if precision is not None and _round_equal(gold, pred, precision):
        return 1.0, shown
    return (1.0 if math_equal(gold, pred, from_boxed) else 0.0), shown


def _round_equal(gold: str, pred: str, precision: int) -> bool:
    """Both plain numbers (units stripped) and equal after rounding to `precision` decimals."""
    try:
        g, p = float(_strip_unit(gold).replace(",", "")), float(_strip_unit(pred).strip("$ ").replace(",", ""))
    except ValueError:
        return False
    return round(g, precision) == round(p, precision)


def score_item(item: RewardItem, w: Weights) -> RewardResult:
    """Format and accuracy of one response. Pure; bounded in time only by the calling pool."""
    response = ex.to_text(item.response)
    gold = _clean(ex.to_text(item.answer)).strip()
    options = ex.option_list(item.choices)
    fmt = 1.0 if ex.format_ok(response, w.require_think) else 0.0
    acc, shown = accuracy(response, gold, options, w, item.precision) if gold else (0.0, None)
    return RewardResult(format=fmt, accuracy=acc, reward=w.format_weight * fmt + w.accuracy_weight * acc,
                        extracted=shown)
