"""megammr.algo: group advantages and the policy loss (through megammr.kernels) against float64."""
import dataclasses

import pytest
import torch

from megammr.algo import group_advantages, policy_loss, policy_loss_from_hidden, token_advantages
from megammr.config import AlgoConfig
from megammr.kernels.reference import naive_logprobs, naive_token_terms


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def loop_advantages(r, gids, kind, eps=1e-6):
    """The definition, one group at a time, in float64."""
    out = torch.empty(len(r), dtype=torch.float64)
    for g in set(gids.tolist()):
        idx = (gids == g).nonzero().squeeze(1)
        x = r[idx].double()
        a = x - x.mean()
        if kind == "grpo":
            a = a / ((x.std() if len(x) > 1 else torch.tensor(0.0, dtype=torch.float64)) + eps)
        out[idx] = a
    return out


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo"])
def test_group_advantages_match_float64(kind):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(48, generator=g) * 1.5 + 0.1  # weighted format + accuracy rewards
    adv = group_advantages(r, group_size=16, kind=kind)
    assert rel(adv, loop_advantages(r, torch.arange(48) // 16, kind)) < 1e-6
    # uneven groups by id (samples dropped), including a singleton and a constant-reward group
    gids = torch.tensor([7] * 5 + [3] * 9 + [11] + [5] * 4)
    r2 = torch.rand(len(gids), generator=g) + 0.1
    r2[gids == 5] = 1.0
    adv2 = group_advantages(r2, group_ids=gids, kind=kind)
    assert rel(adv2, loop_advantages(r2, gids, kind)) < 1e-6
    assert (adv2[gids == 11] == 0).all() and (adv2[gids == 5] == 0).all()
    if kind == "grpo":
        assert abs(adv.reshape(3, 16).std(1) - 1).max() < 1e-4


def test_group_advantages_errors_and_token_broadcast():
    with pytest.raises(ValueError, match="groups of 16"):
        group_advantages(torch.rand(40), group_size=16)
    with pytest.raises(ValueError, match="grpo"):
        group_advantages(torch.rand(16), group_size=16, kind="ppo")
    adv = torch.tensor([0.5, -1.0])
    assert torch.equal(token_advantages(adv, torch.tensor([0, 0, 1, 1, 1])), torch.tensor([0.5, 0.5, -1.0, -1.0, -1.0]))


@pytest.mark.parametrize("agg,est", [("token_mean", "k3"), ("seq_mean", "k2")])
def test_policy_loss_from_logits_and_hidden_match_float64(agg, est):
    algo = dataclasses.replace(AlgoConfig(), clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator=est,
                               loss_agg=agg, tis_cap=2.0, entropy_coef=0.01)
    g = torch.Generator().manual_seed(1)
    B, S, H, V, temp = 3, 11, 16, 97, 0.9
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = torch.arange(S)[None] < torch.tensor([[11], [6], [9]])
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        base, _ = naive_logprobs(hidden @ weight.t(), labels, temp)
    old = (base + torch.randn(B, S, generator=g) * 0.2).float()
    ref = (base + torch.randn(B, S, generator=g) * 0.3).float()
    roll = (old + torch.randn(B, S, generator=g) * 0.3).float()

    logits = (hidden @ weight.t()).requires_grad_()
    loss, metrics, logp = policy_loss(logits, labels, mask, adv, algo, old_logp=old, ref_logp=ref, rollout_logp=roll,
                                      temperature=temp)
    loss.backward()

    ld = (hidden @ weight.t()).double().requires_grad_()
    lp, ent = naive_logprobs(ld, labels, temp)
    terms = naive_token_terms(lp, old.double(), adv.double()[:, None].expand(B, S), ref_logp=ref.double(),
                              rollout_logp=roll.double(), clip_low=0.2, clip_high=0.28, kl_coef=0.05,
                              kl_estimator=est, tis_cap=2.0) - 0.01 * ent
    m = mask.double()
    ref_loss = (terms * m).sum() / m.sum() if agg == "token_mean" else ((terms * m).sum(1) / m.sum(1)).mean()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel(logits.grad, ld.grad) < 1e-5
    assert rel(logp, lp.detach()) < 1e-6
    assert set(metrics) == {"clip_frac", "kl", "entropy"}

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_h, _, _ = policy_loss_from_hidden(h, w, labels, mask, adv, algo, old_logp=old, ref_logp=ref,
                                           rollout_logp=roll, temperature=temp, chunk_tokens=7)
    loss_h.backward()
    assert abs(loss_h.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel(w.grad, (ld.grad.reshape(-1, V).t() @ hidden.double().reshape(-1, H))) < 1e-5


def test_non_finite_reward_is_an_error_not_a_nan_group():
    r = torch.tensor([1.0, 0.0, float("nan"), 0.5])
    with pytest.raises(ValueError, match="1 non-finite reward.*index 2"):
        group_advantages(r, group_size=2)
