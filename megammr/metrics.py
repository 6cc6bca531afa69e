"""Step metrics: one JSON line per step in OUTPUT_DIR/metrics.jsonl, TensorBoard events in
OUTPUT_DIR/tensorboard (when the optional tensorboard package is installed) and a one-line summary
on stdout.

Written by global rank 0 only; the trainer reduces the numbers over ranks before they get here.
Keys are documented in the README ("Metrics").
"""
from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsLog:
    def __init__(self, output_dir: str, enabled: bool, total_steps: int, log_interval: int = 1,
                 resume_after: int = 0):
        self.enabled, self.total, self.interval = enabled, total_steps, max(1, log_interval)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._f = self._tb = None
        self.t0 = time.perf_counter()
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            kept = []
            if resume_after and os.path.exists(self.path):
                # Resuming: keep the lines up to the checkpoint's step; later ones are rerun.
                with open(self.path, encoding="utf-8") as f:
                    kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_after]
            self._f = open(self.path, "w", encoding="utf-8")
            self._f.writelines(kept)
            self._tb = _tensorboard(os.path.join(output_dir, "tensorboard"), resume_after)

    def log(self, m: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and v is not None:
                    self._tb.add_scalar(k, v, m["step"])
            self._tb.flush()
        step = m["step"]
        if step % self.interval == 0 or step == self.total:
            print(summary(m, self.total, time.perf_counter() - self.t0), file=sys.stdout, flush=True)

    def close(self):
        if self._f:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard(log_dir: str, resume_after: int):
    """A TensorBoard writer when the optional `tensorboard` package is installed, else None.
    purge_step drops events of steps a resumed run computes again."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir, purge_step=resume_after + 1 if resume_after else None)


def summary(m: dict, total: int, elapsed: float) -> str:
    step = m["step"]
    eta = elapsed / step * (total - step) if step else 0.0
    skipped = "  SKIPPED (non-finite)" if m.get("step_skipped") else ""
    if m.get("groups/dropped"):
        skipped += f"  ({m['groups/dropped']} uniform-reward groups dropped)"
    return (f"step {step}/{total} | reward {m['reward/mean']:.3f} acc {m['reward/accuracy']:.3f} "
            f"fmt {m['reward/format']:.3f} | len {m['response/length_mean']:.1f} | loss {m['loss']:.4g} "
            f"gnorm {m['grad_norm']:.3g} kl {m['kl']:.2e} | {m['time/step']:.1f} s/step, eta {eta:.0f} s{skipped}")


def step_metrics(parts, step: int, stats, updates, t: dict, skipped_total: int) -> dict:
    """Reduce this step's numbers over all ranks with one all-reduce; every rank gets the result.

    Experience sums come from each model-parallel source rank (one per DP rank); loss sums from
    tensor rank 0 of each last pipeline stage; so each contribution is counted exactly once.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megammr.train.experience import ExperienceStats
    from megammr.train.step import SUM_KEYS

    exp_keys = [f for f in vars(ExperienceStats()) if f not in ("time_generate", "time_reward")]
    is_src = parts.experience.is_src
    owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    vec = [float(getattr(stats, k)) if is_src else 0.0 for k in exp_keys]
    for u in updates:
        vec += [u.sums[k] if owner else 0.0 for k in SUM_KEYS]
    x = torch.tensor(vec, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        x = x.to(dev)
        dist.all_reduce(x)
        x = x.cpu()
    e = dict(zip(exp_keys, x[:len(exp_keys)].tolist()))
    per_update = [dict(zip(SUM_KEYS, x[len(exp_keys) + i * len(SUM_KEYS):][:len(SUM_KEYS)].tolist()))
                  for i in range(len(updates))]
    tok = sum(u["tokens"] for u in per_update) or 1.0
    n = e["samples"] or 1.0

    def mean_over_tokens(key):
        return sum(u[key] for u in per_update) / tok

    step_time = t["sync"] - t["start"]
    return {
        "step": step,
        "reward/mean": e["reward"] / n, "reward/accuracy": e["accuracy"] / n, "reward/format": e["format"] / n,
        "response/length_mean": e["response_tokens"] / n, "response/clip_frac": e["truncated"] / n,
        "loss": sum(u["loss"] / max(u["count"], 1.0) for u in per_update) / len(per_update),
        "grad_norm": sum(u.grad_norm for u in updates) / len(updates),
        "lr": parts.optimizer.param_groups[0]["lr"],
        "kl": mean_over_tokens("kl"), "entropy": mean_over_tokens("entropy"),
        "policy/clip_frac": mean_over_tokens("clip"), "logp_diff/rollout_vs_train": mean_over_tokens("logp_diff"),
        "groups/dropped": int(e["groups_dropped"]), "groups/prompt_mismatch": int(e["prompt_mismatch"]),
        "reward/failures": int(e["reward_failures"]), "samples": int(e["samples"]),
        "samples/empty_skipped": int(e["empty_responses"]),
        "samples/vision_token_skipped": int(e["vision_token_responses"]), "rollout/extra_rounds": int(e["extra_rounds"]),
        "tokens_per_s": (e["prompt_tokens"] + e["response_tokens"]) / max(step_time, 1e-9),
        "time/rollout": stats.time_generate, "time/reward": stats.time_reward,
        "time/logprobs": t["logprobs"] - t["rollout"], "time/train": t["train"] - t["logprobs"],
        "time/sync": t["sync"] - t["train"], "time/step": step_time,
        "loss/per_update": [u["loss"] / max(u["count"], 1.0) for u in per_update],
        "grad_norm/per_update": [u.grad_norm for u in updates],
        "skipped_steps": skipped_total, "step_skipped": any(u.skipped for u in updates),
    }
