"""Compiled Triton kernels on a real GPU against float64 (skipped without CUDA).

Sizes are real ones (V = 151936, not a multiple of any block) plus a case whose T * V passes
2**31 elements, where 32-bit row offsets would wrap. The in-place backward starts from a buffer
that holds the logits, so an element the kernel fails to write shows up as a wrong gradient.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

V = 151936


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite or unwritten output"
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype,temp", [(torch.float32, 1.0), (torch.bfloat16, 0.7), (torch.float16, 1.2)])
@pytest.mark.parametrize("inplace", [False, True])
def test_logprobs_entropy_grads_vs_float64(dtype, temp, inplace):
    from megammr.kernels import logprobs_from_logits
    from megammr.kernels.reference import naive_logprobs
    g = torch.Generator(device="cuda").manual_seed(0)
    T = 1003
    x = (torch.randn(T, V, device="cuda", generator=g) * 4).to(dtype)
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    y[::97] = -100
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # non-leaf, as an LM head's output
    lp, en = logprobs_from_logits(logits, y, temp, True, inplace_backward=inplace)
    g1, g2 = torch.randn(T, device="cuda", generator=g), torch.randn(T, device="cuda", generator=g)
    (d,) = torch.autograd.grad((lp * g1).sum() + (en * g2).sum(), logits)
    xd = x.double().requires_grad_()
    rl, re = naive_logprobs(xd, y, temp)
    ((rl * g1.double()).sum() + (re * g2.double()).sum()).backward()
    assert rel(lp, rl) < 1e-5 and rel(en, re) < 1e-5
    assert rel(d, xd.grad) < (1e-2 if dtype != torch.float32 else 1e-5)
    if inplace:
        assert d.data_ptr() == logits.data_ptr()


def test_large_row_offsets_past_2_31_elements():
    """T * V > 2**31 bf16 elements: the last rows must be as right as the first."""
    from megammr.kernels import logprobs_from_logits
    from megammr.kernels.reference import naive_logprobs
    T = 2**31 // V + 67
    if torch.cuda.get_device_properties(0).total_memory < 3 * T * V * 2:
        pytest.skip("not enough GPU memory")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.empty(T, V, device="cuda", dtype=torch.bfloat16).normal_(0, 3, generator=g)
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    xg = x.requires_grad_()
    lp, en = logprobs_from_logits(xg, y, 1.0, True)
    (d,) = torch.autograd.grad(lp.sum() + en.sum(), xg)
    for sl in (slice(0, 8), slice(T - 8, T)):
        xd = x[sl].detach().double().requires_grad_()
        rl, re = naive_logprobs(xd, y[sl], 1.0)
        (rl.sum() + re.sum()).backward()
        assert rel(lp[sl], rl) < 1e-5 and rel(en[sl], re) < 1e-5 and rel(d[sl], xd.grad) < 1e-2


def test_from_hidden_and_loss_kernel_vs_float64():
    g = torch.Generator(device="cuda").manual_seed(2)
    T, H = 777, 256
    hidden = torch.randn(T, H, device="cuda", generator=g)
    weight = torch.randn(V, H, device="cuda", generator=g) * H**-0.5
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls, so that 1e-5 is a fair bound
    try:
        _hidden_and_loss(hidden, weight, h, w, y, g, T)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _hidden_and_loss(hidden, weight, h, w, y, g, T):
    from megammr.kernels import grpo_loss, logprobs_from_hidden
    from megammr.kernels.reference import naive_logprobs, naive_token_terms
    lp, en = logprobs_from_hidden(h, w, y, 0.9, True, chunk_tokens=300)
    old = lp.detach() + torch.randn(T, device="cuda", generator=g) * 0.2
    ref = lp.detach() + torch.randn(T, device="cuda", generator=g) * 0.3
    adv = torch.randn(T, device="cuda", generator=g)
    mask = torch.rand(T, device="cuda", generator=g) > 0.2
    cfg = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.1, kl_estimator="k3", tis_cap=None)
    loss, _ = grpo_loss(lp, old, adv, mask, ref_logp=ref, entropy=en, entropy_coef=0.01, loss_agg="token_mean",
                        **cfg)
    loss.backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rl, re = naive_logprobs(hd @ wd.t(), y, 0.9)
    terms = naive_token_terms(rl, old.double(), adv.double(), ref_logp=ref.double(), **cfg) - 0.01 * re
    ref_loss = (terms * mask).sum() / mask.sum()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    assert rel(h.grad, hd.grad) < 1e-5 and rel(w.grad, wd.grad) < 1e-5
