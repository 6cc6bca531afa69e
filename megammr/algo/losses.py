"""The policy losses, as plain torch functions of per-token vectors (autograd does the backward).

Every loss takes the same inputs: the current policy's log-probs `logp` (with gradient), the old
policy's `old_logp`, the advantages, the loss mask and the recipe's AlgoConfig, plus optional
reference log-probs (KL penalty), rollout-engine log-probs (truncated importance sampling) and
entropies. All tensors share logp's shape ([B, S] padded, or flat [T] / [1, T] packed with
`seq_ids` naming each token's sequence). They return (scalar loss, metrics) where metrics =
{clip_frac, kl[, entropy]} over unmasked tokens, detached.

Aggregation (`algo.loss_agg`) is a per-token weight w_t with loss = sum_t w_t l_t
(megammr.kernels.aggregation_weights): token_mean divides by the batch's tokens, seq_mean by
each sequence's tokens and the number of sequences. `normalizer` replaces the batch count when
gradient accumulation spreads one batch over micro-batches.

    grpo  per token, r_t = exp(logp_t - old_t):
          l_t = max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high)) * tis_t + kl_coef kl_t - entropy_coef H_t
          (clip-higher when clip_high > clip_low; Dr. GRPO is algo.advantage=dr_grpo)
    gspo  per sequence i (arXiv 2507.18071), s_i = exp(mean_t (logp_t - old_t)) over i's tokens:
          l_i = max(-A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high)) * tis_i, every token of i
          carrying l_i, plus the same per-token KL and entropy terms; needs loss_agg=seq_mean so
          that each sequence counts once.

`grpo` also has a fused implementation (megammr.kernels.grpo_loss: one elementwise kernel that
writes the gradient in the forward); megammr.algo.policy_loss uses it, and the tests hold it
equal to the function here.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megammr.kernels import aggregation_weights, grpo_loss

KL_ESTIMATORS = ("k1", "k2", "k3")


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float):
    """PPO's pessimistic surrogate -min(A r, A clip(r)) and whether the clipped side was taken."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), unclipped < clipped


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3)."""
    delta = ref_logp - logp  # log(pi_ref / pi)
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta * delta
    if estimator == "k3":
        return torch.exp(delta) - 1.0 - delta
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def truncated_is(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi_old / pi_rollout, cap): corrects for the rollout engine's numerics (no gradient)."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def sequence_index(mask: torch.Tensor, seq_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Flat [T] sequence index of every token: the row of [B, S] tensors, else `seq_ids`."""
    if seq_ids is None:
        if mask.dim() != 2:
            raise ValueError("flat [T] tokens need seq_ids (the sequence index of each token)")
        return torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask).reshape(-1)
    if seq_ids.numel() != mask.numel():
        raise ValueError(f"seq_ids {tuple(seq_ids.shape)} do not match mask {tuple(mask.shape)}")
    return seq_ids.reshape(-1).long()


