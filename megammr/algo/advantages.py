"""Group-normalised advantages: every prompt's n samples form one group.

grpo    (DeepSeekMath): A_i = (r_i - mean_g) / (std_g + eps), std with Bessel's correction
        (n - 1), as verl and TRL compute it.
dr_grpo (Dr. GRPO, arXiv 2503.20783): A_i = r_i - mean_g; no division by the std, which
        over-weights groups whose rewards barely differ.
A group of one sample, or one where every reward is equal, gets advantage 0.
"""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int | None = None, group_ids: torch.Tensor | None = None,
                     kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages [N] from rewards [N].

    Groups are either consecutive runs of `group_size` samples, or given by `group_ids` [N]
    (any integers; groups may differ in size, e.g. after dropping failed samples).
    """
    if kind not in ("grpo", "dr_grpo"):
        raise ValueError(f"advantage kind must be 'grpo' or 'dr_grpo', got {kind!r}")
    r = rewards.reshape(-1).to(torch.float64)  # N is small; float64 keeps mean/std exact enough
    bad = ~torch.isfinite(r)
    if bad.any():
        # One NaN would silently turn its whole group's advantages (and the loss) into NaN.
        raise ValueError(f"{int(bad.sum())} non-finite reward(s), first at index {int(bad.nonzero()[0])}")
    if group_ids is None:
        if not group_size or r.numel() % group_size:
            raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
        group_ids = torch.arange(r.numel(), device=r.device) // group_size
    _, gid = torch.unique(group_ids.reshape(-1), return_inverse=True)
    if gid.numel() != r.numel():
        raise ValueError(f"group_ids has {gid.numel()} entries for {r.numel()} rewards")
    n_groups = int(gid.max().item()) + 1 if gid.numel() else 0
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).scatter_add_(0, gid, torch.ones_like(r))
    mean = torch.zeros_like(count).scatter_add_(0, gid, r) / count
    centred = r - mean[gid]
    if kind == "dr_grpo":
        return centred.to(rewards.dtype if rewards.is_floating_point() else torch.float32)
    sq = torch.zeros_like(count).scatter_add_(0, gid, centred * centred)
    std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(count))
    adv = centred / (std[gid] + eps)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def token_advantages(advantages: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sequence advantages [N] to packed tokens via their sequence index [T]."""
    return advantages[seq_ids.long()]
