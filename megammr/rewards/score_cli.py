"""`megammr score`: score responses in a JSONL file with the rule-based rewards.

Input lines: {"id"?, "response", "answer", "choices"?}. Each line is written back, in input
order, with "format", "accuracy", "reward" and "status" (ok | timeout | crash | error) added.
A line that is not valid JSON or lacks a field is reported on stderr with its line number and
written back as {"line": N, "error": ...} (or the object with an "error" key) without reward
fields, so every non-blank input line has exactly one output line (blank lines are skipped).
Invalid UTF-8 bytes are read as U+FFFD. A summary goes to stderr; the exit code is 0 once the
file was read, whatever the lines held.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

CHUNK = 2048  # lines scored per pool call: bounds memory on large files


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--input", required=True, help="JSONL file of {id?, response, answer, choices?} ('-' for stdin)")
    p.add_argument("--output", default="-", help="JSONL output (default: stdout)")
    p.add_argument("--recipe", default=None, help="take the reward section (weights, limits) from this recipe")
    p.add_argument("--workers", type=int, default=None, help="verifier processes (default: recipe reward.workers)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per verification (default: recipe reward.timeout_s)")
    p.add_argument("override", nargs="*", help="recipe overrides such as reward.format_weight=0.5")


def _parse_line(lineno: int, raw: bytes):
    """-> (item or None, object to write back, error message or None)."""
    from megammr.rewards import RewardItem
    text = raw.decode("utf-8", "replace")  # invalid UTF-8 bytes become U+FFFD; the line is still scored
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        msg = f"line {lineno}: invalid JSON ({e.msg} at column {e.colno})"
        return None, {"line": lineno, "error": msg}, msg
    if not isinstance(obj, dict):
        msg = f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
        return None, {"line": lineno, "error": msg}, msg
    missing = [k for k in ("response", "answer") if k not in obj or obj[k] is None]
    if missing:
        msg = f"line {lineno}: missing field {', '.join(repr(m) for m in missing)}"
        return None, dict(obj, error=msg), msg
    if not isinstance(obj["response"], str):
        msg = f"line {lineno}: field 'response' must be a string, got {type(obj['response']).__name__}"
        return None, dict(obj, error=msg), msg
    choices = obj.get("choices")
    if choices is not None and not isinstance(choices, (list, dict)):
        msg = f"line {lineno}: field 'choices' must be a list or an object"
        return None, dict(obj, error=msg), msg
    answer = obj["answer"]
    if isinstance(answer, (list, dict)):
        msg = f"line {lineno}: field 'answer' must be a string or a number"
        return None, dict(obj, error=msg), msg
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


def run(args) -> int:
    from megammr.config import RecipeError, RewardConfig, load_recipe
    from megammr.rewards import RewardPool

    try:
        cfg = load_recipe(args.recipe, args.override).reward if (args.recipe or args.override) else RewardConfig()
    except RecipeError as e:
        print(f"megammr score: {e}", file=sys.stderr)
        return 2
    import os
    if args.input != "-":
        if not os.path.isfile(args.input):
            print(f"megammr score: input not found: {args.input}", file=sys.stderr)
            return 2
    if (args.workers is not None and args.workers < 1) or (args.timeout is not None and not args.timeout > 0):
        print("megammr score: --workers must be >= 1 and --timeout > 0", file=sys.stderr)
        return 2
    tmp = None
    if args.output == "-":
        out = sys.stdout
    else:
        # Written beside the target and renamed at the end: `--output` may be the input file itself
        # (opening it for writing first would empty it before a line is read), and an interrupted
        # run leaves the previous output intact instead of a truncated one.
        if os.path.isdir(args.output):
            print(f"megammr score: --output {args.output} is a directory", file=sys.stderr)
            return 2
        special = os.path.exists(args.output) and not os.path.isfile(args.output)  # /dev/stdout, a FIFO
        if not special:
            tmp = os.path.join(os.path.dirname(os.path.abspath(args.output)),
                               f".{os.path.basename(args.output)}.tmp-{os.getpid()}")
        try:
            out = open(tmp or args.output, "w", encoding="utf-8")
        except OSError as e:
            print(f"megammr score: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
            return 2
    n = bad = 0
    total = 0.0
    status_counts: dict[str, int] = {}
    try:
        with RewardPool(cfg, workers=args.workers, timeout_s=args.timeout) as pool:
            chunk: list = []

            def flush():
                nonlocal n, total
                items = [it for it, _ in chunk if it is not None]
                results = iter(pool.score(items))
                for item, obj in chunk:
                    if item is not None:
                        r = next(results)
                        obj.update(format=r.format, accuracy=r.accuracy, reward=r.reward, status=r.status)
                        n += 1
                        total += r.reward
                        status_counts[r.status] = status_counts.get(r.status, 0) + 1
                    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                chunk.clear()

            for lineno, raw in _lines(args.input):
                item, obj, err = _parse_line(lineno, raw)
                if err:
                    bad += 1
                    print(f"megammr score: {args.input}: {err}", file=sys.stderr)
                chunk.append((item, obj))
                if len(chunk) >= CHUNK:
                    flush()
            flush()
    except BaseException:
        if out is not sys.stdout:
            out.close()
        if tmp is not None:
            os.unlink(tmp)
        raise
    if out is not sys.stdout:
        out.close()
    if tmp is not None:
        os.replace(tmp, args.output)
    mean = total / n if n else 0.0
    print(f"scored {n} lines, mean reward {mean:.4f}, timeouts {status_counts.get('timeout', 0)}, "
          f"errors {status_counts.get('error', 0) + status_counts.get('crash', 0)} (verifier), "
          f"{bad} malformed line(s) skipped", file=sys.stderr)
    return 0


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="megammr score")
    add_arguments(p)
    return run(p.parse_args(argv))
