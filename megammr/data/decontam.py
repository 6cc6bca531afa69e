"""Decontamination: drop training questions that appear in an evaluation set.

A training question matches an evaluation question when their normalised texts are equal, or
when they share one word n-gram of length `ngram` (config.TOOLS.decontam_ngram, 13, the length GPT-3's and
most later contamination reports use): long enough that a shared span is not a stock phrase.
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Optional

from megammr.config import TOOLS

_NON_WORD = re.compile(r"[^\w]+")
QUESTION_KEYS = ("question", "problem", "query", "prompt")


def normalize_question(text: str) -> str:
    """NFKC, case-folded, punctuation and whitespace collapsed to single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def ngrams(words: list[str], n: int):
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """Index of evaluation questions from one or more JSONL files."""

    def __init__(self, paths: list[str], ngram: int = TOOLS.decontam_ngram):
        self.paths = list(paths)
        self.n = ngram
        self.exact: dict[str, str] = {}
        self.grams: dict[str, str] = {}
        self.hits = {p: 0 for p in self.paths}
        for p in self.paths:
            for q in _eval_questions(p):
                norm = normalize_question(q)
                self.exact.setdefault(norm, p)
                if self.n > 0:
                    for g in ngrams(norm.split(), self.n):
                        self.grams.setdefault(g, p)

    def match(self, question: str) -> Optional[str]:
        """The evaluation file this question is found in (counted), or None."""
        norm = normalize_question(question)
        hit = self.exact.get(norm)
        if hit is None and self.n > 0:
            for g in ngrams(norm.split(), self.n):
                hit = self.grams.get(g)
                if hit is not None:
                    break
        if hit is not None:
            self.hits[hit] += 1
        return hit


def _eval_questions(path: str):
    """Questions of an evaluation JSONL (first of the keys question/problem/query/prompt)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            try:
                d = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{n}: <line>: cannot parse evaluation record ({e})") from None
            q = next((d[k] for k in QUESTION_KEYS if isinstance(d, dict) and isinstance(d.get(k), str)), None)
            if q is None:
                raise ValueError(f"{path}:{n}: question: evaluation record has none of {', '.join(QUESTION_KEYS)}")
            yield q
