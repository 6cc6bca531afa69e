"""A short supervised *format warm-up* of an HF Qwen2.5-VL directory (plain torch + transformers).

A random tiny model never writes `<think>...</think><answer>...</answer>`, so its reward is 0 for
every sample, every GRPO group has zero advantage and nothing is learned. Real base models
(Qwen2.5-VL-*-Instruct) follow the system prompt's format part of the time; this warm-up puts the
tiny model in the same place: a few AdamW steps of cross-entropy on demonstrations

    prompt   = megammr.data.prompts.encode_prompt(question, style="text", choices=...).input_ids
               (the exact ids the trainer's loader feeds the rollout engine)
    response = "<think> {REASONING} </think><answer> {answer} </answer><|im_end|>"

with the loss on the response tokens only. It is deliberately *partial* (few steps): sampled at
temperature 1.0 the model emits the strict format some of the time, not always, and its answers
are mostly wrong, so GRPO has something to improve on both rewards.

    format_warmup(src_dir, out_dir, "outputs/data/raw/phase1.jsonl", steps=..., lr=..., seed=0)

writes `out_dir` with save_pretrained plus the tokenizer / processor / chat template files of
`src_dir`; the result loads with Qwen2_5_VLForConditionalGeneration.from_pretrained,
megammr.models.processor.load_processor and megammr.models.mapping.HFReader. Same inputs and
seed (and thread count): identical weights. `sample_format_rate` measures what it achieved.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from megammr.config import TOOLS, RewardConfig
from megammr.data.prompts import IM_END, encode_prompt
from megammr.models.processor import load_processor
from megammr.rewards.core import RewardItem, Weights, score_item

# Fixed, short reasoning: the point is the format, not the reasoning; short keeps the whole
# demonstration (~30 tokens with the tiny byte-level BPE) well inside a 48-token rollout budget.
REASONING = "Let me solve it."

# The warm-up's defaults live in megammr/config/schema.py (TOOLS.warmup_*), tuned on the tiny backbone.
DEFAULT_STEPS, DEFAULT_LR, DEFAULT_BATCH = TOOLS.warmup_steps, TOOLS.warmup_lr, TOOLS.warmup_batch

# Everything of an HF directory except the weights (and what save_pretrained writes itself).
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


@dataclass
class WarmupResult:
    out_dir: str
    steps: int
    lr: float
    batch_size: int
    seed: int
    records: int
    first_loss: float
    last_loss: float
    seconds: float


def read_records(path: str) -> list[dict]:
    """Phase-1 JSONL records: question, answer, optional choices (text-only)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                out.append({"question": r["question"], "answer": str(r["answer"]), "choices": r.get("choices")})
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def response_text(answer: str, reasoning: str = REASONING) -> str:
    """The demonstrated response (without the end-of-turn token)."""
    return f"<think> {reasoning} </think><answer> {answer} </answer>"


def demonstration(record: dict, tokenizer, reasoning: str = REASONING) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one record; the response ends with <|im_end|>, where the
    rollout engine stops."""
    p = encode_prompt(record["question"], style="text", choices=record.get("choices"), tokenizer=tokenizer)
    resp = tokenizer(response_text(record["answer"], reasoning) + IM_END, add_special_tokens=False)["input_ids"]
    return p.input_ids.tolist(), list(resp)


def _batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids / attention_mask / labels (-100 on prompt and padding)."""
    n = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), n), dtype=torch.long)
    labels = torch.full((len(pairs), n), -100, dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        seq = torch.tensor(p + r, dtype=torch.long)
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = seq[len(p):]
    return ids, mask, labels


def _copy_side_files(src_dir: str, out_dir: str) -> None:
    """Tokenizer, processor and chat-template files of the source (save_pretrained writes only the
    model's config.json, generation_config.json and weights)."""
    for name in sorted(os.listdir(src_dir)):
        s = os.path.join(src_dir, name)
        if (not os.path.isfile(s) or name in _WEIGHT_FILES or name.endswith(".safetensors")
                or name in ("config.json", "generation_config.json")):
            continue
        shutil.copy2(s, os.path.join(out_dir, name))


def format_warmup(src_dir: str, out_dir: str, records_jsonl: str, *, steps: int = DEFAULT_STEPS,
                  lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH, seed: int = 0,
                  reasoning: str = REASONING, log=None) -> WarmupResult:
    """Supervised format warm-up of the HF model in `src_dir`; writes `out_dir` (see module doc)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if os.path.abspath(src_dir) == os.path.abspath(out_dir):
        raise ValueError("format_warmup: out_dir must differ from src_dir")
    t0 = time.perf_counter()
    tok = load_processor(src_dir).tokenizer
    records = read_records(records_jsonl)
    pairs = [demonstration(r, tok, reasoning) for r in records]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(pairs), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        ids, mask, labels = _batch([pairs[i] for i in idx], pad_id)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if log is not None and (step == 0 or (step + 1) % 10 == 0 or step + 1 == steps):
            log(f"warm-up step {step + 1}/{steps}: loss {losses[-1]:.3f}")

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # stale weights of an earlier write would shadow these
        if name in _WEIGHT_FILES or name.endswith(".safetensors"):
            os.remove(os.path.join(out_dir, name))
    model.eval()
    model.save_pretrained(out_dir)
    _copy_side_files(src_dir, out_dir)
    res = WarmupResult(out_dir=out_dir, steps=steps, lr=lr, batch_size=batch_size, seed=seed, records=len(records),
                       first_loss=losses[0] if losses else float("nan"),
                       last_loss=losses[-1] if losses else float("nan"), seconds=time.perf_counter() - t0)
    with open(os.path.join(out_dir, "format_warmup.json"), "w") as f:
        json.dump({**asdict(res), "source": os.path.abspath(src_dir), "records_jsonl": os.path.abspath(records_jsonl),
                   "reasoning": reasoning}, f, indent=2)
    return res


@torch.no_grad()
def sample_format_rate(model_dir: str, records_jsonl: str, *, max_new_tokens: int, temperature: float,
                       num_prompts: int = 32, n: int = 4, seed: int = 0,
                       records: Optional[list[dict]] = None) -> dict:
    """Sample `n` responses for each of the first `num_prompts` records (HF generate) and score
    them with the project's rewards: {"format": rate, "accuracy": rate, "samples": k}."""
    tok = load_processor(model_dir).tokenizer
    recs = (records if records is not None else read_records(records_jsonl))[:num_prompts]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else im_end
    w = Weights.from_config(RewardConfig())  # the recipe's reward, as the trainer scores it
    torch.manual_seed(seed)
    fmt = acc = k = 0
    for r in recs:
        prompt, _ = demonstration(r, tok)
        ids = torch.tensor([prompt] * n, dtype=torch.long)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=temperature, top_k=None, top_p=1.0, max_new_tokens=max_new_tokens,
                             eos_token_id=[im_end], pad_token_id=pad_id)
        for row in out[:, ids.shape[1]:].tolist():
            if im_end in row:
                row = row[:row.index(im_end)]
            text = tok.decode(row, skip_special_tokens=True)
            res = score_item(RewardItem(response=text, answer=r["answer"], choices=r.get("choices")), w)
            fmt += res.format
            acc += res.accuracy
            k += 1
    return {"format": fmt / k, "accuracy": acc / k, "samples": k}


__all__ = ["DEFAULT_BATCH", "DEFAULT_LR", "DEFAULT_STEPS", "REASONING", "WarmupResult", "demonstration",
           "format_warmup", "read_records", "response_text", "sample_format_rate"]
