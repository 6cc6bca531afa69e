"""Experience of one step for one data-parallel rank: prompts -> rollouts -> rewards -> groups.

Runs on the source rank of each model-parallel group (tensor rank 0 of the first pipeline
stage), which holds the data loader, the rollout engine and the reward pool; the finished
groups are broadcast to the other ranks of the group, so every TP/PP rank trains on the same
samples and a layout change never changes the rollouts. Each data-parallel rank owns whole
groups (all n samples of a prompt): advantages need no communication.

A collective engine (`engine.collective`: vLLM, colocated) lives on every rank of the group, and
vLLM needs every rank of its tensor-parallel group to generate with the same inputs: the source
sends each generate call to the others (they run `engine.follow_rollouts()`), and the source's
`engine.finish_rollouts()` ends the step's generation (vLLM then sleeps until the next sync).

Replay: with train.save_rollouts every step's groups are written to
OUTPUT_DIR/rollouts/step_NNNNNN.dpR-of-D.pt; rollout.replay=DIR reads them back instead of
generating. Replay at another data-parallel size concatenates the step's files in rank order and
splits the groups evenly again, so a run can be replayed at any layout.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megammr import megatron_cpu
from megammr.rewards.core import RewardItem
from megammr.rollout.base import RolloutEngine, SamplingParams


@dataclass
class Group:
    """One prompt and its n responses, scored (plain data: what replay files hold)."""
    key: str                                   # data sample key (shard/sequence): where it came from
    answer: str
    prompt_ids: list[int]                      # image pads expanded
    pixel_values: Optional[torch.Tensor]       # the prompt's images, preprocessed
    image_grid_thw: Optional[torch.Tensor]
    token_ids: list[list[int]]                 # per response
    logprobs: list[list[float]]                # engine log-probs per response token
    finish_reasons: list[str]
    texts: list[str]
    rewards: list[float]                       # weighted reward (after overlong shaping)
    accuracy: list[float]
    format: list[float]
    choices: Optional[list] = None


@dataclass
class ExperienceStats:
    """Sums over this data-parallel rank's step (reduced over DP by the trainer)."""
    samples: int = 0
    reward: float = 0.0
    accuracy: float = 0.0
    format: float = 0.0
    response_tokens: int = 0
    prompt_tokens: int = 0
    truncated: int = 0            # responses stopped by max_new_tokens
    groups_dropped: int = 0       # dynamic sampling: all-equal rewards
    prompt_mismatch: int = 0      # engine's prompt ids differ from the trainer's: group skipped
    reward_failures: int = 0      # verifier timeout / crash / error (scored 0)
    empty_responses: int = 0      # zero-token responses (nothing to train on): sample skipped
    vision_token_responses: int = 0  # responses containing <|image_pad|>/<|video_pad|>: sample skipped
    extra_rounds: int = 0
    time_generate: float = 0.0    # seconds in the engine (source rank)
    time_reward: float = 0.0      # seconds in the reward pool


