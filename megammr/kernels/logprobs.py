"""log p(label) and entropy from logits, whole or sharded over the vocabulary (tensor parallel).

One autograd Function serves both backends (Triton on CUDA, the chunked torch path elsewhere)
and both layouts: a backend computes per-row statistics of its [T, V_local] block, they are
combined over the tensor-parallel group with [T]-sized all-reduces (combine_stats), and the
backward is purely local given the global log-sum-exp and entropy, so it needs no communication.

When no gradient can flow (torch.no_grad(), or logits that do not require grad: the old- and
reference-policy passes) the autograd Function is skipped and the statistics are taken straight
from the logits as they are: no contiguous copy, no reshape copy on the torch path, nothing
saved, so the extra memory is the chunked path's two work buffers and [T]-sized vectors.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from . import reference

# lazy in this module: the Triton kernels (triton_logprobs imports triton, which reads
# TRITON_INTERPRET when it is imported) for backend "triton" only, and megatron-core's TP group
# for the one caller that leaves `group` unset: the kernels themselves need neither.


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """'auto' picks Triton on CUDA and the torch path elsewhere; 'triton' on CPU needs TRITON_INTERPRET=1."""
    backend = backend or os.environ.get("MEGAMMR_KERNELS", "auto")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"kernel backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    return backend


def _ops(backend: str):
    if backend == "triton":
        from . import triton_logprobs as ops
        return ops.stats, ops.grad
    return reference.torch_stats, reference.torch_grad


def combine_stats(m, s, w, zy, group=None):
    """Merge per-shard (m, s, w, zy) into (lse, entropy, z_label) over `group`.

    Two all-reduces of [T] and [3, T]: the max first, then every shard rebases its sums to the
    global max (s e^(m_r - m); w likewise plus the shift (m_r - m) s_r) and they are summed.
    """
    if group is not None and dist.get_world_size(group) > 1:
        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(m - gm)
        packed = torch.stack([s * scale, scale * (w + (m - gm) * s), zy])
        dist.all_reduce(packed, group=group)
        s, w, zy = packed.unbind(0)
        m = gm
    log_s = torch.log(s)
    return m + log_s, log_s - w / s, zy


def _shard_labels(labels, vocab_local, ignore_index, group):
    """Global labels -> (shard-local column or -1, validity mask), checking the range once."""
    tp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab_local * tp))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"label {first} is outside the vocabulary [0, {vocab_local * tp}) "
                         f"and is not ignore_index={ignore_index}")
    local = labels - rank * vocab_local
    here = valid & (local >= 0) & (local < vocab_local)
    return torch.where(here, local, torch.full_like(local, -1)).contiguous(), valid



def forward_outputs(ctx, logp, ent, with_entropy: bool, out_shape):
    """The (logp, entropy) pair an autograd forward returns; without entropy, an empty
    non-differentiable placeholder (autograd.Function needs a fixed number of outputs)."""
    if not with_entropy:
        ent = torch.empty(0, device=logp.device)
        ctx.mark_non_differentiable(ent)
        return logp.view(out_shape), ent
    return logp.view(out_shape), ent.view(out_shape)


def _torch_stats_nd(logits, lab, inv_t, with_entropy):
    """reference.torch_stats of logits [..., V] taken as rows, without the copy that reshape makes
    of a layout rows cannot view (a slice such as logits[:, :-1]): such a tensor is split along
    its first dimension, each part a run of consecutive rows (and of `lab`)."""
    vocab = logits.shape[-1]
    try:
        x = logits.view(-1, vocab)
    except RuntimeError:
        per = lab.numel() // logits.shape[0]
        parts = [_torch_stats_nd(logits[i], lab[i * per:(i + 1) * per], inv_t, with_entropy)
                 for i in range(logits.shape[0])]
        return tuple(torch.cat(p) for p in zip(*parts))
    return reference.torch_stats(x, lab, inv_t, with_entropy)


def _forward_only(logits, labels, temperature, with_entropy, ignore_index, group, backend, block_v):
    """(logp, entropy or None) with nothing kept for a backward: the no-grad path."""
    vocab = logits.shape[-1]
    lab, valid = _shard_labels(labels.reshape(-1).long(), vocab, ignore_index, group)
    inv_t = 1.0 / temperature
    if backend == "triton":
        x = logits.reshape(-1, vocab)
        if x.stride(1) != 1:
            x = x.contiguous()
        from . import triton_logprobs
        m, s, w, zy = triton_logprobs.stats(x, lab, inv_t, with_entropy, block_v=block_v)
    else:
        m, s, w, zy = _torch_stats_nd(logits, lab, inv_t, with_entropy)
    lse, ent, zy = combine_stats(m, s, w, zy, group)
    logp = torch.where(valid, zy - lse, torch.zeros_like(lse))
    return logp.view(labels.shape), (ent.view(labels.shape) if with_entropy else None)


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, with_entropy, ignore_index, inplace_backward, group, backend,
                block_v):
        vocab = logits.shape[-1]
        x = logits.reshape(-1, vocab)
        if x.stride(1) != 1:
            x = x.contiguous()
        lab, valid = _shard_labels(labels.reshape(-1).long(), vocab, ignore_index, group)
        stats_fn, _ = _ops(backend)
        inv_t = 1.0 / temperature
        kw = dict(block_v=block_v) if backend == "triton" else {}
        m, s, w, zy = stats_fn(x, lab, inv_t, with_entropy, **kw)
        lse, ent, zy = combine_stats(m, s, w, zy, group)
        logp = torch.where(valid, zy - lse, torch.zeros_like(lse))
        ctx.save_for_backward(x, lab, valid, lse, ent)
        ctx.cfg = (inv_t, with_entropy, inplace_backward, backend, kw, logits.shape)
        return forward_outputs(ctx, logp, ent, with_entropy, labels.shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        x, lab, valid, lse, ent = ctx.saved_tensors
        inv_t, with_entropy, inplace, backend, kw, shape = ctx.cfg
        g1 = g_logp.reshape(-1).float() * valid if g_logp is not None else torch.zeros_like(lse)
        g2 = g_ent.reshape(-1).float().contiguous() if (with_entropy and g_ent is not None) else None
        out = x if inplace else torch.empty_like(x)
        _, grad_fn = _ops(backend)
        grad_fn(x, lab, lse, ent, g1.contiguous(), g2, inv_t, out, **kw)
        if inplace:
            # A Triton store does not bump the version counter: do it so that any other autograd
            # node that saved these logits fails loudly instead of reading a gradient.
            torch.autograd.graph.increment_version(x)
        return out.view(shape), None, None, None, None, None, None, None, None


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                         return_entropy: bool = False, *, ignore_index: int = -100, inplace_backward: bool = False,
                         group=None, backend: str | None = "auto", block_v: int | None = None):
    """log softmax(logits / temperature)[label] per token, and optionally the entropy.

    logits: [..., V] (bf16, fp16 or fp32; last dim contiguous); labels: [...] integer token ids.
    Returns fp32 tensors of labels' shape: logp, or (logp, entropy) when return_entropy.
    Labels equal to ignore_index give logp = 0 and no gradient.
    No fp32 [T, V] copy is made: the forward keeps only [T]-sized statistics, the backward writes
    dlogits in one pass. inplace_backward=True writes dlogits over the logits buffer (then the
    gradient costs no extra [T, V] memory); use it only when nothing else needs the logits after
    this loss, as with the output of the LM head. group: the tensor-parallel group when logits
    are the vocab shard [..., V/tp] of rank r (columns r*V/tp ...); labels stay global ids.
    Under torch.no_grad() (or for logits that do not require grad) no autograd node is built and
    the extra memory is two fp32 chunks of rows (reference.chunk_rows) plus [T]-sized vectors.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend = resolve_backend(backend, logits.device)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        logp, ent = _forward_only(logits, labels, float(temperature), bool(return_entropy), int(ignore_index),
                                  group, backend, block_v)
        return (logp, ent) if return_entropy else logp
    logp, ent = _LogProbs.apply(logits, labels, float(temperature), bool(return_entropy), int(ignore_index),
                                bool(inplace_backward), group, backend, block_v)
    return (logp, ent) if return_entropy else logp


def vocab_parallel_logprobs_from_logits(logits, labels, temperature, return_entropy=False, *, group=None,
                                        **kwargs):
    """logprobs_from_logits for logits sharded over the vocabulary; group defaults to Megatron's TP group."""
    if group is None:
        from megatron.core import parallel_state
        group = parallel_state.get_tensor_model_parallel_group()
    return logprobs_from_logits(logits, labels, temperature, return_entropy, group=group, **kwargs)
