r"""Question and answer normalisation, applied once per record by every importer
(megammr/data/importers/) through `normalize`.

Rules, in the order they run (each one a function here, each tested in tests/unit/test_data_import.py):

question
  1. `<image>` placeholders (LLaVA, ViRL39K) are removed: the prompt builder places the images
     itself. Their count must equal the row's image count when there is any (image_count_mismatch).
  2. Whitespace: \r\n and \r -> \n, spaces at line ends cut, runs of blank lines -> one, ends stripped.
answer
  3. Whitespace: every run (newlines included) -> one space, ends stripped.
  4. `\boxed{...}` / `\fbox{...}` (nested braces matched, `\{` `\}` escaped): a gold answer becomes
     the content of its box; several boxes (a multi-part answer) are joined by ", ". An unclosed box
     is an error (bad_answer). A model-style response (LLaVA's gpt turn) gives its LAST box instead
     (`final_answer`), else the text of `<answer>...</answer>`, else what follows a last-line
     "The answer is" / "Answer:", else the whole text.
  5. Math delimiters around the whole answer go: `$...$`, `$$...$$`, `\(...\)`, `\[...\]`; and a
     whole `\text{...}` / `\textbf{...}` / `\mathrm{...}` / `\mbox{...}` is unwrapped (`\text{B}` -> B).
  6. Longer than `max_answer_chars` after that: an error (bad_answer); a gold answer that long is a
     solution, not something a rule-based verifier can match.
choices
  7. Options shipped inside the question text move to `choices` and out of the question (the
     prompt renders `choices` itself): a "Choices:" / "Options:" header followed by labelled
     options, or options one per line, or a trailing inline run "(A) x (B) y". Labels are `(A)`,
     `A.`, `A)`, `A:`, consecutive from A, at least two. Only when the answer names one of them
     (its letter or exactly its text); an answer letter past the last option is an error
     (bad_choices). Text after the last option's line stays in the question.
  8. An answer written as an option label, "(B)", "B.", "B)", "Option B", becomes "B" when there are
     choices. Explicit choices (a column) win over the question text; when the question repeats
     exactly those options, the repeat is cut.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

IMAGE_TOKEN = "<image>"


class NormalizeError(ValueError):
    """A value no rule can normalise: the importer turns it into a RecordError at file:row."""

    def __init__(self, field: str, reason: str, message: str):
        self.field, self.reason, self.message = field, reason, message
        super().__init__(f"{field}: {message} [{reason}]")


# --------------------------------------------------------------------------- question
_TOKEN_INSIDE_RE = re.compile(r"(?<=\S)[ \t]*<image>[ \t]*(?=\S)")
_TOKEN_RE = re.compile(r"[ \t]*<image>[ \t]*\n?")


def strip_image_tokens(text: str) -> tuple[str, int]:
    """(text without `<image>` placeholders, how many there were); one between two words leaves a space."""
    return _TOKEN_RE.sub("", _TOKEN_INSIDE_RE.sub(" ", text)), text.count(IMAGE_TOKEN)


def clean_text(text: str) -> str:
    """Line endings to \\n, trailing spaces cut, blank-line runs to one, ends stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --------------------------------------------------------------------------- answer
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every outermost box, braces matched; NormalizeError if one never closes."""
    out, pos = [], 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return out
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "\\":
                i += 2  # \{ and \} are literal braces
                continue
            depth += (c == "{") - (c == "}")
            i += 1
        if depth:
            raise NormalizeError("answer", "bad_answer", f"unbalanced braces: the \\boxed{{ at character {m.start()} "
                                 f"of {_short(text)} is never closed; fix the answer in the input")
        out.append((m.start(), i, text[m.end():i - 1]))
        pos = i


def strip_boxed(answer: str) -> str:
    """A gold answer's box content (several boxes joined by ", "); the text unchanged without a box."""
    boxes = _boxes(answer)
    if not boxes:
        return answer
    return ", ".join(clean_answer_space(c) for _, _, c in boxes)


_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_IS_RE = re.compile(r"^(?:so,?\s+|therefore,?\s+|thus,?\s+)?(?:the\s+)?(?:final\s+|correct\s+)?answer"
                           r"(?:\s+is)?\s*[:：]?\s*(.+?)\s*\.?$", re.I)


