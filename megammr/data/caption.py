"""Add a caption to each image record with a captioning VLM (phase-2 data preparation).

The model is driven through the rollout-engine protocol (megammr.rollout: `generate(prompts, n,
sampling) -> rollouts`), so the transformers engine works now and vLLM will when it lands.

Resumable: the output JSONL is appended to and fsync'ed after every batch, and a rerun skips
every id already in it (a torn last line from a kill is cut off first). Records that already
carry a caption are copied as they are unless `recaption` is set.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from tqdm import tqdm

from megammr.config import TOOLS
from megammr.data.images import decode_image
from megammr.data.prompts import DEFAULT_QWEN_SYSTEM, build_messages, render_chat
from megammr.data.schema import RecordError, count_rows, is_plain_json, read_rows, validate

CAPTION_INSTRUCTION = (
    "Describe this image in detail for someone who cannot see it: every object, shape, number, label, "
    "axis, length and angle, and how they relate. Do not answer or solve any question about it."
)


@dataclass
class CaptionSummary:
    read: int = 0
    captioned: int = 0
    already_done: int = 0        # ids found in the output from an earlier run
    kept_caption: int = 0        # input already had a caption
    skipped: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0

    def text(self) -> str:
        s = (f"read {self.read}: captioned {self.captioned}, already in output {self.already_done}, "
             f"kept existing caption {self.kept_caption} ({self.seconds:.1f}s)")
        if self.skipped:
            s += "\nskipped: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return s


def _done_ids(out: str) -> set[str]:
    """Ids already written; cut a torn final line (the run was killed mid-write)."""
    if not os.path.exists(out):
        return set()
    ids, good_end = set(), 0
    with open(out, "rb") as f:
        data = f.read()
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("torn line")
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError):
            break
        good_end += len(line)
    if good_end < len(data):
        with open(out, "r+b") as f:
            f.truncate(good_end)
    return ids


def caption_file(input_path: str, out: str, engine, *, sampling, batch_size: int = TOOLS.caption_batch_size,
                 recaption: bool = False,
                 skip_invalid: bool = False, instruction: str = CAPTION_INSTRUCTION, progress: bool = True,
                 max_image_pixels: Optional[int] = None) -> CaptionSummary:
    """Caption every record of `input_path` into `out` (JSONL, same records plus `caption`)."""
    t0 = time.time()
    s = CaptionSummary()
    done = _done_ids(out)
    in_dir = os.path.dirname(os.path.abspath(input_path))
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    bar = None
    if progress:
        bar = tqdm(total=count_rows(input_path), desc="caption", unit="rec", file=sys.stderr, dynamic_ncols=True)
    pending: list[tuple[dict, list]] = []
    kw = {} if max_image_pixels is None else {"max_image_pixels": max_image_pixels}

    with open(out, "a", encoding="utf-8") as fh:
        def write(rec: dict):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

        def flush():
            if not pending:
                return
            prompts = []
            for _, images in pending:
                msgs = build_messages(instruction, style="image", num_images=len(images),
                                      system_prompt=DEFAULT_QWEN_SYSTEM)
                prompts.append(_CaptionPrompt(render_chat(msgs), images))
            rollouts = engine.generate(prompts, 1, sampling)
            texts = {r.prompt_index: r.text for r in rollouts}
            for i, (rec, _) in enumerate(pending):
                cap = (texts.get(i) or "").strip()
                if not cap:
                    s.skipped["empty_caption"] += 1  # left out: a rerun tries it again
                    continue
                rec["caption"] = cap
                write(rec)
                s.captioned += 1
            fh.flush()
            os.fsync(fh.fileno())
            pending.clear()

        for row in read_rows(input_path):
            s.read += 1
            if bar is not None:
                bar.update(1)
            try:
                rec = validate(row, 3, **kw)  # phase 3 rules: at least one readable image
            except RecordError as e:
                if not skip_invalid:
                    raise
                s.skipped[e.reason] += 1
                continue
            if rec.id in done:
                s.already_done += 1
                continue
            d = {k: v for k, v in row.data.items() if k == "images" or is_plain_json(v)}
            d["images"] = [_output_image(ref, blob, ext, rec.id, i, in_dir, out)
                           for i, (ref, blob, ext) in enumerate(zip(d.get("images") or [], rec.images, rec.image_exts))]
            if not recaption and isinstance(d.get("caption"), str) and d["caption"].strip():
                write(d)
                s.kept_caption += 1
                continue
            pending.append((d, [decode_image(b) for b in rec.images]))
            done.add(rec.id)
            if len(pending) >= batch_size:
                flush()
        flush()
    if bar is not None:
        bar.close()
    s.seconds = time.time() - t0
    return s


@dataclass
class _CaptionPrompt:
    """The two fields the rollout protocol reads (megammr.rollout.RolloutPrompt)."""
    text: str
    images: list


def _output_image(ref, blob: bytes, ext: str, rid: str, i: int, in_dir: str, out: str) -> str:
    """An image reference valid in the output JSONL: a path rebased next to the output, or, for
    parquet rows that carry the image bytes, a file written beside the output (JSON has no bytes)."""
    if isinstance(ref, dict) and not ref.get("bytes") and isinstance(ref.get("path"), str):
        ref = ref["path"]
    if isinstance(ref, str):
        return _rebase(ref, in_dir, os.path.dirname(os.path.abspath(out)))
    folder = os.path.splitext(os.path.abspath(out))[0] + "_images"
    os.makedirs(folder, exist_ok=True)
    name = f"{hashlib.sha256(rid.encode('utf-8')).hexdigest()[:16]}_{i}.{ext}"
    with open(os.path.join(folder, name), "wb") as f:
        f.write(blob)
    return os.path.relpath(os.path.join(folder, name), os.path.dirname(os.path.abspath(out)))


def _rebase(path: str, in_dir: str, out_dir: str) -> str:
    """Image paths are relative to the JSONL that names them: keep them valid next to the output."""
    if os.path.isabs(path):
        return path
    return os.path.relpath(os.path.join(in_dir, path), out_dir)