def sampling_seed(seed: int, step: int, dp_rank: int, round_: int = 0) -> int:
    """A sampler seed from (train.seed, step, DP rank, refill round): independent streams, no global RNG."""
    h = hashlib.sha256(f"{seed}/{step}/{dp_rank}/{round_}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO soft overlong punishment: 0 up to max - buffer, then linearly down to -penalty."""
    if buffer <= 0 or length <= max_new_tokens - buffer:
        return 0.0
    return -penalty * min(1.0, (length - (max_new_tokens - buffer)) / buffer)


def replay_path(directory: str, step: int, dp_rank: int, dp_size: int) -> str:
    return os.path.join(directory, f"step_{step:06d}.dp{dp_rank}-of-{dp_size}.pt")


def replay_steps(directory: str) -> set[int]:
    return {int(m.group(1)) for p in glob.glob(os.path.join(directory, "step_*.pt"))
            if (m := re.search(r"step_(\d+)\.dp\d+-of-\d+\.pt$", p))}


def _split(items: list, parts: int) -> list[list]:
    """`parts` contiguous chunks, sizes differing by at most one (earlier chunks larger)."""
    per, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        n = per + (i < extra)
        out.append(items[start:start + n])
        start += n
    return out


def load_replay(directory: str, step: int, dp_rank: int, dp_size: int, updates: int) -> list[list[Group]]:
    """This rank's groups of a saved step, as `updates` mini-batches.

    The step's files are concatenated in rank order (the global group order), split into the
    mini-batches of the update, and each mini-batch is split over the DP ranks: so update u trains
    on the same groups at every data-parallel size."""
    files = glob.glob(os.path.join(directory, f"step_{step:06d}.dp*-of-*.pt"))
    if not files:
        raise FileNotFoundError(f"rollout.replay: no saved rollouts for step {step} in {directory}")
    files.sort(key=lambda p: int(re.search(r"\.dp(\d+)-of-", p).group(1)))
    groups = [Group(**g) for f in files for g in torch.load(f, weights_only=False)["groups"]]
    return [_split(mb, dp_size)[dp_rank] for mb in _split(groups, updates)]


class Experience:
    """collect(step) -> (groups, stats) on every rank of a model-parallel group."""

    def __init__(self, recipe, *, engine, loader, pool, dp_rank: int, dp_size: int, mp_group, src: int,
                 is_src: bool, vision_token_ids: tuple = ()):
        if engine is not None and not isinstance(engine, RolloutEngine):
            raise TypeError(f"Experience: {type(engine).__name__} is not a megammr.rollout.base.RolloutEngine")
        self.r = recipe
        self.engine, self.loader, self.pool = engine, loader, pool
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.mp_group, self.src, self.is_src = mp_group, src, is_src
        self.prompts_per_rank = recipe.train.prompts_per_step // dp_size
        self.out_dir = os.path.join(recipe.train.output_dir, "rollouts")
        # The model replaces every <|image_pad|> embedding by an image feature: a response that
        # samples one cannot be scored as text, so the sample is dropped (and counted).
        self.vision_token_ids = set(vision_token_ids)

    def collect(self, step: int) -> tuple[list[list[Group]], ExperienceStats]:
        """This DP rank's groups as train.updates_per_step mini-batches, and the step's statistics."""
        box = [None]
        if self.is_src:
            try:
                box = [self._collect_here(step)]
            finally:
                if self.engine is not None:  # None in replay
                    self.engine.finish_rollouts()  # vLLM: release the followers, sleep until the next sync
        elif self.engine is not None and self.engine.collective and not self.r.rollout.replay:
            self.engine.follow_rollouts()  # run the source's generate calls with the same inputs
        if dist.is_initialized() and dist.get_world_size(self.mp_group) > 1:
            dist.broadcast_object_list(box, src=self.src, group=self.mp_group)
        return box[0]

    # ------------------------------------------------------------------ source rank only
    def _collect_here(self, step: int):
        stats = ExperienceStats()
        updates = self.r.train.updates_per_step
        if self.r.rollout.replay:
            minis = load_replay(self.r.rollout.replay, step, self.dp_rank, self.dp_size, updates)
            groups = [g for mb in minis for g in mb]
        else:
            groups = self._generate(step, stats)
            minis = _split(groups, updates)
            if self.r.train.save_rollouts:
                os.makedirs(self.out_dir, exist_ok=True)
                path = replay_path(self.out_dir, step, self.dp_rank, self.dp_size)
                torch.save({"step": step, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                            "groups": [asdict(g) for g in groups]}, path + ".tmp")
                os.replace(path + ".tmp", path)
        for g in groups:
            stats.samples += len(g.rewards)
            stats.reward += sum(g.rewards)
            stats.accuracy += sum(g.accuracy)
            stats.format += sum(g.format)
            stats.response_tokens += sum(len(t) for t in g.token_ids)
            stats.prompt_tokens += len(g.prompt_ids) * len(g.token_ids)
            stats.truncated += sum(f == "length" for f in g.finish_reasons)
        return minis, stats

    def _generate(self, step: int, stats: ExperienceStats) -> list[Group]:
        cfg, algo = self.r.rollout, self.r.algo
        want, kept = self.prompts_per_rank, []
        rounds = 1 + (algo.max_resample_rounds if algo.dynamic_sampling else 0)
        for round_ in range(rounds):
            need = want - len(kept)
            if need <= 0:
                break
            stats.extra_rounds += round_ > 0
            samples = self.loader.next_batch(need)
            if not samples:
                break
            sp = SamplingParams.from_config(cfg, seed=sampling_seed(self.r.train.seed, step, self.dp_rank, round_))
            t0 = time.perf_counter()
            with megatron_cpu.suspended():  # generate never calls megatron: no device mapping needed
                rollouts = self.engine.generate([s.prompt for s in samples], cfg.n, sp)
            t1 = time.perf_counter()
            groups = self._score(samples, rollouts, stats)
            stats.time_generate += t1 - t0
            stats.time_reward += time.perf_counter() - t1
            for g in groups:
                if algo.dynamic_sampling and len(set(g.rewards)) <= 1:
                    stats.groups_dropped += 1
                else:
                    kept.append(g)
        return kept[:want]

    def _score(self, samples, rollouts, stats: ExperienceStats) -> list[Group]:
        n, algo, cfg = self.r.rollout.n, self.r.algo, self.r.rollout
        results = self.pool.score([RewardItem(response=ro.text, answer=samples[ro.prompt_index].answer,
                                              choices=samples[ro.prompt_index].choices) for ro in rollouts])
        groups = []
        for i, s in enumerate(samples):
            ros, res = rollouts[i * n:(i + 1) * n], results[i * n:(i + 1) * n]
            prompt_ids = s.prompt.input_ids.tolist()
            if any(ro.prompt_token_ids and ro.prompt_token_ids != prompt_ids for ro in ros):
                stats.prompt_mismatch += 1
                continue
            stats.reward_failures += sum(r.status != "ok" for r in res)
            nonempty = [k for k, ro in enumerate(ros) if ro.token_ids]
            keep = [k for k in nonempty if not self.vision_token_ids.intersection(ros[k].token_ids)]
            stats.empty_responses += n - len(nonempty)
            stats.vision_token_responses += len(nonempty) - len(keep)
            if not keep:
                continue
            rewards = [res[k].reward + overlong_penalty(len(ros[k].token_ids), cfg.max_new_tokens,
                                                        algo.overlong_buffer, algo.overlong_penalty) for k in keep]
            groups.append(Group(
                key=s.key, answer=s.answer, choices=s.choices, prompt_ids=prompt_ids,
                pixel_values=s.prompt.pixel_values, image_grid_thw=s.prompt.image_grid_thw,
                token_ids=[ros[k].token_ids for k in keep], logprobs=[ros[k].logprobs for k in keep],
                finish_reasons=[ros[k].finish_reason for k in keep], texts=[ros[k].text for k in keep],
                rewards=rewards, accuracy=[res[k].accuracy for k in keep], format=[res[k].format for k in keep]))
        return groups


__all__ = ["Experience", "ExperienceStats", "Group", "load_replay", "overlong_penalty", "replay_path",
           "replay_steps", "sampling_seed"]
