"""Pure-torch references: the naive float64 ground truth and the chunked fp32 path.

Two kinds of code live here:

* `naive_*`: the obvious computation in float64 (log_softmax + gather, autograd for the
  gradients). Memory-hungry on purpose; it is the ground truth of the tests.
* `torch_stats` / `torch_grad`: the chunked path used on machines without a GPU. They are
  the same per-row math as the Triton kernels in triton_logprobs.py, processed a few rows at a
  time so that no fp32 copy of the whole [T, V] logits ever exists (only a chunk of rows).
  torch_stats (the whole of a no-grad pass) works in two fp32 [rows, V] buffers allocated once
  per call, so its extra memory is 2 x chunk bytes plus [T]-sized vectors.

The per-row statistics that both backends produce, for z = logits / temperature:
    m  = max_j z_j
    s  = sum_j exp(z_j - m)
    w  = sum_j exp(z_j - m) * (z_j - m)       (only needed for the entropy)
    zy = z_label (0 where the label is not on this shard or ignored)
From them lse = m + log s, entropy = log s - w / s, logp = zy - lse. Keeping w relative to m
keeps it bounded; shards combine them with [T]-sized all-reduces (see logprobs.combine_stats).
"""
from __future__ import annotations

import torch

# Rows per chunk are chosen so that one fp32 [rows, V] temporary stays within a byte budget:
# CHUNK_BYTES, or 1/CHUNK_FRACTION of the matrix in fp32 when that is smaller (but never below
# MIN_CHUNK_BYTES), so that the extra memory is a small fraction of the logits at every size.
# torch_stats holds two such buffers, torch_grad about three temporaries.
CHUNK_BYTES = 32 * 2**20
CHUNK_FRACTION = 64
MIN_CHUNK_BYTES = 2**20


