"""The rollout-engine protocol: `generate(prompts, n, sampling) -> rollouts`, plain dataclasses.

Engines (transformers on CPU here; vLLM on GPU with the trainer) take rendered chat prompts
(one <|image_pad|> per image, as megammr.data.prompts renders them) plus PIL images, and return
one Rollout per (prompt, sample) in prompt-major order: rollouts[i * n + j] is sample j of
prompt i. Token ids and per-token log-probs come back with the text because the trainer needs
them (old-policy log-probs, truncated importance sampling against the engine).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable


@dataclass
class SamplingParams:
    temperature: float            # 0 means greedy decoding
    top_p: float
    top_k: int                    # -1 disables
    max_new_tokens: int
    seed: Optional[int] = None    # seeds the engine's own sampler for this call when set (the
                                  # global torch RNG is left alone); same seed -> same rollouts

    @classmethod
    def from_config(cls, cfg, seed: Optional[int] = None, **overrides) -> "SamplingParams":
        """From a recipe's RolloutConfig (the only place sampling defaults live)."""
        kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                  max_new_tokens=cfg.max_new_tokens, seed=seed)
        kw.update(overrides)
        return cls(**kw)


@dataclass
class RolloutPrompt:
    """What an engine needs of a prompt. megammr.data.prompts.Prompt has the same two fields and
    can be passed directly."""
    text: str                                        # rendered chat ending in the assistant header
    images: list = field(default_factory=list)       # PIL images, in placeholder order


@dataclass
class Rollout:
    """One sampled response of one prompt.

    `logprobs` are what the trainer recomputes for the old policy: log softmax(raw logits / T)
    over the full vocabulary at the sampling temperature T (T = 1 for greedy). top-k/top-p only
    restrict which tokens can be drawn; they are not applied to the reported log-probs, so a
    sampled token's log-prob is that of the untruncated tempered distribution.
    """
    prompt_index: int
    sample_index: int
    text: str                     # the response, special tokens removed
    token_ids: list[int]          # response tokens, the stop token included when generation stopped
    logprobs: list[float]         # log softmax(logits / T)[token] at the sampling temperature T
                                  # (T = 1 when greedy), over the full vocabulary: top-k/top-p are
                                  # NOT applied (the trainer recomputes exactly this); one per token
    finish_reason: str            # "stop" (an end-of-turn token) or "length" (max_new_tokens reached)
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)  # image pads expanded


@runtime_checkable
class RolloutEngine(Protocol):
    """`generate` is the protocol. The trainer also calls these when an engine has them:

    update_weights(named) -> int      one bucket of (HF checkpoint name, full tensor) pairs
    begin_weight_update() / finish_weight_update()
                                      around a sync's buckets (vLLM: wake the weights; afterwards
                                      post-process, check every parameter was written, reset caches)
    collective = True                 every rank of the engine's model-parallel group holds an
                                      engine: the source calls generate, the others call
                                      follow_rollouts() until the source calls finish_rollouts()
    finish_rollouts()                 on the source after a step's generate calls (vLLM: release
                                      the followers, sleep until the next sync)
    """

    def generate(self, prompts: Sequence[Any], n: int, sampling: SamplingParams) -> list[Rollout]:
        ...