def final_answer(response: str) -> str:
    """The final answer a response states: its last box, else its <answer> tag, else a last line
    "The answer is X" / "Answer: X", else the whole response."""
    boxes = _boxes(response)
    if boxes:
        return boxes[-1][2]
    tags = _ANSWER_TAG_RE.findall(response)
    if tags:
        return tags[-1]
    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
    if lines:
        m = _ANSWER_IS_RE.match(lines[-1])
        if m:
            return m.group(1)
    return response


_WRAPS = ((r"$$", r"$$"), (r"$", r"$"), (r"\(", r"\)"), (r"\[", r"\]"))
_TEXT_RE = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mbox)\s*\{(.*)\}$", re.S)


def unwrap_math(answer: str) -> str:
    """`$x$`, `$$x$$`, `\\(x\\)`, `\\[x\\]` and a whole `\\text{x}` -> x (repeated while one applies)."""
    while True:
        a = answer.strip()
        for left, right in _WRAPS:
            inner = a[len(left):-len(right)] if len(a) > len(left) + len(right) and a.startswith(left) \
                and a.endswith(right) else None
            if inner is not None and (left != "$" or "$" not in inner):
                a = inner.strip()
                break
        m = _TEXT_RE.match(a)
        if m and _balanced(m.group(1)):
            a = m.group(1).strip()
        if a == answer:
            return a
        answer = a


def _balanced(s: str) -> bool:
    depth = 0
    for c in s.replace("\\{", "").replace("\\}", ""):
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
    return depth == 0


def clean_answer_space(answer: str) -> str:
    return " ".join(answer.split())


