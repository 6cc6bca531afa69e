"""Rollouts with transformers' `generate`: the CPU engine (tests, debugging, small evals).

Batched: prompts are repeated n times and run through `generate` in batches of
`max_batch_sequences` with left padding. Images go through the checkpoint's own processor
(Qwen2_5_VLProcessor), which expands each <|image_pad|> to the image's patch count, resized
within the recipe's min_pixels/max_pixels so the prompt tokens equal what the trainer builds
(megammr.data.prompts.encode_prompt). Samples are repeated explicitly instead of
`num_return_sequences` so that pixel inputs are never expanded by generic code that does not know
Qwen's flattened patch layout.

Sampling is done by this module, not by `generate`'s multinomial: a logits processor applies
temperature, top-k and top-p, adds Gumbel noise drawn from one generator per (prompt, sample),
and `generate` takes the argmax (Gumbel-max trick = a draw from the warped distribution). So the
global torch RNG is never touched when a seed is given, and a sample's tokens do not depend on
which other sequences share its batch (up to float rounding of padded batches).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from megammr.models.mapping import normalize_hf_name
from megammr.models.processor import load_processor
from megammr.rollout.base import Rollout, RolloutEngine, SamplingParams

# lazy in this module: transformers (~0.5 s of imports), when an engine is made. The registry
# imports this module to resolve rollout.engine=auto while `megammr train` checks a recipe.


class _GumbelSampler:
    """generate() logits processor: warp the raw logits like HF sampling (temperature, top-k,
    top-p, in that order), then add per-row Gumbel noise. Returns a new tensor: generate() keeps
    the raw logits it passed in (output_logits), from which log-probs are computed."""

    def __init__(self, sampling: SamplingParams, generators: list[torch.Generator]):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_k > 0:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for w in self.warpers:
            scores = w(input_ids, scores)
        # One draw of the vocabulary per row and step from that row's own generator.
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device, dtype=torch.float32)
                         for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        return scores.float() + gumbel


def _row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    # SeedSequence mixes the three ints into well-separated streams (seed+i would overlap).
    return int(np.random.SeedSequence([seed % 2**64, prompt_index, sample_index]).generate_state(2, np.uint64)[0] >> 1)


class TransformersEngine(RolloutEngine):
    """Not collective (the model-parallel source rank holds it, built after the model); it has no
    rollout.* settings of its own (the registry refuses other engines' ones) and runs anywhere."""

    label = "transformers"
    caveat = "slow"  # said when rollout.engine=auto falls back to it on a GPU machine

    def __init__(self, model, processor, *, max_batch_sequences: int, device: str = "cpu",
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
        """max_batch_sequences: sequences per generate() call (a recipe's rollout.max_batch_sequences)."""
        self.model = model.to(device).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.device = torch.device(device)
        self.max_batch_sequences = max(1, int(max_batch_sequences))
        # Image size limits of the recipe (data.min_pixels/max_pixels); None keeps the processor's
        # own (preprocessor_config.json), which differ from the recipe defaults.
        self.image_kwargs: dict[str, Any] = {}
        if min_pixels is not None or max_pixels is not None:
            # transformers 5's Qwen2-VL image processor takes the limits as `size`
            # (shortest_edge = min pixels, longest_edge = max pixels); min_pixels=/max_pixels= call
            # kwargs are deprecated.
            size = dict(getattr(getattr(processor, "image_processor", None), "size", None) or {})
            if min_pixels is not None:
                size["shortest_edge"] = int(min_pixels)
            if max_pixels is not None:
                size["longest_edge"] = int(max_pixels)
            self.image_kwargs["size"] = {k: size[k] for k in ("shortest_edge", "longest_edge")}
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = sorted({int(t) for t in eos} | ({int(im_end)} if isinstance(im_end, int) and im_end >= 0 else set()))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        # Checkpoint name (model.layers.N.*, visual.*, ...) -> in-memory parameter. named_parameters
        # lists a tied lm_head once, as the embedding, so with tied embeddings lm_head.weight is not
        # expected: loading model.embed_tokens.weight updates both (they share storage).
        self._params = {normalize_hf_name(n): p for n, p in self.model.named_parameters()}

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, **kw):
        from transformers import Qwen2_5_VLForConditionalGeneration
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
        return cls(model, load_processor(path), device=device, **kw)

    @classmethod
    def build(cls, recipe, rt, *, group, leader: int, is_leader: bool) -> "TransformersEngine":
        """The trainer's engine, on its device, in the training precision (FP8 training keeps bf16 weights)."""
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[recipe.model.precision]
        return cls.from_pretrained(recipe.model.hf_path, device=str(rt.device), dtype=dtype,
                                   max_batch_sequences=recipe.rollout.max_batch_sequences,
                                   min_pixels=recipe.data.min_pixels, max_pixels=recipe.data.max_pixels)

    # ------------------------------------------------------------------ weight sync
    def weight_names(self) -> set[str]:
        """Checkpoint names update_weights expects: a full sync covers exactly these."""
        return set(self._params)

    @torch.no_grad()
    def update_weights(self, named_tensors) -> int:
        """Copy (name, tensor) pairs into the model in place (weight sync from the trainer) and
        return how many were loaded. Names are HF checkpoint names (as iter_hf_from_global yields
        them) or transformers-5 in-memory names (model.language_model.*, model.visual.*)."""
        count = 0
        for name, t in named_tensors:
            p = self._params.get(normalize_hf_name(name))
            if p is None:
                hint = (" (lm_head.weight is tied to model.embed_tokens.weight; sync that)"
                        if normalize_hf_name(name) == "lm_head.weight" else "")
                raise KeyError(f"update_weights: no parameter named {name!r} in the rollout model{hint}")
            if tuple(t.shape) != tuple(p.shape):  # copy_ would broadcast silently
                raise ValueError(f"update_weights: {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(p.device, p.dtype))
            count += 1
        return count

    # ------------------------------------------------------------------ generation
    def _encode(self, texts: list[str], images: list[list]) -> dict:
        flat = [im for ims in images for im in ims]
        self.tokenizer.padding_side = "left"  # generation appends on the right
        kw: dict[str, Any] = dict(text=texts, padding=True, return_tensors="pt")
        if flat:
            kw.update(images=flat, **self.image_kwargs)
        if hasattr(self.processor, "image_processor"):
            enc = self.processor(**kw)
        else:
            enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in enc.items()}

    @torch.no_grad()
    def generate(self, prompts: Sequence[Any], n: int, sampling: SamplingParams) -> list[Rollout]:
        """Rollouts in prompt-major order. With sampling.seed, sample j of prompt i is a function of
        (seed, i, j) and the weights alone (not of batching or the global RNG, which is left
        untouched); without one, a base seed is drawn from torch's global RNG (torch.manual_seed
        makes a run reproducible, as before)."""
        if n < 1:
            raise ValueError("n must be >= 1")
        seed = sampling.seed
        if seed is None and sampling.temperature > 0:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        out: list[Rollout] = []
        for start in range(0, len(jobs), self.max_batch_sequences):
            batch = jobs[start:start + self.max_batch_sequences]
            texts = [prompts[i].text for i, _ in batch]
            images = [list(getattr(prompts[i], "images", None) or []) for i, _ in batch]
            out.extend(self._generate_batch(batch, texts, images, sampling, seed))
        return out

    def _generate_batch(self, batch, texts, images, sampling: SamplingParams, seed) -> list[Rollout]:
        enc = self._encode(texts, images)
        greedy = sampling.temperature <= 0
        # Always argmax decoding: sampling happens in _GumbelSampler. Explicit neutral values keep
        # the checkpoint's generation_config (Qwen ships repetition_penalty=1.05, top_k=1, ...)
        # from changing the distribution the trainer recomputes.
        gen_kw = dict(max_new_tokens=sampling.max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0,
                      top_k=None, repetition_penalty=1.0, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                      return_dict_in_generate=True, output_logits=True)
        if not greedy:
            gens = [torch.Generator(self.device).manual_seed(_row_seed(seed, i, j)) for i, j in batch]
            gen_kw["logits_processor"] = [_GumbelSampler(sampling, gens)]
        res = self.model.generate(**enc, **gen_kw)
        prompt_len = enc["input_ids"].shape[1]
        new = res.sequences[:, prompt_len:]
        # output_logits are the raw logits (before any processor). The trainer recomputes
        # log softmax(logits / T) over the full vocabulary (no top-k/top-p); greedy counts as T=1.
        temp = 1.0 if greedy else float(sampling.temperature)
        logits = torch.stack(res.logits, dim=1).float() if res.logits else torch.zeros(new.shape[0], 0, 1)
        logp = torch.log_softmax(logits / temp, dim=-1)
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
