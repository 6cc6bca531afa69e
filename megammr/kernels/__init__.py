"""Fused kernels for GRPO (installed as megammr.kernels).

Public API (every function picks Triton on CUDA tensors and the chunked torch path elsewhere;
`backend="torch"|"triton"` or the environment variable MEGAMMR_KERNELS forces one):

    logprobs_from_logits(logits, labels, temperature, return_entropy=False, *, group=None, ...)
    vocab_parallel_logprobs_from_logits(...)   same, logits sharded over Megatron's TP group
    logprobs_from_hidden(hidden, weight, labels, ...)   no [T, V] logits at all (chunked)
    grpo_loss(logp, old_logp, advantages, mask, *, ref_logp, rollout_logp, entropy, ...)
    aggregation_weights(mask, loss_agg, seq_ids, normalizer)

Under torch.no_grad() (or for logits that do not require grad) logprobs_from_logits builds no
autograd node: the extra memory is two fp32 row chunks (reference.chunk_rows) and [T] vectors.

The float64 ground truth used by the tests is in megammr.kernels.reference (naive_*).
"""
from .hidden import logprobs_from_hidden
from .logprobs import combine_stats, logprobs_from_logits, resolve_backend, vocab_parallel_logprobs_from_logits
from .loss import aggregation_weights, grpo_loss

__all__ = ["logprobs_from_logits", "vocab_parallel_logprobs_from_logits", "logprobs_from_hidden", "grpo_loss",
           "aggregation_weights", "combine_stats", "resolve_backend"]