def _check(logp, old_logp, advantages, mask, algo, ref_logp, rollout_logp, entropy):
    """Inputs as flat float [T] vectors (advantages [B] broadcast over [B, S]), or a clear error."""
    if algo.tis_cap is not None and rollout_logp is None:
        raise ValueError("tis_cap is set but rollout_logp (the rollout engine's log-probs) was not given")
    if algo.kl_coef != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp (the reference policy's log-probs)")
    shape = logp.shape
    if advantages.shape != shape:
        if advantages.dim() == 1 and logp.dim() == 2 and advantages.shape[0] == shape[0]:
            advantages = advantages[:, None].expand(shape)
        else:
            raise ValueError(f"advantages {tuple(advantages.shape)} do not match logp {tuple(shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp),
                    ("rollout_logp", rollout_logp), ("entropy", entropy)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} {tuple(t.shape)} does not match logp {tuple(shape)}")

    def flat(t, grad=False):
        if t is None:
            return None
        t = t.reshape(-1)
        t = t if t.is_floating_point() else t.float()
        return t if grad else t.detach()
    return flat(logp, True), flat(old_logp), flat(advantages), flat(ref_logp), flat(rollout_logp), flat(entropy, True)


def _token_terms(logp, ref_logp, entropy, algo):
    """kl_coef * kl - entropy_coef * H per token, and kl itself (zeros without a reference)."""
    kl = kl_penalty(logp, ref_logp, algo.kl_estimator) if algo.kl_coef != 0.0 else torch.zeros_like(logp)
    extra = algo.kl_coef * kl
    if entropy is not None and algo.entropy_coef != 0.0:
        extra = extra - algo.entropy_coef * entropy
    return extra, kl


def _metrics(mask, clipped, kl, entropy):
    with torch.no_grad():
        f = mask.reshape(-1).float()
        n = f.sum().clamp(min=1.0)
        out = {"clip_frac": (clipped.float() * f).sum() / n, "kl": (kl.detach() * f).sum() / n}
        if entropy is not None:
            out["entropy"] = (entropy.detach() * f).sum() / n
    return out


def grpo(logp, old_logp, advantages, mask, algo, *, ref_logp=None, rollout_logp=None, entropy=None,
         seq_ids=None, normalizer=None):
    """Token-level clipped-ratio loss (GRPO / PPO / DAPO's clip-higher); see the module docstring."""
    lp, old, adv, ref, roll, ent = _check(logp, old_logp, advantages, mask, algo, ref_logp, rollout_logp, entropy)
    pg, clipped = clipped_surrogate(torch.exp(lp - old), adv, algo.clip_low, algo.clip_high)
    if algo.tis_cap is not None:
        pg = pg * truncated_is(old, roll, algo.tis_cap)
    extra, kl = _token_terms(lp, ref, ent, algo)
    w = aggregation_weights(mask, algo.loss_agg, seq_ids, normalizer, dtype=lp.dtype)
    return ((pg + extra) * w).sum(), _metrics(mask, clipped, kl, ent)


def gspo(logp, old_logp, advantages, mask, algo, *, ref_logp=None, rollout_logp=None, entropy=None,
         seq_ids=None, normalizer=None):
    """Sequence-level clipped-ratio loss (GSPO); see the module docstring."""
    if algo.loss_agg != "seq_mean":
        raise ValueError("policy_loss=gspo is a per-sequence objective: it needs loss_agg=seq_mean")
    lp, old, adv, ref, roll, ent = _check(logp, old_logp, advantages, mask, algo, ref_logp, rollout_logp, entropy)
    f = mask.reshape(-1).to(lp.dtype)
    seq = sequence_index(mask, seq_ids).to(lp.device)
    n_seq = int(seq.max().item()) + 1 if seq.numel() else 0

    def seq_mean(x):  # mean of x over each sequence's unmasked tokens, [n_seq]
        v = x * f
        total = torch.zeros(n_seq, dtype=v.dtype, device=v.device).index_add(0, seq, v)
        count = torch.zeros(n_seq, dtype=f.dtype, device=f.device).index_add(0, seq, f)
        return total / count.clamp(min=1.0)

    # A sequence's advantage is its tokens' (they all carry the same one); a sequence without
    # loss tokens gets weight 0 from the aggregation below, so its 0/1 stand-ins do not matter.
    log_s = seq_mean(lp - old)
    pg, clipped = clipped_surrogate(torch.exp(log_s), seq_mean(adv), algo.clip_low, algo.clip_high)
    if algo.tis_cap is not None:
        pg = pg * torch.exp(seq_mean(old - roll)).clamp(max=algo.tis_cap).detach()
    extra, kl = _token_terms(lp, ref, ent, algo)
    w = aggregation_weights(mask, "seq_mean", seq_ids, normalizer, dtype=lp.dtype)
    return ((pg[seq] + extra) * w).sum(), _metrics(mask, clipped[seq], kl, ent)


def fused_grpo(logp, old_logp, advantages, mask, algo, *, ref_logp=None, rollout_logp=None, entropy=None,
               seq_ids=None, normalizer=None, backend="auto"):
    """`grpo` through megammr.kernels.grpo_loss (Triton on CUDA): same value and gradient, less memory."""
    return grpo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp if algo.kl_coef else None,
                     rollout_logp=rollout_logp, entropy=entropy, clip_low=algo.clip_low, clip_high=algo.clip_high,
                     kl_coef=algo.kl_coef, kl_estimator=algo.kl_estimator, tis_cap=algo.tis_cap,
                     entropy_coef=algo.entropy_coef, loss_agg=algo.loss_agg, seq_ids=seq_ids, normalizer=normalizer,
                     backend=backend)


# algo.policy_loss -> the loss; and the fused twin megammr.algo.policy_loss prefers where one exists.
POLICY_LOSSES: dict[str, Callable] = {"grpo": grpo, "gspo": gspo}
FUSED: dict[str, Callable] = {"grpo": fused_grpo}
