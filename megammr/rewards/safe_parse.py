"""Close the one door through which math-verify could run model text as Python.

Audit of the parsing paths the verifier reaches (math-verify 0.9, latex2sympy2_extended 1.11,
sympy 1.14):
- latex2sympy2 parses LaTeX with an ANTLR grammar and builds sympy objects with constructors
  (Symbol, Function, Add, Pow, ...): no eval. Its one parse_expr call is for `variable_values`,
  which math-verify never passes.
- math_verify.parser.extract_expr calls sympy's parse_expr on plain-text expressions (the
  regex limits them to digits and operators, but parse_expr is eval() underneath).
- sympy's Number(str) calls sympify(str), which calls sympy_parser.parse_expr, i.e. eval().
  latex2sympy2 and math-verify call Number() on digit strings from their regexes/lexer.
- Float(str), Integer(str), Rational(str) parse numbers without eval.

`install()` replaces parse_expr in every module that holds a reference to it (sympy's parser
module, sympy.parsing, math_verify.parser, latex2sympy2) with `safe_parse_expr`: a small
recursive-descent parser for numbers and + - * / ^ ** × ÷ ( ) that builds sympy objects
directly. Anything else (a name, a quote, a bracket, a dot call) is refused with ValueError,
which the callers already treat as "does not parse". Nothing from the model reaches eval().
It is installed in the verifier processes (and on the first in-process verification), never as
an import side effect, so other code in a trainer process keeps sympy's own behaviour.
"""
from __future__ import annotations

import logging
import re
import sys

import latex2sympy2_extended.latex2sympy2 as l2s
import math_verify.parser as mvp
import sympy
import sympy.parsing
import sympy.parsing.sympy_parser as sp
import sympy.physics.units  # noqa: F401  (imported lazily inside sympy, and it sympifies strings: see install)

MAX_CHARS = 2000   # longer plain-text expressions are not answers
MAX_DEPTH = 60     # parenthesis / unary / power nesting; keeps far below the recursion limit

_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)|(\*\*|[-+*/^()×÷]))")
_ALLOWED = re.compile(r"^[0-9.\s+\-*/^()×÷]*$")

refused = 0  # how many parse requests were refused in this process (for tests and logs)


class _Parser:
    def __init__(self, text: str, evaluate: bool):
        self.toks = self._lex(text)
        self.i = 0
        self.evaluate = evaluate

    @staticmethod
    def _lex(text: str) -> list[str]:
        toks, pos, n = [], 0, len(text)
        while pos < n:
            m = _TOKEN.match(text, pos)
            if not m:
                if text[pos:].strip() == "":
                    break
                raise ValueError("unexpected character in expression")
            toks.append(m.group(1) or {"×": "*", "÷": "/", "^": "**"}.get(m.group(2), m.group(2)))
            pos = m.end()
        return toks

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, tok=None):
        t = self.peek()
        if t is None or (tok is not None and t != tok):
            raise ValueError(f"expected {tok or 'a token'}")
        self.i += 1
        return t

    def parse(self):
        e = self.expr(0)
        if self.peek() is not None:
            raise ValueError("trailing tokens")
        return e

    def expr(self, d):
        e = self.term(d)
        while self.peek() in ("+", "-"):
            op = self.take()
            r = self.term(d)
            e = sympy.Add(e, r if op == "+" else sympy.Mul(-1, r, evaluate=self.evaluate), evaluate=self.evaluate)
        return e

    def term(self, d):
        e = self.unary(d)
        while self.peek() in ("*", "/"):
            op = self.take()
            r = self.unary(d)
            if op == "/":
                r = sympy.Pow(r, -1, evaluate=self.evaluate)
            e = sympy.Mul(e, r, evaluate=self.evaluate)
        return e

    def unary(self, d):
        if d > MAX_DEPTH:
            raise ValueError("expression nested too deeply")
        if self.peek() in ("+", "-"):
            op = self.take()
            e = self.unary(d + 1)
            return e if op == "+" else sympy.Mul(-1, e, evaluate=self.evaluate)
        return self.power(d)

    def power(self, d):
        base = self.atom(d)
        if self.peek() == "**":
            self.take()
            exp = self.unary(d + 1)  # right-associative, as in Python: 2**3**2 = 2**9
            return sympy.Pow(base, exp, evaluate=self.evaluate)
        return base

    def atom(self, d):
        t = self.take()
        if t == "(":
            e = self.expr(d + 1)
            self.take(")")
            return e
        if t[0].isdigit() or t[0] == ".":
            # int() and Float() read digits only; Python caps int() at 4300 digits.
            return sympy.Float(t) if "." in t else sympy.Integer(int(t))
        raise ValueError(f"unexpected {t!r}")


_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,30}$")
_CONSTANTS = {"pi": sympy.pi, "E": sympy.E, "I": sympy.I, "oo": sympy.oo, "nan": sympy.nan, "zoo": sympy.zoo}


def safe_parse_expr(s, local_dict=None, transformations=None, global_dict=None, evaluate=True, **_):
    """Drop-in for sympy.parsing.sympy_parser.parse_expr that only reads arithmetic.

    A bare identifier becomes a Symbol (or pi/E/I/oo/nan/zoo), as parse_expr's auto_symbol would:
    sympy itself sympifies constant names (e.g. unit prefixes on a lazy import)."""
    global refused
    if isinstance(s, str) and _IDENT.match(s.strip()):
        name = s.strip()
        if local_dict and name in local_dict:
            return local_dict[name]
        return _CONSTANTS.get(name) or sympy.Symbol(name)
    if not isinstance(s, str) or len(s) > MAX_CHARS or not _ALLOWED.match(s):
        refused += 1
        if refused <= 3:
            logging.getLogger(__name__).warning("refused to parse non-arithmetic text %r", str(s)[:80])
        raise ValueError("refused: only numbers and + - * / ^ ( ) are parsed from text")
    return _Parser(s, bool(evaluate)).parse()


_installed = False


def install(warmup=None) -> None:
    """Swap parse_expr for safe_parse_expr everywhere the verifier can reach it (idempotent).

    `warmup()` runs first with sympy's own parser: sympy imports some modules lazily (e.g.
    sympy.physics.units from simplify, imported at the top here) and those sympify constant strings
    at import time."""
    global _installed
    if _installed:
        return
    if warmup is not None:
        warmup()
    for mod in (sp, sympy.parsing, l2s, mvp, sympy):
        if hasattr(mod, "parse_expr"):
            setattr(mod, "parse_expr", safe_parse_expr)
    # math-verify memoises parse_expr results; drop anything cached before the swap.
    if hasattr(mvp, "parse_expr_cached"):
        mvp.parse_expr_cached.cache_clear()
    # Other modules that imported parse_expr by name (checked, not assumed).
    for name, mod in list(sys.modules.items()):
        if name.startswith(("math_verify", "latex2sympy2")) and getattr(mod, "parse_expr", None) is not None \
                and getattr(mod, "parse_expr") is not safe_parse_expr:
            setattr(mod, "parse_expr", safe_parse_expr)
    _installed = True
