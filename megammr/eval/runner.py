"""Generate with a rollout engine, score with the reward verifier, write samples and a summary.

Prompts use phase 3's style (the image and the question, no caption; text-only items use the
text style) with the <think>/<answer> system prompt of megammr.data.prompts, so a model is
evaluated the way it was trained last. Scoring uses the same verifier as training (in its
worker pool, under its time limit), with each benchmark's conventions carried by the sample:
option lists for multiple choice (gold given as a letter or as the option text), MathVista's
decimal precision, OlympiadBench's several final answers joined in order.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections import defaultdict
from dataclasses import replace
from typing import Optional, Sequence

from PIL import Image
from tqdm import tqdm

from megammr.config import TOOLS, RewardConfig, RolloutConfig
from megammr.eval.readers import PAPER, EvalSample
from megammr.rewards import RewardItem, RewardPool
from megammr.rollout import RolloutPrompt, SamplingParams

# lazy in this module: megammr.data.prompts, which imports torch; `megammr eval --help` and the
# checks of the model and data files import this module and must not pay for it.

log = logging.getLogger(__name__)


def _open_image(src):
    img = Image.open(io.BytesIO(src)) if isinstance(src, bytes) else Image.open(src)
    img.load()
    return img.convert("RGB")


def build_prompt(sample: EvalSample, images: list, system_prompt: Optional[str] = None):
    """Phase-3 style prompt of one sample (megammr.data.prompts is the single source of the
    chat format and the system prompt)."""
    from megammr.data.prompts import build_messages, render_chat
    style = "image" if images else "text"
    msgs = build_messages(sample.question, style=style, choices=sample.choices, system_prompt=system_prompt,
                          images=images or None)
    return RolloutPrompt(render_chat(msgs), images)


def evaluate(engine, samples: Sequence[EvalSample], bench: str, *, out_dir: str, sampling=None,
             reward_cfg=None, batch_size: int = TOOLS.eval_batch_size, system_prompt: Optional[str] = None,
             progress: bool = False) -> dict:
    """Generate, score and write OUT/<bench>_samples.jsonl and the summary; `progress`: a bar on stderr."""
    # Evaluation reads the answer even when the <answer> tags are missing; the format rate is
    # reported separately.
    reward_cfg = replace(reward_cfg or RewardConfig(), require_answer_tag=False)
    sampling = sampling or SamplingParams.from_config(RolloutConfig(), temperature=0.0)
    os.makedirs(out_dir, exist_ok=True)
    samples_path = os.path.join(out_dir, f"{bench}_samples.jsonl")
    skipped: list[dict] = []
    ready: list[tuple[EvalSample, object]] = []
    for s in samples:
        try:
            ready.append((s, build_prompt(s, [_open_image(i) for i in s.images], system_prompt)))
        except (OSError, ValueError) as e:
            where = s.images[0] if s.images and isinstance(s.images[0], str) else "embedded image"
            log.warning("%s: sample %s skipped: cannot read image %s (%s)", bench, s.id, where, e)
            skipped.append({"id": s.id, "reason": f"image {where}: {e}"})

    groups: dict[str, list[int]] = defaultdict(list)
    n_correct = n_format = 0
    bar = tqdm(total=len(ready), desc=f"eval {bench}", unit="sample", file=sys.stderr, dynamic_ncols=True,
               disable=not progress)
    with RewardPool(reward_cfg) as pool, open(samples_path, "w", encoding="utf-8") as out, bar:
        for start in range(0, len(ready), batch_size):
            chunk = ready[start:start + batch_size]
            rollouts = engine.generate([p for _, p in chunk], 1, sampling)
            items = [RewardItem(r.text, s.answer, s.choices, s.precision) for (s, _), r in zip(chunk, rollouts)]
            for (s, _), r, res in zip(chunk, rollouts, pool.score(items)):
                correct = int(res.accuracy > 0)
                n_correct += correct
                n_format += int(res.format > 0)
                groups[s.subset or "all"].append(correct)
                out.write(json.dumps({
                    "id": s.id, "subset": s.subset, "question": s.question, "answer": s.answer,
                    "choices": s.choices, "response": r.text, "extracted": res.extracted, "correct": bool(correct),
                    "format": res.format, "status": res.status, "finish_reason": r.finish_reason,
                    "response_tokens": len(r.token_ids), "meta": s.meta}, ensure_ascii=False) + "\n")
            bar.update(len(chunk))
            bar.set_postfix(correct=n_correct, refresh=False)
    n = len(ready)
    split, paper = PAPER[bench]
    summary = {
        "bench": bench, "split": split, "n": n, "skipped": len(skipped),
        "accuracy": round(100.0 * n_correct / n, 2) if n else 0.0,
        "format_rate": round(100.0 * n_format / n, 2) if n else 0.0,
        "paper_infi_mmr_3b": paper,
        "subsets": {k: {"n": len(v), "accuracy": round(100.0 * sum(v) / len(v), 2)} for k, v in sorted(groups.items())},
        "skipped_samples": skipped, "samples_file": samples_path,
    }
    with open(os.path.join(out_dir, f"{bench}_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, f"{bench}_summary.md"), "w", encoding="utf-8") as f:
        f.write(format_table(summary) + "\n")
    return summary


def format_table(summary: dict, markdown: bool = True) -> str:
    """Overall and per-subset accuracy, ours beside the paper's Infi-MMR-3B figure (the paper
    reports overall numbers only): a Markdown table for the .md file, or (markdown=False)
    columns aligned with spaces for a terminal."""
    name = f"{summary['bench']} {summary['split']}".strip()
    head = ["benchmark / subset", "n", "ours (%)", "Infi-MMR-3B paper (%)"]
    rows = [[f"**{name}** (overall)" if markdown else f"{name} (overall)", str(summary["n"]),
             f"{summary['accuracy']:.2f}", f"{summary['paper_infi_mmr_3b']:.2f}"]]
    for k, v in summary["subsets"].items():
        rows.append([f"&nbsp;&nbsp;{k}" if markdown else f"  {k}", str(v["n"]), f"{v['accuracy']:.2f}", "-"])
    tail = f"format rate {summary['format_rate']:.2f}%; {summary['skipped']} sample(s) skipped"
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|"] + ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n\n" + tail
    width = [max(len(r[i]) for r in [head] + rows) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(width[0]) if i == 0 else c.rjust(width[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in width)] + [fmt(r) for r in rows] + [tail])
