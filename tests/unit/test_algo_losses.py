"""megammr.algo.losses against float64 definitions written one sequence at a time, and the fused
GRPO kernel against the plain GRPO function."""
import dataclasses
import math

import pytest
import torch

from megammr.algo import POLICY_LOSSES, policy_loss, policy_loss_terms
from megammr.config import AlgoConfig
from megammr.kernels.reference import naive_logprobs


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _inputs(seed, shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    return dict(
        logp=logp,
        old=(logp + torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * 0.05),
        ref=(logp + torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * 0.3),
        roll=(logp + torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * 0.2),
        ent=(torch.rand(shape, generator=g, dtype=torch.float64) * 2).to(dtype))


def gspo_reference(seqs, algo):
    """GSPO by its definition (arXiv 2507.18071, eq. 5-7), one sequence at a time, in float64.

    seqs: list of dicts with per-token lists logp, old, ref, roll, ent and a scalar adv (only the
    sequence's loss tokens). Returns the loss as a float64 tensor built from the logp tensors.
    """
    total = 0.0
    for s in seqs:
        lp, old = s["logp"], s["old"]
        n = lp.numel()
        ratio = torch.exp((lp - old).sum() / n)           # (pi / pi_old)^(1/|y|)
        lo, hi = 1 - algo.clip_low, 1 + algo.clip_high
        obj = torch.minimum(ratio * s["adv"], ratio.clamp(lo, hi) * s["adv"])
        if algo.tis_cap is not None:
            obj = obj * min(math.exp(float((old - s["roll"]).sum()) / n), algo.tis_cap)
        delta = s["ref"] - lp
        kl = torch.exp(delta) - 1 - delta                   # k3
        total = total - obj + (algo.kl_coef * kl - algo.entropy_coef * s["ent"]).sum() / n
    return total / len(seqs)


ALGO = dataclasses.replace(AlgoConfig(), policy_loss="gspo", loss_agg="seq_mean", clip_low=0.02, clip_high=0.03,
                           kl_coef=0.05, kl_estimator="k3", tis_cap=1.5, entropy_coef=0.01)


def test_gspo_matches_its_definition_padded_and_packed():
    B, S = 4, 9
    x = _inputs(0, (B, S))
    lengths = [9, 3, 6, 1]
    mask = torch.arange(S)[None] < torch.tensor(lengths)[:, None]
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=torch.float64)

    logp = x["logp"].clone().requires_grad_()
    ent = x["ent"].clone().requires_grad_()
    loss, metrics = POLICY_LOSSES["gspo"](logp, x["old"], adv, mask, ALGO, ref_logp=x["ref"], rollout_logp=x["roll"],
                                          entropy=ent)
    loss.backward()

    leaves = [x["logp"][i, :n].clone().requires_grad_() for i, n in enumerate(lengths)]
    ents = [x["ent"][i, :n].clone().requires_grad_() for i, n in enumerate(lengths)]
    seqs = [dict(logp=leaves[i], ent=ents[i], adv=float(adv[i]),
                 **{k: x[k][i, :n] for k in ("old", "ref", "roll")}) for i, n in enumerate(lengths)]
    ref = gspo_reference(seqs, ALGO)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-10 * abs(ref.item())
    for i, n in enumerate(lengths):
        assert rel(logp.grad[i, :n], leaves[i].grad) < 1e-10
        assert rel(ent.grad[i, :n], ents[i].grad) < 1e-10
        assert (logp.grad[i, n:] == 0).all()
    assert set(metrics) == {"clip_frac", "kl", "entropy"} and 0 <= metrics["clip_frac"] <= 1

    # The same four sequences packed into one flat row with seq_ids (THD): same loss and gradient.
    flat = {k: torch.cat([x[k][i, :n] for i, n in enumerate(lengths)]) for k in x}
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    lp2 = flat["logp"].clone().requires_grad_()
    adv_t = adv[seq_ids]
    loss2, _ = POLICY_LOSSES["gspo"](lp2, flat["old"], adv_t, torch.ones_like(lp2, dtype=torch.bool), ALGO,
                                     ref_logp=flat["ref"], rollout_logp=flat["roll"], entropy=flat["ent"],
                                     seq_ids=seq_ids)
    loss2.backward()
    assert abs(loss2.item() - ref.item()) <= 1e-10 * abs(ref.item())
    assert rel(lp2.grad, torch.cat([g.grad for g in leaves])) < 1e-10


def test_gspo_clips_whole_sequences():
    # A sequence whose length-normalised ratio leaves [1 - clip_low, 1 + clip_high] on the side its
    # advantage pushes gets no policy gradient at all (every token), unlike token-level clipping.
    algo = dataclasses.replace(ALGO, kl_coef=0.0, entropy_coef=0.0, tis_cap=None)
    old = torch.zeros(2, 4, dtype=torch.float64)
    logp = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.0, 0.01]], dtype=torch.float64, requires_grad=True)
    loss, m = POLICY_LOSSES["gspo"](logp, old, torch.tensor([1.0, 1.0], dtype=torch.float64),
                                    torch.ones(2, 4, dtype=torch.bool), algo)
    loss.backward()
    assert (logp.grad[0] == 0).all() and (logp.grad[1] != 0).all()
    assert m["clip_frac"].item() == pytest.approx(0.5)