def chunk_rows(n_rows: int, vocab: int, budget: int | None = None) -> int:
    vocab = max(vocab, 1)
    if budget is None:
        budget = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, 4 * n_rows * vocab // CHUNK_FRACTION))
    return max(1, min(n_rows, budget // (4 * vocab)))


# --------------------------------------------------------------------------- float64 truth
def naive_logprobs(logits, labels, temperature, ignore_index=-100):
    """float64 log p(label) and entropy of softmax(logits / temperature); ignored labels give 0."""
    z = logits.double() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    p = logp_all.exp()
    ent = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)  # 0 log 0 = 0 (masked vocab)
    return logp, ent


def naive_token_terms(logp, old_logp, advantages, *, clip_low, clip_high, kl_coef, kl_estimator, tis_cap=None,
                      ref_logp=None, rollout_logp=None):
    """Per-token GRPO/PPO loss (before aggregation), written the textbook way with torch ops.

    Differentiable through `logp` by plain autograd; in float64 it is the tests' ground truth.
    """
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if tis_cap is not None:
        pg = pg * torch.clamp(torch.exp(old_logp - rollout_logp), max=tis_cap)
    if kl_coef and ref_logp is not None:
        delta = ref_logp - logp  # log(pi_ref / pi)
        kl = {"k1": -delta, "k2": 0.5 * delta**2, "k3": torch.exp(delta) - 1 - delta}[kl_estimator]
        pg = pg + kl_coef * kl
    return pg


# --------------------------------------------------------------------------- chunked fp32 path
def torch_stats(x: torch.Tensor, labels: torch.Tensor, inv_temp: float, with_entropy: bool):
    """Row statistics (m, s, w, zy) of a [T, V] logits matrix, a chunk of rows at a time.

    `labels` are shard-local column indices, -1 where the row has no label on this shard.
    x may have any strides (a chunk is read once into the fp32 work buffer). All [rows, V]
    work happens in two fp32 buffers allocated once for the whole call (a single allocation,
    reused by every chunk, so nothing churns through the allocator): zb holds z = x / temperature,
    then z - m in place; pb holds exp(z - m), then its product with z - m in place. For fp32
    logits at temperature 1, z is the logits themselves and zb only receives z - m.
    """
    n, vocab = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)
    m, s, w, zy = (torch.empty(n, **f32) for _ in range(4))
    step = chunk_rows(n, vocab)
    buf = torch.empty(2, min(step, n), vocab, **f32)
    fp32 = x.dtype == torch.float32
    for a in range(0, n, step):
        b = min(n, a + step)
        xc, zb, pb = x[a:b], buf[0, :b - a], buf[1, :b - a]
        in_buf = not (fp32 and inv_temp == 1.0)
        if not in_buf:
            z = xc
        elif fp32:
            z = torch.mul(xc, inv_temp, out=zb)
        else:
            z = zb.copy_(xc)  # exact widening, then the same fp32 scaling as x.float() * inv_temp
            if inv_temp != 1.0:
                z.mul_(inv_temp)
        mc = torch.amax(z, -1, out=m[a:b])
        lab = labels[a:b]
        got = z.gather(1, lab.clamp(min=0)[:, None]).squeeze(1)
        zy[a:b] = torch.where(lab >= 0, got, torch.zeros_like(got))
        d = z.sub_(mc[:, None]) if in_buf else torch.sub(z, mc[:, None], out=zb)
        p = torch.exp(d, out=pb)
        torch.sum(p, -1, out=s[a:b])
        if with_entropy:
            # exp(-inf) * (-inf) is nan: a masked-out vocabulary entry contributes nothing. It is
            # the only nan p * d can hold unless d itself is nan, and then s (hence lse and the
            # entropy) is nan whatever w is; nan_to_num_ zeroes it in place, without a mask.
            torch.sum(p.mul_(d).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf")), -1, out=w[a:b])
    if not with_entropy:
        w.zero_()
    return m, s, w, zy


def torch_grad(x, labels, lse, ent, g_logp, g_ent, inv_temp: float, out):
    """dlogits = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / temperature, into `out`.

    `out` may be `x` itself (in-place backward): each chunk is read fully before it is written.
    """
    n, vocab = x.shape
    step = chunk_rows(n, vocab)
    for a in range(0, n, step):
        b = min(n, a + step)
        z = x[a:b].float()
        z = z * inv_temp if inv_temp != 1.0 else z
        logp = z - lse[a:b, None]
        p = logp.exp()
        g1 = g_logp[a:b, None]
        if g_ent is not None:
            t = logp.add_(ent[a:b, None]).mul_(g_ent[a:b, None]).add_(g1).mul_(p)
            t.masked_fill_(p == 0, 0.0)  # p = 0 where logp = -inf: no contribution, not nan
        else:
            t = p.mul_(g1)
        t.neg_()
        lab = labels[a:b]
        hit = (lab >= 0)
        t.scatter_add_(1, lab.clamp(min=0)[:, None], (g1.squeeze(1) * hit)[:, None])
        if inv_temp != 1.0:
            t.mul_(inv_temp)
        out[a:b].copy_(t)
    return out


def torch_loss_terms(logp, old_logp, adv, weight, ref_logp, rollout_logp, entropy, *, clip_low, clip_high,
                     kl_coef, kl_estimator, tis_cap, entropy_coef):
    """Elementwise GRPO loss with its analytic gradient; the torch twin of triton_loss._loss_kernel.

    Returns (weighted per-token loss, dloss/dlogp, dloss/dentropy or None, kl per token, clipped flag).
    `weight` holds the aggregation weight of each token (mask / normaliser).
    """
    ratio = torch.exp(logp - old_logp)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(lo, hi)
    use_unclipped = pg1 >= pg2
    pg = torch.where(use_unclipped, pg1, pg2)
    dpg = torch.where(use_unclipped, pg1, torch.zeros_like(pg1))  # d(-A r)/dlogp = -A r
    clipped = (~use_unclipped).float()
    if tis_cap is not None:
        tis = torch.exp(old_logp - rollout_logp).clamp(max=tis_cap)
        pg, dpg = pg * tis, dpg * tis
    loss, dlogp = pg, dpg
    kl = torch.zeros_like(logp)
    if kl_coef != 0.0 and ref_logp is not None:
        delta = ref_logp - logp
        if kl_estimator == "k1":
            kl, dkl = -delta, torch.ones_like(delta)
        elif kl_estimator == "k2":
            kl, dkl = 0.5 * delta * delta, -delta
        else:
            e = torch.exp(delta)
            kl, dkl = e - 1.0 - delta, 1.0 - e
        loss, dlogp = loss + kl_coef * kl, dlogp + kl_coef * dkl
    dent = None
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * entropy
        dent = -entropy_coef * weight
    return loss * weight, dlogp * weight, dent, kl, clipped