def normalize_answer(answer, *, field: str = "answer") -> str:
    """Rules 3-5 on a gold answer (str or number); numbers are written as JSON writes them."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise NormalizeError(field, "wrong_type", f"expected a string or a number, got {type(answer).__name__}")
    if not isinstance(answer, str):
        return json.dumps(answer)
    return unwrap_math(clean_answer_space(strip_boxed(clean_answer_space(answer))))


# --------------------------------------------------------------------------- choices
_LABEL_ANSWER_RE = re.compile(r"^(?:(?:option|choice|answer)\s*[:：]?\s*)?\(?([A-Z])\)?\s*[.:：)]?$", re.I)


def choice_label(answer: str) -> Optional[str]:
    """"B", "(B)", "B.", "B)", "B:", "Option B" -> "B"; None for anything else (lower-case "b" is a
    variable, not a label)."""
    m = _LABEL_ANSWER_RE.match(answer.strip())
    return m.group(1) if m and m.group(1).isupper() else None


@dataclass
class ParsedChoices:
    stem: str            # the question without its options
    options: list[str]   # option texts, lettered A, B, ...
    rest: str            # text after the last option's line (kept in the question)


_HEADER_RE = re.compile(r"(?:^|(?<=\s))(?:answer\s+)?(?:choices|options)\s*[:：]", re.I)


def _label(letter: str, at_line_start: bool) -> re.Pattern:
    before = r"(?:^|(?<=\n))[ \t]*" if at_line_start else r"(?:^|(?<=\s))"
    return re.compile(before + rf"(?:\({letter}\)|{letter}[.):：])[ \t]*")


def _options(tail: str, lines: bool) -> Optional[tuple[list[str], str]]:
    """Options at the very start of `tail` (labels A, B, ... in order); (options, rest) or None."""
    m = _label("A", lines).match(tail)
    if m is None:
        return None
    starts = [(m.start(), m.end())]
    for k in range(1, 26):
        nxt = _label(chr(ord("A") + k), lines).search(tail, starts[-1][1])
        if nxt is None:
            break
        starts.append((nxt.start(), nxt.end()))
    if len(starts) < 2:
        return None
    opts = [tail[b:starts[i + 1][0]] for i, (_, b) in enumerate(starts[:-1])]
    last, _, rest = tail[starts[-1][1]:].partition("\n")
    opts.append(last)
    opts = [" ".join(o.split()).rstrip(",;") for o in opts]
    if any(not o for o in opts):
        return None
    return opts, rest.strip()


def split_choices(question: str) -> Optional[ParsedChoices]:
    """Options shipped inside the question text (rule 7), or None."""
    for h in reversed(list(_HEADER_RE.finditer(question))):
        tail = question[h.end():].lstrip()
        got = _options(tail, lines=False)
        if got:
            return ParsedChoices(question[:h.start()].strip(), got[0], got[1])
    # No header: options one per line, or a trailing inline "(A) x (B) y".
    for m in reversed(list(re.finditer(r"(?:^|(?<=\n))[ \t]*(?:\(A\)|A[.):：])", question))):
        got = _options(question[m.start():], lines=True)
        if got:
            return ParsedChoices(question[:m.start()].strip(), got[0], got[1])
    for m in reversed(list(re.finditer(r"(?:^|(?<=\s))\(A\)", question))):
        got = _options(question[m.start():], lines=False)
        if got and "\n" not in question[m.start():].strip():
            return ParsedChoices(question[:m.start()].strip(), got[0], got[1])
    return None


def _letters(n: int) -> str:
    return f"A-{chr(ord('A') + n - 1)}"


def _match_answer(answer: str, options: list[str], where: str) -> Optional[str]:
    """The answer as a letter of `options`; None when it names none of them."""
    letter = choice_label(answer)
    if letter is not None:
        if ord(letter) - ord("A") >= len(options):
            raise NormalizeError("answer", "bad_choices", f"answer {answer!r} is past the last of the {len(options)} "
                                 f"choices {where} ({_letters(len(options))}); fix the answer or the choices")
        return letter
    texts = [clean_answer_space(unwrap_math(o)) for o in options]
    if texts.count(answer) == 1:
        return chr(ord("A") + texts.index(answer))
    return None


def normalize_choices(choices) -> Optional[list[str]]:
    """Explicit choices: a list of str, a {letter: text} object, or a str holding a JSON list."""
    if choices is None:
        return None
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            raise NormalizeError("choices", "wrong_type", "a string that is not a JSON list; expected a list of "
                                 "option texts") from None
    if isinstance(choices, dict):
        choices = [v for _, v in sorted(choices.items(), key=lambda kv: str(kv[0]))]
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, (str, int, float)) and not isinstance(c, bool)
                                                         for c in choices):
        raise NormalizeError("choices", "wrong_type", "expected a list of option texts")
    return [clean_answer_space(str(c)) for c in choices]


@dataclass
class Normalized:
    question: str
    answer: str
    choices: Optional[list[str]]
    choices_from_question: bool = False


def normalize(question: str, answer, *, choices=None, num_images: int, max_answer_chars: int,
              answer_is_response: bool = False) -> Normalized:
    """All rules on one record. `answer_is_response`: the answer is a model-style response (LLaVA's
    gpt turn) whose final answer is extracted first (rule 4)."""
    if not isinstance(question, str):
        raise NormalizeError("question", "wrong_type", f"expected a string, got {type(question).__name__}")
    q, n_tokens = strip_image_tokens(question)
    if n_tokens and n_tokens != num_images:
        raise NormalizeError("question", "image_count_mismatch", f"{n_tokens} <image> placeholder(s) but {num_images} "
                             "image(s) in the row; fix the row's images or its placeholders")
    q = clean_text(q)
    if answer_is_response and isinstance(answer, str):
        answer = final_answer(answer)
    a = normalize_answer(answer)
    if len(a) > max_answer_chars:
        raise NormalizeError("answer", "bad_answer", f"{len(a)} characters after normalisation "
                             f"(limit {max_answer_chars}: "
                             f"--max-answer-chars): {_short(a)}; a rule-based verifier needs a short final answer")
    opts = normalize_choices(choices)
    if opts is not None:
        parsed = split_choices(q)
        if parsed and parsed.options == opts and parsed.stem:
            q = "\n".join(x for x in (parsed.stem, parsed.rest) if x)  # the question repeated the options
        letter = _match_answer(a, opts, "in the choices field")
        return Normalized(q, letter or a, opts)  # an answer naming no option: schema.validate says so
    parsed = split_choices(q)
    if parsed is not None and parsed.stem:
        letter = _match_answer(a, parsed.options, "parsed from the question text")
        if letter is not None:
            stem = "\n".join(x for x in (parsed.stem, parsed.rest) if x)
            return Normalized(stem, letter, parsed.options, choices_from_question=True)
    return Normalized(q, a, None)


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")
