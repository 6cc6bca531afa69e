"""Triton kernel for the elementwise part of the GRPO/PPO loss on [T] vectors.

One pass reads the token vectors once and writes the weighted loss, its gradient with respect
to logp (so the backward is a single scale by the incoming scalar gradient), the KL value and
the clipped flag for the metrics. Same math as reference.torch_loss_terms.
Imported lazily for the same reason as triton_logprobs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _loss_kernel(logp_ptr, old_ptr, adv_ptr, wt_ptr, ref_ptr, roll_ptr, ent_ptr,
                 loss_ptr, dlogp_ptr, kl_ptr, clip_ptr, T, lo, hi, kl_coef, tis_cap, ent_coef,
                 KL: tl.constexpr, TIS: tl.constexpr, ENT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    wt = tl.load(wt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ratio = tl.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    unclipped = pg1 >= pg2
    pg = tl.where(unclipped, pg1, pg2)
    dpg = tl.where(unclipped, pg1, 0.0)  # the clipped branch is constant in logp
    if TIS:
        roll = tl.load(roll_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tis = tl.minimum(tl.exp(old - roll), tis_cap)
        pg = pg * tis
        dpg = dpg * tis
    loss = pg
    dlogp = dpg
    kl = tl.zeros_like(logp)
    if KL != 0:
        ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        delta = ref - logp  # log(pi_ref / pi)
        if KL == 1:
            kl = -delta
            dkl = tl.zeros_like(delta) + 1.0
        elif KL == 2:
            kl = 0.5 * delta * delta
            dkl = -delta
        else:
            e = tl.exp(delta)
            kl = e - 1.0 - delta
            dkl = 1.0 - e
        loss = loss + kl_coef * kl
        dlogp = dlogp + kl_coef * dkl
    if ENT:
        ent = tl.load(ent_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        loss = loss - ent_coef * ent
    tl.store(loss_ptr + offs, loss * wt, mask=mask)
    tl.store(dlogp_ptr + offs, dlogp * wt, mask=mask)
    tl.store(kl_ptr + offs, kl, mask=mask)
    tl.store(clip_ptr + offs, tl.where(unclipped, 0.0, 1.0), mask=mask)


def loss_terms(logp, old_logp, adv, weight, ref_logp, rollout_logp, entropy, *, clip_low, clip_high, kl_coef,
               kl_estimator, tis_cap, entropy_coef, block: int = 1024):
    """Same contract as reference.torch_loss_terms; all inputs fp32 contiguous [T]."""
    (n,) = logp.shape
    loss, dlogp, kl, clipped = (torch.empty_like(logp) for _ in range(4))
    use_kl = kl_coef != 0.0 and ref_logp is not None
    use_ent = entropy is not None and entropy_coef != 0.0
    if n:
        _loss_kernel[(triton.cdiv(n, block),)](
            logp, old_logp, adv, weight, ref_logp if use_kl else logp, rollout_logp if tis_cap is not None else logp,
            entropy if use_ent else logp, loss, dlogp, kl, clipped, n, 1.0 - clip_low, 1.0 + clip_high,
            float(kl_coef), float(tis_cap or 0.0), float(entropy_coef),
            KL=KL_CODES[kl_estimator] if use_kl else 0, TIS=tis_cap is not None, ENT=use_ent, BLOCK=block,
            num_warps=4)
    dent = -entropy_coef * weight if use_ent else None
    return loss, dlogp, dent, kl, clipped
