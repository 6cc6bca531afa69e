"""The GRPO policy loss of one micro-batch, from logits or from hidden states.

Calls only the megammr.kernels API, which runs Triton kernels on CUDA and the chunked torch
path elsewhere, so no [T, V] fp32 copy of the logits is made on either. With tensor
parallelism the logits (or the output-layer weight) are vocab shards and `tp_group` is the
tensor-parallel group; the loss is then identical on every rank of the group.
"""
from __future__ import annotations


from megammr.kernels import grpo_loss, logprobs_from_hidden, logprobs_from_logits


def _finish(logp, entropy, mask, advantages, old_logp, algo, ref_logp, rollout_logp, seq_ids, normalizer, backend):
    if old_logp is None:
        # On-policy (one update per rollout batch): the old policy is the current one.
        old_logp = logp.detach()
    loss, metrics = grpo_loss(
        logp, old_logp, advantages, mask, ref_logp=ref_logp if algo.kl_coef else None, rollout_logp=rollout_logp,
        entropy=entropy, clip_low=algo.clip_low, clip_high=algo.clip_high, kl_coef=algo.kl_coef,
        kl_estimator=algo.kl_estimator, tis_cap=algo.tis_cap, entropy_coef=algo.entropy_coef,
        loss_agg=algo.loss_agg, seq_ids=seq_ids, normalizer=normalizer, backend=backend)
    return loss, metrics, logp.detach()


def policy_loss(logits, labels, mask, advantages, algo, *, old_logp=None, ref_logp=None, rollout_logp=None,
                temperature: float, tp_group=None, seq_ids=None, normalizer=None, inplace_backward=False,
                backend="auto"):
    """GRPO loss from LM-head logits [..., V(/tp)] and target token ids [...].

    algo: the recipe's AlgoConfig (clip bounds, KL coefficient and estimator, TIS cap, entropy
    coefficient, aggregation). temperature must be the rollout's sampling temperature, so that
    the log-probs are those of the distribution that produced the samples.
    Returns (loss, metrics, logp detached).
    inplace_backward=True lets the backward overwrite the logits with their gradient (no extra
    [T, V] buffer); safe when the logits come straight from the output layer.
    """
    logp, entropy = logprobs_from_logits(logits, labels, temperature, return_entropy=True, group=tp_group,
                                         inplace_backward=inplace_backward, backend=backend)
    return _finish(logp, entropy, mask, advantages, old_logp, algo, ref_logp, rollout_logp, seq_ids, normalizer,
                   backend)


def policy_loss_from_hidden(hidden, weight, labels, mask, advantages, algo, *, old_logp=None, ref_logp=None,
                            rollout_logp=None, temperature: float, tp_group=None, seq_ids=None,
                            normalizer=None, backend="auto", chunk_tokens=None):
    """Same as policy_loss from the final hidden states [..., H] and output weight [V(/tp), H]."""
    logp, entropy = logprobs_from_hidden(hidden, weight, labels, temperature, return_entropy=True, group=tp_group,
                                         backend=backend, chunk_tokens=chunk_tokens)
    return _finish(logp, entropy, mask, advantages, old_logp, algo, ref_logp, rollout_logp, seq_ids, normalizer,
                   backend)
