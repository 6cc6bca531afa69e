"""Pure string work on model output: the format check, answer extraction, multiple choice.

Everything here runs on hostile text (1 MB strings, NUL bytes, unbalanced braces), so every
function is a single linear pass built from str.find/count/rfind and anchored regexes
without nested quantifiers: no backtracking blow-up, no recursion on user input.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

Choices = Union[Sequence[str], dict, None]


def to_text(x) -> str:
    """Bytes (possibly invalid UTF-8) or anything else -> str; invalid bytes become U+FFFD."""
    if isinstance(x, str):
        # Lone surrogates (from JSON "\udcff" or surrogateescape) cannot be encoded later on;
        # replace them now so every later step sees plain text.
        try:
            x.encode("utf-8")
            return x
        except UnicodeEncodeError:
            return x.encode("utf-8", "replace").decode("utf-8", "replace")
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).decode("utf-8", "replace")
    return "" if x is None else str(x)


def format_ok(response: str, require_think: bool) -> bool:
    """Strict `<think>...</think>` then `<answer>...</answer>`; whitespace around and between the
    blocks is tolerated, nothing else is: no text before, between or after, one of each tag, and
    a non-empty answer (an empty one would teach the policy to skip answering)."""
    s = response.strip()
    if s.count(ANSWER_OPEN) != 1 or s.count(ANSWER_CLOSE) != 1:
        return False
    if require_think:
        if not s.startswith(THINK_OPEN) or s.count(THINK_OPEN) != 1 or s.count(THINK_CLOSE) != 1:
            return False
        rest = s[s.index(THINK_CLOSE) + len(THINK_CLOSE):].lstrip()
    else:
        if THINK_OPEN in s or THINK_CLOSE in s:
            # An optional think block is fine, but it must still come first and be closed.
            if not s.startswith(THINK_OPEN) or s.count(THINK_OPEN) != 1 or s.count(THINK_CLOSE) != 1:
                return False
            rest = s[s.index(THINK_CLOSE) + len(THINK_CLOSE):].lstrip()
        else:
            rest = s
    if not rest.startswith(ANSWER_OPEN) or not rest.endswith(ANSWER_CLOSE):
        return False
    return bool(rest[len(ANSWER_OPEN):-len(ANSWER_CLOSE)].strip())


def answer_block(response: str, require_tag: bool) -> Optional[str]:
    """Text of the last complete `<answer>...</answer>` block outside the reasoning; without one,
    None when the tag is required, else the text after the last `</think>` (or the whole response).

    An answer block inside `<think>...</think>` (or inside a think block never closed, as in a
    response cut at max_new_tokens) is a draft, not the final answer: it does not count."""
    cut = response.rfind(THINK_CLOSE)
    after = cut + len(THINK_CLOSE) if cut >= 0 else 0
    if response.find(THINK_OPEN, after) < 0:
        start = response.rfind(ANSWER_OPEN, after)
        if start >= 0:
            end = response.find(ANSWER_CLOSE, start)
            if end >= 0:
                return response[start + len(ANSWER_OPEN):end]
    if require_tag:
        return None
    cut = response.rfind(THINK_CLOSE)
    return response[cut + len(THINK_CLOSE):] if cut >= 0 else response


def last_boxed(text: str) -> Optional[str]:
    r"""Content of the last `\boxed{...}` (or `\fbox{...}`), braces matched; None if there is no
    complete one. `\boxed 5` (no braces) is accepted up to the next whitespace or `$`."""
    pos = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if pos < 0:
        return None
    after = pos + (len("\\boxed") if text.startswith("\\boxed", pos) else len("\\fbox"))
    n, i = len(text), after
    while i < n and text[i] == " ":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        # `\boxed 5`: only with a space, so `\boxedx` is not read as a box.
        m = re.match(r"[^\s$]+", text[i:i + 200])
        return m.group(0) if m and i > after else None
    depth, j = 0, i
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2  # an escaped brace \{ or \} does not count
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
        j += 1
    return None


def extract_answer(response: str, require_tag: bool) -> tuple[Optional[str], bool]:
    """(final answer text, came_from_boxed). Inside the answer block the last \\boxed{} wins."""
    block = answer_block(response, require_tag)
    if block is None:
        return None, False
    boxed = last_boxed(block)
    if boxed is not None:
        return boxed.strip(), True
    return block.strip(), False


# --------------------------------------------------------------------------- multiple choice
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option labels, in order
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}$")
_LONE_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\s*[.:]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|\.|:|\s*\))\s*\S")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_ANSWER_IS = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])")
# 'the answer is A or B', 'A, B', 'A/B', 'A and B': a second letter right after the first
_ALTERNATIVE = re.compile(r"\s*(?:,|/|&|(?i:or|and)\b)\s*\(?([A-Z])\)?(?![A-Za-z])")


def option_list(choices: Choices) -> list[tuple[str, str]]:
    """[(letter, text)] from a list (lettered A, B, ... in order) or a {letter: text} mapping."""
    if not choices:
        return []
    if isinstance(choices, dict):
        return [(str(k).strip().upper(), to_text(v)) for k, v in choices.items()]
    return [(LETTERS[i], to_text(c)) for i, c in enumerate(list(choices)[:len(LETTERS)])]


def norm_text(s: str) -> str:
    """Loose comparison key for option texts: case, spaces, $ and a trailing period ignored."""
    s = s.strip().rstrip(".").strip().strip("$").strip()
    m = _TEXT_WRAP.match(s)
    if m:
        s = m.group(1)
    s = s.rstrip(".").lower()
    return " ".join(s.split())


def strip_option_prefix(text: str) -> str:
    """'(A) 3/4' or 'A. 3/4' -> '3/4' (benchmarks sometimes store options with their letter)."""
    m = re.match(r"^\s*\(?[A-Z][).:]\s*", text)
    return text[m.end():] if m else text


def gold_letter(answer: str, options: list[tuple[str, str]]) -> Optional[str]:
    """The gold option letter, from a letter ('B', '(B)') or the option text; None if neither."""
    a = norm_text(answer)
    letters = [letter for letter, _ in options]
    m = _LONE_LETTER.match(answer.strip())
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    for letter, text in options:
        if a and a in (norm_text(text), norm_text(strip_option_prefix(text))):
            return letter
    if not options and m and answer.strip()[0:1] in "(" + LETTERS[:8] and m.group(1).isupper():
        # A lone capital letter with no option list (MathVerse keeps options in the question).
        return m.group(1)
    return None


def pred_letter(answer: str, options: list[tuple[str, str]], allowed: str) -> Optional[str]:
    """The option the response picks: a letter ('B', '(B)', 'B.', 'B) text', 'the answer is B') or
    the option text. Several different letters in one answer are ambiguous and pick nothing,
    so listing every letter is never rewarded."""
    s = answer.strip().strip("$").strip()
    w = _TEXT_WRAP.match(s)
    if w:
        s = w.group(1).strip()
    m = _LONE_LETTER.match(s)
    if m and m.group(1).upper() in allowed:
        return m.group(1).upper()
    key = norm_text(s)
    for letter, text in options:
        if key and key in (norm_text(text), norm_text(strip_option_prefix(text))):
            return letter
    head = s[:400]  # a letter worth reading sits at the start; bounded so long prose stays cheap
    m = _LEADING_LETTER.match(head)
    if m and m.group(1) in allowed:
        return m.group(1)
    found = {x for x in _PAREN_LETTER.findall(head) if x in allowed}
    for m in _ANSWER_IS.finditer(head):
        found.add(m.group(1))
        alt = _ALTERNATIVE.match(head, m.end())
        if alt:
            found.add(alt.group(1))  # hedging between letters picks nothing
    found &= set(allowed)
    if len(found) == 1:
        return found.pop()
    return None
