"""Fused GRPO/PPO policy loss on per-token vectors (forward and backward): the fused twin of
megammr.algo.losses.grpo, which is the definition (tests/unit/test_algo_losses.py holds them equal).

Per token t, with ratio r = exp(logp - old_logp) and advantage A:
    pg   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))            (clip-higher when high > low)
    pg  *= min(exp(old_logp - rollout_logp), tis_cap)                      (truncated IS, optional)
    kl   = k1: logp - ref | k2: (logp - ref)^2 / 2 | k3: e^(ref - logp) - 1 - (ref - logp)
    l_t  = pg + kl_coef * kl - entropy_coef * entropy
and loss = sum_t weight_t l_t, where the weights implement the aggregation:
    token_mean: mask_t / (number of unmasked tokens, or `normalizer`)
    seq_mean:   mask_t / (unmasked tokens of t's sequence) / (number of sequences, or `normalizer`)
`normalizer` lets gradient accumulation over micro-batches divide by the whole batch's count.
The elementwise part runs in one Triton kernel on CUDA (triton_loss) or in torch elsewhere; it
writes the gradient in the forward, so the backward is one scale.
"""
from __future__ import annotations

import torch

from . import reference
from .logprobs import resolve_backend


def aggregation_weights(mask, loss_agg, seq_ids=None, normalizer=None, dtype=torch.float32):
    """Per-token weights w (flat [T], fp32 unless `dtype` says) such that loss = sum_t w_t l_t."""
    f = mask.reshape(-1).to(dtype)
    if loss_agg == "token_mean":
        denom = torch.as_tensor(normalizer, dtype=dtype, device=f.device) if normalizer is not None \
            else f.sum().clamp(min=1.0)
        return f / denom
    if loss_agg != "seq_mean":
        raise ValueError(f"loss_agg must be 'token_mean' or 'seq_mean', got {loss_agg!r}")
    if seq_ids is None:
        if mask.dim() != 2:
            raise ValueError("loss_agg='seq_mean' on flat [T] tokens needs seq_ids (sequence index of each token)")
        seq_ids = torch.arange(mask.shape[0], device=f.device)[:, None].expand_as(mask)
    seq = seq_ids.reshape(-1).long()
    if seq.shape != f.shape:
        raise ValueError(f"seq_ids {tuple(seq_ids.shape)} do not match mask {tuple(mask.shape)}")
    n_seq = int(seq.max().item()) + 1 if seq.numel() else 0
    counts = torch.zeros(n_seq, dtype=dtype, device=f.device).scatter_add_(0, seq, f)
    denom = torch.as_tensor(normalizer, dtype=dtype, device=f.device) if normalizer is not None \
        else (counts > 0).sum().clamp(min=1).to(dtype)
    return f / counts.clamp(min=1.0)[seq] / denom


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, old_logp, adv, weight, ref_logp, rollout_logp, cfg, backend):
        if backend == "triton":
            from .triton_loss import loss_terms
        else:
            loss_terms = reference.torch_loss_terms
        loss, dlogp, dent, kl, clipped = loss_terms(logp, old_logp, adv, weight, ref_logp, rollout_logp, entropy,
                                                    **cfg)
        ctx.save_for_backward(dlogp, dent)
        ctx.has_ent = dent is not None
        ctx.mark_non_differentiable(kl, clipped)
        return loss.sum(), kl, clipped

    @staticmethod
    def backward(ctx, g, _gkl, _gclip):
        dlogp, dent = ctx.saved_tensors
        return g * dlogp, (g * dent if ctx.has_ent else None), None, None, None, None, None, None, None


def grpo_loss(logp, old_logp, advantages, mask, *, clip_low, clip_high, kl_coef, kl_estimator, tis_cap,
              entropy_coef, loss_agg, ref_logp=None, rollout_logp=None, entropy=None, seq_ids=None, normalizer=None,
              backend: str | None = "auto"):
    """Scalar GRPO loss and detached metrics; see the module docstring for the formula.

    The algorithm's settings (clip bounds, KL coefficient and estimator, TIS cap or None, entropy
    coefficient, aggregation) have no defaults here: their one source is the recipe (AlgoConfig).

    logp (and entropy) carry gradients; every other input is treated as a constant. All tensors
    share logp's shape ([T] packed or [B, S] padded); advantages may also be [B] for [B, S].
    Returns (loss, metrics) with metrics = {clip_frac, kl, entropy} over unmasked tokens.
    """
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be k1, k2 or k3, got {kl_estimator!r}")
    if tis_cap is not None and rollout_logp is None:
        raise ValueError("tis_cap is set but rollout_logp (the rollout engine's log-probs) was not given")
    if kl_coef != 0.0 and ref_logp is None:
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
    backend = resolve_backend(backend, logp.device)
    weight = aggregation_weights(mask, loss_agg, seq_ids, normalizer)

    def flat(t):
        return None if t is None else t.reshape(-1).float().contiguous()

    cfg = dict(clip_low=float(clip_low), clip_high=float(clip_high), kl_coef=float(kl_coef),
               kl_estimator=kl_estimator, tis_cap=None if tis_cap is None else float(tis_cap),
               entropy_coef=float(entropy_coef))
    loss, kl, clipped = _GRPOLoss.apply(flat(logp), flat(entropy), flat(old_logp).detach(), flat(advantages).detach(),
                                        weight, flat(ref_logp), flat(rollout_logp), cfg, backend)
    with torch.no_grad():
        f = mask.reshape(-1).float()
        n = f.sum().clamp(min=1.0)
        metrics = {"clip_frac": (clipped * f).sum() / n, "kl": (kl * f).sum() / n}
        if entropy is not None:
            metrics["entropy"] = (flat(entropy) * f).sum() / n
    return loss, metrics
