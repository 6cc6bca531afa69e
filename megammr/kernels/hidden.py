"""log-probs and entropy straight from hidden states and the output layer, chunked over tokens.

Full [T, V] logits never exist: a chunk of tokens at a time is projected (cuBLAS / torch
matmul), its row statistics are taken by the same backend as logprobs.py (Triton on CUDA,
torch elsewhere) and only [T]-sized results are kept. The backward recomputes each chunk's
logits, turns them into dlogits in place and accumulates d(hidden) and d(weight) from them,
so the peak extra memory is one chunk of logits. With the weight sharded over the vocabulary
(tensor parallel) the statistics are combined with combine_stats and d(hidden) is summed over
the group, because every rank holds the same hidden states.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .logprobs import _ops, _shard_labels, combine_stats, forward_outputs, resolve_backend

# Tokens per chunk: one chunk of logits (in the matmul dtype) is about this size; 1766 x 152k bf16.
DEFAULT_CHUNK_BYTES = 512 * 2**20


def _chunk(n, vocab, elem, chunk_tokens):
    if chunk_tokens:
        return chunk_tokens
    return max(1, min(n, DEFAULT_CHUNK_BYTES // (vocab * max(elem, 2))))


class _HiddenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, with_entropy, ignore_index, group, backend, chunk_tokens):
        hdim = hidden.shape[-1]
        h = hidden.reshape(-1, hdim)
        vocab = weight.shape[0]
        lab, valid = _shard_labels(labels.reshape(-1).long(), vocab, ignore_index, group)
        stats_fn, _ = _ops(backend)
        inv_t = 1.0 / temperature
        n = h.shape[0]
        step = _chunk(n, vocab, hidden.element_size(), chunk_tokens)
        parts = [stats_fn(h[a:a + step] @ weight.t(), lab[a:a + step], inv_t, with_entropy)
                 for a in range(0, n, step)]
        m, s, w, zy = (torch.cat(p) for p in zip(*parts)) if parts else (torch.empty(0, device=h.device),) * 4
        lse, ent, zy = combine_stats(m, s, w, zy, group)
        logp = torch.where(valid, zy - lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, lab, valid, lse, ent)
        ctx.cfg = (inv_t, with_entropy, group, backend, step)
        return forward_outputs(ctx, logp, ent, with_entropy, labels.shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, lab, valid, lse, ent = ctx.saved_tensors
        inv_t, with_entropy, group, backend, step = ctx.cfg
        h = hidden.reshape(-1, hidden.shape[-1])
        n = h.shape[0]
        g1 = (g_logp.reshape(-1).float() * valid).contiguous() if g_logp is not None else torch.zeros_like(lse)
        g2 = g_ent.reshape(-1).float().contiguous() if (with_entropy and g_ent is not None) else None
        _, grad_fn = _ops(backend)
        dh = torch.empty_like(h)
        # Accumulate d(weight) in fp32 across chunks: bf16 partial sums would lose bits per chunk.
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for a in range(0, n, step):
            b = min(n, a + step)
            logits = h[a:b] @ weight.t()
            grad_fn(logits, lab[a:b], lse[a:b], ent[a:b], g1[a:b], None if g2 is None else g2[a:b], inv_t, logits)
            dh[a:b] = logits @ weight
            if dw is None:
                pass
            elif logits.dtype == dw.dtype:
                dw.addmm_(logits.t(), h[a:b])
            else:
                # bf16 matmul (fp32 accumulation inside) at tensor-core speed; chunks summed in fp32.
                dw += (logits.t() @ h[a:b]).float()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(dh, group=group)
        return (dh.view(hidden.shape), None if dw is None else dw.to(weight.dtype),
                None, None, None, None, None, None, None)


def logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                         return_entropy: bool = False, *, ignore_index: int = -100, group=None,
                         backend: str | None = "auto", chunk_tokens: int | None = None):
    """logprobs_from_logits(hidden @ weight.T, ...) without materialising the logits.

    hidden: [..., H]; weight: [V, H] (or the vocab shard [V/tp, H] of this rank with `group`);
    labels: [...] global token ids. Gradients flow to hidden and weight.
    """
    if hidden.shape[:-1] != labels.shape or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels "
                         f"{tuple(labels.shape)} disagree")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend = resolve_backend(backend, hidden.device)
    logp, ent = _HiddenLogProbs.apply(hidden, weight, labels, float(temperature), bool(return_entropy),
                                      int(ignore_index), group, backend, chunk_tokens)
    return (logp, ent) if return_entropy else logp
