"""Triton kernels for log-probs and entropy from logits: one program per row (token).

Forward: a single pass over the row's vocabulary in blocks with an online max / sum-exp (and the
entropy term w, see reference.py), so the logits are read once and nothing [T, V]-sized is
written. Backward: one pass that recomputes p from the saved log-sum-exp and writes dlogits,
optionally over the logits buffer itself (in-place backward).

Imported lazily: `triton.jit` decides between compiling and interpreting when a kernel is
defined, so TRITON_INTERPRET=1 must be set before this module is first imported.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _stats_kernel(x_ptr, stride_x, label_ptr, m_ptr, s_ptr, w_ptr, zy_ptr, V, inv_temp,
                  BLOCK_V: tl.constexpr, WITH_ENT: tl.constexpr):
    # int64 row offsets: T * V exceeds 2**31 at 16k tokens x 152k vocabulary.
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        z = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        # Guards against -inf - -inf = nan while every entry seen so far is -inf (masked vocab).
        alpha = tl.where(m_new == m, 1.0, tl.exp(m - m_new))
        finite = z > float("-inf")
        d = tl.where(finite, z - m_new, 0.0)
        e = tl.where(finite, tl.exp(d), 0.0)
        if WITH_ENT:
            # Rebase w to the new max: sum e'(d' + m - m_new) = w + (m - m_new) s, times alpha.
            shift = tl.where(s > 0.0, m - m_new, 0.0) * s
            w = alpha * (w + shift) + tl.sum(e * d, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    label = tl.load(label_ptr + row)
    has = label >= 0
    zy = tl.load(base + tl.where(has, label, 0)).to(tl.float32) * inv_temp
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(w_ptr + row, w)
    tl.store(zy_ptr + row, tl.where(has, zy, 0.0))


@triton.jit
def _grad_kernel(x_ptr, stride_x, dx_ptr, stride_dx, label_ptr, lse_ptr, ent_ptr, g1_ptr, g2_ptr, V, inv_temp,
                 BLOCK_V: tl.constexpr, WITH_ENT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xb = x_ptr + row * stride_x
    db = dx_ptr + row * stride_dx
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    g1 = tl.load(g1_ptr + row)
    label = tl.load(label_ptr + row)
    if WITH_ENT:
        h = tl.load(ent_ptr + row)
        g2 = tl.load(g2_ptr + row)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        inb = idx < V
        z = tl.load(xb + idx, mask=inb, other=0.0).to(tl.float32) * inv_temp
        logp = z - lse
        p = tl.exp(logp)
        if WITH_ENT:
            # dH/dz_j = -p_j (log p_j + H); p = 0 (logit -inf) contributes 0, not nan.
            t = tl.where(p > 0.0, p * (g1 + g2 * (logp + h)), 0.0)
        else:
            t = p * g1
        d = tl.where(idx == label, g1, 0.0) - t
        # Each block is fully read before it is written, so dx may alias x (in-place backward).
        tl.store(db + idx, (d * inv_temp).to(dx_ptr.dtype.element_ty), mask=inb)


def _block_v(vocab: int, block_v: int | None) -> int:
    if block_v:
        return block_v
    # Under the interpreter every block costs Python overhead: small tests pass their own.
    # On a GPU 4096 columns x 8 warps keeps 16 elements per thread in flight per iteration.
    return min(4096, triton.next_power_of_2(vocab))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def stats(x: torch.Tensor, labels: torch.Tensor, inv_temp: float, with_entropy: bool, block_v: int | None = None):
    n, vocab = x.shape
    assert x.stride(1) == 1 and labels.is_contiguous()
    m, s, w, zy = (torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(4))
    if n == 0:
        return m, s, w, zy
    bv = _block_v(vocab, block_v)
    _stats_kernel[(n,)](x, x.stride(0), labels, m, s, w, zy, vocab, float(inv_temp),
                        BLOCK_V=bv, WITH_ENT=with_entropy, num_warps=_num_warps(bv))
    return m, s, w, zy


def grad(x, labels, lse, ent, g_logp, g_ent, inv_temp: float, out, block_v: int | None = None):
    n, vocab = x.shape
    assert x.stride(1) == 1 and out.stride(1) == 1
    if n == 0:
        return out
    bv = _block_v(vocab, block_v)
    with_ent = g_ent is not None
    _grad_kernel[(n,)](x, x.stride(0), out, out.stride(0), labels, lse, ent if with_ent else lse,
                       g_logp.contiguous(), g_ent.contiguous() if with_ent else g_logp, vocab, float(inv_temp),
                       BLOCK_V=bv, WITH_ENT=with_ent, num_warps=_num_warps(bv))
    return out