def test_gspo_on_policy_gradient_equals_grpo_seq_mean():
    # At ratio 1 (one update per rollout batch) d s_i = mean_t d logp_t: the GSPO gradient is GRPO's
    # with per-sequence token means (the paper's remark), a check independent of both implementations.
    x = _inputs(3, (3, 7))
    mask = torch.arange(7)[None] < torch.tensor([[7], [2], [5]])
    adv = torch.tensor([0.4, -1.0, 0.9], dtype=torch.float64)
    grads = {}
    for name in ("gspo", "grpo"):
        algo = dataclasses.replace(ALGO, policy_loss=name, kl_coef=0.0, entropy_coef=0.0, tis_cap=None)
        lp = x["logp"].clone().requires_grad_()
        loss, _ = POLICY_LOSSES[name](lp, lp.detach(), adv, mask, algo)
        loss.backward()
        grads[name] = lp.grad
    assert rel(grads["gspo"], grads["grpo"]) < 1e-12


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_grpo_equals_the_plain_function(agg, packed):
    algo = dataclasses.replace(AlgoConfig(), loss_agg=agg, clip_low=0.2, clip_high=0.28, kl_coef=0.05,
                               kl_estimator="k2", tis_cap=2.0, entropy_coef=0.01)
    x = _inputs(5, (3, 8), dtype=torch.float32)
    x["old"] = x["logp"] + torch.randn(3, 8, generator=torch.Generator().manual_seed(9)) * 0.3  # some clipping
    mask = torch.arange(8)[None] < torch.tensor([[8], [3], [6]])
    adv = torch.tensor([1.0, -0.5, 0.3])
    seq_ids = None
    if packed:
        x = {k: v.reshape(-1) for k, v in x.items()}
        seq_ids, mask, adv = torch.arange(3).repeat_interleave(8), mask.reshape(-1), adv.repeat_interleave(8)
    out = {}
    for fused in (True, False):
        lp, ent = x["logp"].clone().requires_grad_(), x["ent"].clone().requires_grad_()
        loss, m = policy_loss_terms(lp, ent, mask, adv, algo, old_logp=x["old"], ref_logp=x["ref"],
                                    rollout_logp=x["roll"], seq_ids=seq_ids, normalizer=None, backend="torch",
                                    fused=fused)
        loss.backward()
        out[fused] = (loss.detach(), lp.grad, ent.grad, m)
    (l1, g1, e1, m1), (l2, g2, e2, m2) = out[True], out[False]
    assert abs(l1.item() - l2.item()) <= 1e-6 * abs(l2.item())
    assert rel(g1, g2) < 1e-6 and rel(e1, e2) < 1e-6
    assert m1["clip_frac"].item() > 0 and all(abs(m1[k].item() - m2[k].item()) < 1e-6 for k in m2)


def test_policy_loss_from_logits_runs_gspo_to_float64():
    # The trainer's entry point: logits -> tempered log-probs (kernels) -> GSPO (algo), against float64.
    g = torch.Generator().manual_seed(2)
    B, S, V, temp = 3, 6, 41, 0.8
    logits = torch.randn(B, S, V, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = torch.arange(S)[None] < torch.tensor([[6], [4], [2]])
    adv = torch.tensor([1.0, -0.3, 0.6])
    with torch.no_grad():
        base, _ = naive_logprobs(logits.double(), labels, temp)
    old, ref, roll = (base + 0.1 * torch.randn(B, S, generator=g, dtype=torch.float64) for _ in range(3))
    lg = logits.clone().requires_grad_()
    loss, metrics, _ = policy_loss(lg, labels, mask, adv, ALGO, old_logp=old.float(), ref_logp=ref.float(),
                                   rollout_logp=roll.float(), temperature=temp)
    loss.backward()
    ld = logits.double().requires_grad_()
    lp, ent = naive_logprobs(ld, labels, temp)
    lengths = mask.sum(1).tolist()
    ref_loss = gspo_reference([dict(logp=lp[i, :n], ent=ent[i, :n], adv=float(adv[i]), old=old[i, :n],
                                    ref=ref[i, :n], roll=roll[i, :n]) for i, n in enumerate(lengths)], ALGO)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel(lg.grad, ld.grad) < 1e-5


def test_gspo_needs_seq_mean():
    algo = dataclasses.replace(ALGO, loss_agg="token_mean")
    with pytest.raises(ValueError, match="gspo.*seq_mean"):
        POLICY_LOSSES["gspo"](torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3), algo)
    from megammr.config import RecipeError, load_recipe
    with pytest.raises(RecipeError, match="gspo.*seq_mean"):
        load_recipe(None, ["algo.policy_loss=gspo", "algo.loss_agg=token_mean"])
