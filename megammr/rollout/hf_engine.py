"""Rollouts with transformers' `generate`: the CPU engine (tests, debugging, small evals).

Batched: prompts are repeated n times and run through `generate` in batches of
`max_batch_sequences` with left padding. Images go through the checkpoint's own processor
(Qwen2_5_VLProcessor), which expands each <|image_pad|> to the image's patch count. Samples are
repeated explicitly instead of `num_return_sequences` so that pixel inputs are never expanded
by generic code that does not know Qwen's flattened patch layout.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from megammr.rollout.base import Rollout, SamplingParams


class TransformersEngine:
    def __init__(self, model, processor, *, device: str = "cpu", max_batch_sequences: int = 16):
        self.model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.device = torch.device(device)
        self.max_batch_sequences = max(1, int(max_batch_sequences))
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = sorted({int(t) for t in eos} | ({int(im_end)} if isinstance(im_end, int) and im_end >= 0 else set()))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw):
        from transformers import Qwen2_5_VLForConditionalGeneration

        from megammr.models.processor import load_processor
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
        return cls(model, load_processor(path), device=device, **kw)

    @torch.no_grad()
    def update_weights(self, named_tensors):
        """Load (HF name, tensor) pairs into the model in place (weight sync from the trainer)."""
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, t in named_tensors:
            if name not in params:
                raise KeyError(f"update_weights: no parameter named {name!r} in the rollout model")
            params[name].copy_(t.to(params[name].device, params[name].dtype))

    # ------------------------------------------------------------------ generation
    def _encode(self, texts: list[str], images: list[list]) -> dict:
        flat = [im for ims in images for im in ims]
        self.tokenizer.padding_side = "left"  # generation appends on the right
        kw: dict[str, Any] = dict(text=texts, padding=True, return_tensors="pt")
        if flat:
            kw["images"] = flat
        if hasattr(self.processor, "image_processor"):
            enc = self.processor(**kw)
        else:
            enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in enc.items()}

    @torch.no_grad()
    def generate(self, prompts: Sequence[Any], n: int, sampling: SamplingParams) -> list[Rollout]:
        if n < 1:
            raise ValueError("n must be >= 1")
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        out: list[Rollout] = []
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        for start in range(0, len(jobs), self.max_batch_sequences):
            batch = jobs[start:start + self.max_batch_sequences]
            texts = [prompts[i].text for i, _ in batch]
            images = [list(getattr(prompts[i], "images", None) or []) for i, _ in batch]
            out.extend(self._generate_batch(batch, texts, images, sampling))
        return out

    def _generate_batch(self, batch, texts, images, sampling: SamplingParams) -> list[Rollout]:
        enc = self._encode(texts, images)
        greedy = sampling.temperature <= 0
        gen_kw = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                      eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                      return_dict_in_generate=True, output_logits=True)
        if not greedy:
            gen_kw.update(temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k if sampling.top_k > 0 else 0)
        else:
            gen_kw.update(temperature=None, top_p=None, top_k=None)
        res = self.model.generate(**enc, **gen_kw)
        prompt_len = enc["input_ids"].shape[1]
        new = res.sequences[:, prompt_len:]
        # output_logits are the raw logits before temperature/top-k/top-p: the log-probs the
        # trainer recomputes for the same tokens.
        logits = torch.stack(res.logits, dim=1).float() if res.logits else torch.zeros(new.shape[0], 0, 1)
        logp = torch.log_softmax(logits, dim=-1)
        tok_logp = logp.gather(-1, new[:, :logp.shape[1]].unsqueeze(-1)).squeeze(-1) if new.numel() else logp[..., 0]
        rollouts = []
        stop = set(self.stop_ids)
        for row, (i, j) in enumerate(batch):
            ids = new[row].tolist()
            end, reason = len(ids), "length"
            for k, t in enumerate(ids):
                if t in stop:
                    end, reason = k + 1, "stop"  # keep the stop token: the policy learns to stop
                    break
            ids = ids[:end]
            mask = enc["attention_mask"][row].bool()
            prompt_ids = enc["input_ids"][row][mask].tolist()
            rollouts.append(Rollout(
                prompt_index=i, sample_index=j,
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                token_ids=ids, logprobs=[float(x) for x in tok_logp[row, :end].tolist()],
                finish_reason=reason, prompt_token_ids=prompt_ids))
        return rollouts
