"""`megammr score`: score responses in a JSONL file with the rule-based rewards.

Input lines: {"id"?, "response", "answer", "choices"?}. The output holds one line per scored input
line, in input order: the input object with "format", "accuracy", "reward" and "status" (ok |
timeout | crash | error) added, nothing else. A line that is not valid JSON or lacks a field is
reported on stderr with its line number and written to the rejected file instead,
{"line": N, "error": ..., "text": the line}: by default OUTPUT with .rejected.jsonl for .jsonl
(none when the output is stdout; --rejected PATH names one). Blank lines are skipped; invalid
UTF-8 bytes are read as U+FFFD. A summary goes to stderr. Exit code 0 once at least one line was
scored, 2 for bad arguments or when no line could be scored (the previous output is then kept).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from megammr.config import RecipeError, RewardConfig, load_recipe
from megammr.rewards import RewardItem, RewardPool

CHUNK = 2048  # lines scored per pool call: bounds memory on large files


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--input", required=True, help="JSONL file of {id?, response, answer, choices?} ('-' for stdin)")
    p.add_argument("--output", default="-", help="JSONL output (default: stdout)")
    p.add_argument("--rejected", default=None, help="JSONL of the malformed lines (default: OUTPUT.rejected.jsonl "
                   "beside a file output; none for stdout)")
    p.add_argument("--recipe", default=None, help="take the reward section (weights, limits) from this recipe")
    p.add_argument("--workers", type=int, default=None, help="verifier processes (default: recipe reward.workers)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per verification (default: recipe reward.timeout_s)")
    p.add_argument("override", nargs="*", help="recipe overrides such as reward.format_weight=0.5")


def _parse_line(lineno: int, raw: bytes):
    """-> (item or None, the object to write back or None, error message or None)."""
    text = raw.decode("utf-8", "replace")  # invalid UTF-8 bytes become U+FFFD; the line is still scored
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, None, f"line {lineno}: invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, None, f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in ("response", "answer") if k not in obj or obj[k] is None]
    if missing:
        return None, None, f"line {lineno}: missing field {', '.join(repr(m) for m in missing)}"
    if not isinstance(obj["response"], str):
        return None, None, f"line {lineno}: field 'response' must be a string, got {type(obj['response']).__name__}"
    choices = obj.get("choices")
    if choices is not None and not isinstance(choices, (list, dict)):
        return None, None, f"line {lineno}: field 'choices' must be a list or an object"
    answer = obj["answer"]
    if isinstance(answer, (list, dict)):
        return None, None, f"line {lineno}: field 'answer' must be a string or a number"
    return RewardItem(obj["response"], answer if isinstance(answer, str) else json.dumps(answer), choices), obj, None


def _lines(path: str):
    f = sys.stdin.buffer if path == "-" else open(path, "rb")
    try:
        for i, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark (Windows editors) is not part of the JSON
            if raw.strip():
                yield i, raw
    finally:
        if f is not sys.stdin.buffer:
            f.close()


class _Staged:
    """A text file written beside its target and renamed over it by commit(): the target may be
    the input itself (opening it for writing first would empty it before a line is read), and an
    interrupted or failed run leaves the previous file intact. /dev/stdout or a FIFO is written
    directly."""

    def __init__(self, path: str):
        special = os.path.exists(path) and not os.path.isfile(path)
        self.path = path
        self.tmp = None if special else os.path.join(os.path.dirname(os.path.abspath(path)),
                                                     f".{os.path.basename(path)}.tmp-{os.getpid()}")
        self.f = open(self.tmp or path, "w", encoding="utf-8")

    def commit(self) -> None:
        self.f.close()
        if self.tmp is not None:
            os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.f.close()
        if self.tmp is not None and os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _default_rejected(output: str):
    if output == "-" or (os.path.exists(output) and not os.path.isfile(output)):
        return None
    return (output[:-len(".jsonl")] if output.endswith(".jsonl") else output) + ".rejected.jsonl"


def _fail(msg: str) -> int:
    print(f"megammr score: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    try:
        cfg = load_recipe(args.recipe, args.override).reward if (args.recipe or args.override) else RewardConfig()
    except RecipeError as e:
        for line in e.errors:
            print(f"megammr score: {line}", file=sys.stderr)
        return 2
    if args.input != "-":
        if os.path.isdir(args.input):
            return _fail(f"--input {args.input} is a directory: a JSONL file (or '-' for stdin) is expected")
        if not os.path.isfile(args.input):
            return _fail(f"input not found: {args.input}")
    if (args.workers is not None and args.workers < 1) or (args.timeout is not None and not args.timeout > 0):
        return _fail("--workers must be >= 1 and --timeout > 0")
    rejected_path = args.rejected or _default_rejected(args.output)
    paths = {os.path.abspath(p) for p in (args.input, args.output) if p != "-"}
    if args.rejected and os.path.abspath(args.rejected) in paths:
        return _fail(f"--rejected {args.rejected}: must differ from --input and --output")
    for flag, path in (("--output", args.output if args.output != "-" else None), ("--rejected", rejected_path)):
        if path and os.path.isdir(path):
            return _fail(f"{flag} {path} is a directory")
    try:
        out = _Staged(args.output) if args.output != "-" else None
    except OSError as e:
        return _fail(f"cannot write {args.output}: {e.strerror or e}")
    write = out.f.write if out else sys.stdout.write
    rejected = None
    n = bad = 0
    total = 0.0
    status_counts: dict[str, int] = {}
    try:
        with RewardPool(cfg, workers=args.workers, timeout_s=args.timeout) as pool:
            chunk: list = []

            def flush():
                nonlocal n, total
                for (item, obj), r in zip(chunk, pool.score([it for it, _ in chunk])):
                    obj.update(format=r.format, accuracy=r.accuracy, reward=r.reward, status=r.status)
                    n += 1
                    total += r.reward
                    status_counts[r.status] = status_counts.get(r.status, 0) + 1
                    write(json.dumps(obj, ensure_ascii=False) + "\n")
                chunk.clear()

            for lineno, raw in _lines(args.input):
                item, obj, err = _parse_line(lineno, raw)
                if err:
                    bad += 1
                    print(f"megammr score: {args.input}: {err}", file=sys.stderr)
                    if rejected_path:
                        rejected = rejected or _Staged(rejected_path)
                        rejected.f.write(json.dumps({"line": lineno, "error": err,
                                                     "text": raw.decode("utf-8", "replace")}, ensure_ascii=False) + "\n")
                    continue
                chunk.append((item, obj))
                if len(chunk) >= CHUNK:
                    flush()
            flush()
    except BaseException:
        for f in (out, rejected):
            if f is not None:
                f.discard()
        raise
    where = f" (written to {rejected_path})" if rejected else ""
    if rejected:
        rejected.commit()
    if n == 0:
        if out is not None:
            out.discard()  # nothing scored: the previous output (perhaps the input itself) is kept
        what = f"all {bad} line(s) are malformed{where}" if bad else "it holds no lines"
        return _fail(f"nothing scored: {'stdin' if args.input == '-' else args.input}: {what}")
    if out is not None:
        out.commit()
    if not rejected and args.rejected is None and rejected_path and os.path.isfile(rejected_path):
        os.unlink(rejected_path)  # a previous run's rejects of this output: they no longer describe it
    mean = total / n
    print(f"scored {n} lines, mean reward {mean:.4f}, timeouts {status_counts.get('timeout', 0)}, "
          f"errors {status_counts.get('error', 0) + status_counts.get('crash', 0)} (verifier), "
          f"{bad} malformed line(s) skipped{where}", file=sys.stderr)
    return 0


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="megammr score")
    add_arguments(p)
    return run(p.parse_args(argv))
