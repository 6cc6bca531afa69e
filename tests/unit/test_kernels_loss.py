"""The fused GRPO loss (torch path and Triton kernel) against a float64 autograd computation."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before megammr.kernels.triton_* is first imported

import pytest  # noqa: E402

from megammr.kernels import aggregation_weights, grpo_loss  # noqa: E402
from megammr.kernels.reference import naive_token_terms  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def batch(B=5, S=203, seed=0):
    """Random token vectors: ratios spread over both clip bounds, advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, S, generator=g) * 4 - 0.05
    logp = old + torch.randn(B, S, generator=g) * 0.3
    ref = old + torch.randn(B, S, generator=g) * 0.5
    roll = old + torch.randn(B, S, generator=g) * 0.4
    ent = torch.rand(B, S, generator=g) * 3 + 0.1
    adv = torch.randn(B, generator=g)
    lengths = torch.randint(S // 3, S + 1, (B,), generator=g)
    mask = torch.arange(S)[None, :] < lengths[:, None]
    mask[1, 7] = False  # a hole inside a sequence too
    return dict(logp=logp, old=old, ref=ref, roll=roll, ent=ent, adv=adv, mask=mask)


def naive(d, cfg, agg, normalizer=None):
    """float64: per-token terms with autograd, then the textbook mean over tokens or sequences."""
    lp = d["logp"].double().requires_grad_()
    en = d["ent"].double().requires_grad_()
    adv = d["adv"].double()[:, None].expand_as(lp)
    terms = naive_token_terms(lp, d["old"].double(), adv, ref_logp=d["ref"].double(),
                              rollout_logp=d["roll"].double(), clip_low=cfg["clip_low"],
                              clip_high=cfg["clip_high"], kl_coef=cfg["kl_coef"],
                              kl_estimator=cfg["kl_estimator"], tis_cap=cfg["tis_cap"])
    terms = terms - cfg["entropy_coef"] * en
    m = d["mask"].double()
    if agg == "token_mean":
        loss = (terms * m).sum() / (normalizer if normalizer is not None else m.sum())
    else:
        per_seq = (terms * m).sum(1) / m.sum(1)
        loss = per_seq.sum() / (normalizer if normalizer is not None else len(per_seq))
    loss.backward()
    return loss, lp.grad, en.grad


CASES = [
    dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0, kl_estimator="k3", tis_cap=None, entropy_coef=0.0),
    dict(clip_low=0.2, clip_high=0.2, kl_coef=0.1, kl_estimator="k1", tis_cap=None, entropy_coef=0.0),
    dict(clip_low=0.1, clip_high=0.3, kl_coef=0.2, kl_estimator="k2", tis_cap=2.0, entropy_coef=0.01),
    dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator="k3", tis_cap=1.5, entropy_coef=0.003),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_loss_and_grads_match_float64(backend, agg, case):
    cfg = CASES[case]
    d = batch(seed=case)
    on = {k: v.to(DEV) for k, v in d.items()}
    lp, en = on["logp"].clone().requires_grad_(), on["ent"].clone().requires_grad_()
    loss, metrics = grpo_loss(lp, on["old"], on["adv"], on["mask"], ref_logp=on["ref"], rollout_logp=on["roll"],
                              entropy=en, loss_agg=agg, backend=backend, **cfg)
    loss.backward()
    ref_loss, ref_glp, ref_gen = naive(d, cfg, agg)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert rel(lp.grad, ref_glp) < 1e-5
    if cfg["entropy_coef"]:
        assert rel(en.grad, ref_gen) < 1e-5
    assert 0.0 < metrics["clip_frac"].item() < 1.0, "the inputs should exercise both clipped and unclipped tokens"
    assert (lp.grad[~on["mask"]] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flat_tokens_with_seq_ids_and_global_normalizer(backend):
    """Packed [T] tokens with seq_ids equal the padded [B, S] form; a normalizer replaces the count."""
    cfg = CASES[3]
    d = batch(seed=11)
    m = d["mask"]
    flat = {k: v[m] for k, v in d.items() if k not in ("adv", "mask")}
    seq_ids = torch.arange(m.shape[0])[:, None].expand_as(m)[m]
    adv = d["adv"][seq_ids]
    for agg, norm in (("token_mean", 1000.0), ("seq_mean", 8.0)):
        lp = flat["logp"].clone().to(DEV).requires_grad_()
        loss, _ = grpo_loss(lp, flat["old"].to(DEV), adv.to(DEV), torch.ones_like(lp, dtype=torch.bool),
                            ref_logp=flat["ref"].to(DEV), rollout_logp=flat["roll"].to(DEV), entropy=flat["ent"].to(DEV),
                            loss_agg=agg, seq_ids=seq_ids.to(DEV), normalizer=norm, backend=backend, **cfg)
        loss.backward()
        ref_loss, ref_glp, _ = naive(d, cfg, agg, normalizer=norm)
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
        assert rel(lp.grad, ref_glp[m]) < 1e-5


def test_weights_sum_to_one_and_clear_errors():
    d = batch(seed=3)
    for agg in ("token_mean", "seq_mean"):
        w = aggregation_weights(d["mask"], agg)
        assert abs(w.sum().item() - 1.0) < 1e-5
    with pytest.raises(ValueError, match="seq_ids"):
        aggregation_weights(d["mask"].reshape(-1), "seq_mean")
    base = dict(CASES[0], loss_agg="token_mean", backend="torch")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(d["logp"], d["old"], d["adv"], d["mask"], **dict(base, kl_coef=0.1))
    with pytest.raises(ValueError, match="rollout_logp"):
        grpo_loss(d["logp"], d["old"], d["adv"], d["mask"], **dict(base, tis_cap=2.0))
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(d["logp"], d["old"], d["adv"], d["mask"], **dict(base, kl_estimator="k4"))
    with pytest.raises(TypeError, match="clip_low"):  # the algorithm's settings have no defaults
        grpo_loss(d["logp"], d["old"], d["adv"], d["mask"], backend="torch")
