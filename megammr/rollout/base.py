"""The rollout-engine interface: `RolloutEngine` (every hook the trainer calls, with no-op
defaults) and the plain dataclasses that cross it.

Engines (transformers on CPU; vLLM on GPU with the trainer) take rendered chat prompts
(one <|image_pad|> per image, as megammr.data.prompts renders them) plus PIL images, and return
one Rollout per (prompt, sample) in prompt-major order: rollouts[i * n + j] is sample j of
prompt i. Token ids and per-token log-probs come back with the text because the trainer needs
them (old-policy log-probs, truncated importance sampling against the engine).

Which engine a recipe gets, and what each refuses, is megammr.rollout.registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Optional, Sequence


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


class WeightTarget:
    """What a weight sync (megammr.train.sync.WeightSync) writes into: a rollout engine, or the HF
    export's safetensors writer. Per sync, on every rank that holds the target:
    begin_weight_update(), update_weights(bucket) for each bucket, finish_weight_update()."""

    def begin_weight_update(self) -> None:
        """Before a sync's first bucket (vLLM: wake the weights)."""

    def update_weights(self, named: Iterable[tuple[str, Any]]) -> int:
        """Load one bucket of (HF checkpoint name, full tensor) pairs; returns how many were loaded."""
        raise NotImplementedError

    def finish_weight_update(self) -> None:
        """After a sync's last bucket (vLLM: post-process, check every parameter was written,
        reset the caches that hold results of the old weights)."""


class RolloutEngine(WeightTarget):
    """A rollout engine: `generate`, the weight-sync hooks, the end-of-rollout hooks, and what the
    registry and megammr.train.setup need to know before one exists (class attributes and
    classmethods: checked and built from the recipe, never by branching on the engine's name).

    The trainer calls, per step: generate (source rank; followers run follow_rollouts), then
    finish_rollouts on the source; at every weight sync begin_weight_update / update_weights /
    finish_weight_update. An engine implements generate, update_weights and build, and overrides
    what else it needs; the other defaults do nothing.
    """

    label: ClassVar[str] = ""               # in messages: "the {label} engine", "a {label} setting"
    # Every rank of the model-parallel group holds an engine (vLLM's tensor-parallel group is
    # Megatron's): the source calls generate, the others call follow_rollouts() until the source
    # calls finish_rollouts(). Otherwise the engine lives on the group's source rank only.
    collective: ClassVar[bool] = False
    # Built before Megatron allocates the model: vLLM claims a share of the whole GPU's memory
    # (rollout.gpu_memory_utilization) when it starts, which it cannot do once the trainer holds it.
    build_before_model: ClassVar[bool] = False
    # rollout.* fields only this engine honours: another engine refuses them when set away from
    # their defaults (megammr.rollout.registry.check_engine).
    settings: ClassVar[tuple[str, ...]] = ()
    caveat: ClassVar[str] = ""              # said when rollout.engine=auto falls back to it ("slow")

    # ------------------------------------------------------------------ before an engine exists
    @classmethod
    def available(cls, cuda: bool) -> tuple[bool, str]:
        """(whether rollout.engine=auto may pick it on this machine, why not): the reason is for the
        log, "" when nothing is worth saying (no GPU for a GPU engine on a CPU machine)."""
        return True, ""

    @classmethod
    def check(cls, recipe, cuda: bool) -> list[str]:
        """What of the recipe this engine cannot honour on this machine: one line per problem."""
        return []

    @classmethod
    def warnings(cls, recipe, cuda: bool) -> list[str]:
        """What the run should be told but need not refuse (e.g. an untested library version)."""
        return []

    @classmethod
    def build(cls, recipe, rt, *, group, leader: int, is_leader: bool) -> "RolloutEngine":
        """The engine of this rank. rt: megammr.runtime's Runtime (device, launcher env); group: the
        model-parallel group, leader: the global rank of its source, is_leader: this rank is it."""
        raise NotImplementedError(f"{cls.__name__}.build")

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[Any], n: int, sampling: SamplingParams) -> list[Rollout]:
        raise NotImplementedError

    def follow_rollouts(self) -> int:
        """Collective engines, non-source ranks: run the source's generate calls until it calls
        finish_rollouts(); returns how many."""
        return 0

    def finish_rollouts(self) -> None:
        """Source rank, after a step's generate calls (vLLM: release the followers, sleep until the
        next sync)."""

    # ------------------------------------------------------------------ weight sync
    def weight_names(self) -> Optional[set[str]]:
        """The HF checkpoint names a full sync must cover, or None when the engine cannot list them
        up front (it then checks coverage itself in finish_weight_update)."""
        return None
