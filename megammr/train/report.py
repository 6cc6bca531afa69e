"""What one step reports: its stage times and its metrics row, reduced over all ranks.

The row's keys, in this order, are the README's ("Metrics"). megammr.metrics writes rows (JSONL,
TensorBoard, W&B, the progress line) and knows nothing of how they are computed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megammr import runtime
from megammr.config import to_dict
from megammr.train.experience import ExperienceStats
from megammr.train.step import SUM_KEYS
from megammr.train.sync import SyncTimes


@dataclass
class StageTimes:
    """time.perf_counter() when the step started and when each of its stages ended, on this rank."""
    start: float = field(default_factory=time.perf_counter)
    rollout: float = 0.0   # prompts -> rollouts -> rewards (offload and reload included)
    logprobs: float = 0.0  # micro-batches, old / reference log-probs
    train: float = 0.0     # updates and the lr schedule
    sync: float = 0.0      # weight sync into the engine

    @property
    def step_s(self) -> float:
        return self.sync - self.start


def step_metrics(parts, step: int, stats: ExperienceStats, updates, t: StageTimes, *, skipped_total: int,
                 elapsed: float, offloaded_mb: float) -> dict:
    """Reduce this step's numbers over all ranks with one all-reduce; every rank gets the result.

    Experience sums come from each model-parallel source rank (one per DP rank); loss sums from
    tensor rank 0 of each last pipeline stage; so each contribution is counted exactly once.
    Times, `elapsed` (wall seconds of the phase so far) and `offloaded_mb` are this rank's.
    """
    exp_keys = [f for f in vars(ExperienceStats()) if f not in ("time_generate", "time_reward")]
    is_src = parts.experience.is_src
    owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    vec = [float(getattr(stats, k)) if is_src else 0.0 for k in exp_keys]
    for u in updates:
        vec += [u.sums[k] if owner else 0.0 for k in SUM_KEYS]
    x = torch.tensor(vec, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.to(runtime.device())
        dist.all_reduce(x)
        x = x.cpu()
    e = dict(zip(exp_keys, x[:len(exp_keys)].tolist()))
    per_update = [dict(zip(SUM_KEYS, x[len(exp_keys) + i * len(SUM_KEYS):][:len(SUM_KEYS)].tolist()))
                  for i in range(len(updates))]
    tok = sum(u["tokens"] for u in per_update) or 1.0
    n = e["samples"] or 1.0

    def mean_over_tokens(key):
        return sum(u[key] for u in per_update) / tok

    step_time = t.step_s
    synced = parts.sync.timings if parts.sync is not None else SyncTimes()  # this rank's part of the sync
    return {
        "step": step,
        "reward/mean": e["reward"] / n, "reward/accuracy": e["accuracy"] / n, "reward/format": e["format"] / n,
        "response/length_mean": e["response_tokens"] / n, "response/clip_frac": e["truncated"] / n,
        "loss": sum(u["loss"] / max(u["count"], 1.0) for u in per_update) / len(per_update),
        "grad_norm": sum(u.grad_norm for u in updates) / len(updates),
        "lr": parts.optimizer.param_groups[0]["lr"],
        "kl": mean_over_tokens("kl"), "entropy": mean_over_tokens("entropy"),
        "policy/clip_frac": mean_over_tokens("clip"), "logp_diff/rollout_vs_train": mean_over_tokens("logp_diff"),
        "batch/pad_frac": 1.0 - sum(u["real_positions"] for u in per_update) / max(sum(u["positions"] for u in per_update), 1.0),
        "groups/dropped": int(e["groups_dropped"]), "groups/prompt_mismatch": int(e["prompt_mismatch"]),
        "reward/failures": int(e["reward_failures"]), "samples": int(e["samples"]),
        "samples/empty_skipped": int(e["empty_responses"]),
        "samples/vision_token_skipped": int(e["vision_token_responses"]), "rollout/extra_rounds": int(e["extra_rounds"]),
        "tokens_per_s": (e["prompt_tokens"] + e["response_tokens"]) / max(step_time, 1e-9),
        "time/rollout": stats.time_generate, "time/reward": stats.time_reward,
        "time/logprobs": t.logprobs - t.rollout, "time/train": t.train - t.logprobs,
        "time/sync": t.sync - t.train, "time/step": step_time,
        "time/sync_gather": synced.gather_s, "time/sync_convert": synced.convert_s,
        "time/sync_transfer": synced.transfer_s, "time/sync_load": synced.load_s,
        "loss/per_update": [u["loss"] / max(u["count"], 1.0) for u in per_update],
        "grad_norm/per_update": [u.grad_norm for u in updates],
        "skipped_steps": skipped_total, "step_skipped": any(u.skipped for u in updates),
        "time/elapsed": elapsed, "memory/offloaded_mb": offloaded_mb,
    }


def wandb_args(r) -> Optional[dict]:
    """wandb.init arguments of the phase of recipe `r`, or None when train.wandb_project is not set.
    The runs of one curriculum share a group named after its run directory."""
    if not r.train.wandb_project:
        return None
    root = os.path.basename(os.path.dirname(os.path.abspath(r.train.output_dir)))
    return {"project": r.train.wandb_project, "name": f"{root}/{r.phase.name}", "group": root, "config": to_dict(r)}
