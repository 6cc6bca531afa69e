"""The policy loss of one micro-batch, from logits or from hidden states.

Log-probs and entropies come from the megammr.kernels primitives (Triton on CUDA, the chunked
torch path elsewhere), so no [T, V] fp32 copy of the logits is made on either; the loss itself is
the recipe's `algo.policy_loss` (megammr.algo.losses), through its fused kernel where it has one.
With tensor parallelism the logits (or the output-layer weight) are vocab shards and `tp_group`
is the tensor-parallel group; the loss is then identical on every rank of the group.
"""
from __future__ import annotations

from megammr.kernels import logprobs_from_hidden, logprobs_from_logits

from .losses import FUSED, POLICY_LOSSES


def policy_loss_terms(logp, entropy, mask, advantages, algo, *, old_logp=None, ref_logp=None, rollout_logp=None,
                      seq_ids=None, normalizer=None, backend="auto", fused=True):
    """(loss, metrics) of `algo.policy_loss` on per-token log-probs; fused=False takes the plain
    torch function even where a fused kernel exists."""
    if algo.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"algo.policy_loss must be one of {sorted(POLICY_LOSSES)}, got {algo.policy_loss!r}")
    if old_logp is None:
        # On-policy (one update per rollout batch): the old policy is the current one.
        old_logp = logp.detach()
    kw = dict(ref_logp=ref_logp, rollout_logp=rollout_logp, entropy=entropy, seq_ids=seq_ids, normalizer=normalizer)
    if fused and algo.policy_loss in FUSED:
        return FUSED[algo.policy_loss](logp, old_logp, advantages, mask, algo, backend=backend, **kw)
    return POLICY_LOSSES[algo.policy_loss](logp, old_logp, advantages, mask, algo, **kw)


def policy_loss(logits, labels, mask, advantages, algo, *, old_logp=None, ref_logp=None, rollout_logp=None,
                temperature: float, tp_group=None, seq_ids=None, normalizer=None, inplace_backward=False,
                backend="auto"):
    """The recipe's policy loss from LM-head logits [..., V(/tp)] and target token ids [...].

    algo: the recipe's AlgoConfig (loss, clip bounds, KL coefficient and estimator, TIS cap,
    entropy coefficient, aggregation). temperature must be the rollout's sampling temperature, so
    that the log-probs are those of the distribution that produced the samples.
    Returns (loss, metrics, logp detached).
    inplace_backward=True lets the backward overwrite the logits with their gradient (no extra
    [T, V] buffer); safe when the logits come straight from the output layer.
    """
    logp, entropy = logprobs_from_logits(logits, labels, temperature, return_entropy=True, group=tp_group,
                                         inplace_backward=inplace_backward, backend=backend)
    loss, metrics = policy_loss_terms(logp, entropy, mask, advantages, algo, old_logp=old_logp, ref_logp=ref_logp,
                                      rollout_logp=rollout_logp, seq_ids=seq_ids, normalizer=normalizer,
                                      backend=backend)
    return loss, metrics, logp.detach()


def policy_loss_from_hidden(hidden, weight, labels, mask, advantages, algo, *, old_logp=None, ref_logp=None,
                            rollout_logp=None, temperature: float, tp_group=None, seq_ids=None,
                            normalizer=None, backend="auto", chunk_tokens=None):
    """Same as policy_loss from the final hidden states [..., H] and output weight [V(/tp), H]."""
    logp, entropy = logprobs_from_hidden(hidden, weight, labels, temperature, return_entropy=True, group=tp_group,
                                         backend=backend, chunk_tokens=chunk_tokens)
    loss, metrics = policy_loss_terms(logp, entropy, mask, advantages, algo, old_logp=old_logp, ref_logp=ref_logp,
                                      rollout_logp=rollout_logp, seq_ids=seq_ids, normalizer=normalizer,
                                      backend=backend)
    return loss, metrics, logp.detach()
