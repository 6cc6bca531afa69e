"""megammr.kernels against float64: log-probs / entropy from logits and from hidden states.

Both backends run here: the chunked torch path, and the Triton kernels (compiled on CUDA, under
TRITON_INTERPRET=1 on CPU, so sizes stay small). T and V are never multiples of the block
sizes; inputs are fresh random draws (never zeros); errors are relative norms against float64.
"""
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of megammr.kernels.triton_*: triton.jit reads it at definition.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from megammr.kernels import logprobs_from_hidden, logprobs_from_logits  # noqa: E402
from megammr.kernels import reference  # noqa: E402
from megammr.kernels.reference import naive_logprobs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
BLOCK = 128  # triton block over V in these tests: V below is never a multiple of it


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm()).item()


def draw(shape, vocab, dtype, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, vocab, generator=g) * scale).to(dtype)
    y = torch.randint(0, vocab, shape, generator=g)
    return x.to(DEV), y.to(DEV)


def run_ours(x, y, temp, ent, backend, **kw):
    x = x.clone().requires_grad_()
    out = logprobs_from_logits(x, y, temp, return_entropy=ent, backend=backend, block_v=BLOCK, **kw)
    return x, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,temp,ent", [(torch.float32, 1.0, True), (torch.float32, 0.7, False),
                                            (torch.bfloat16, 1.3, True)])
def test_logprobs_entropy_and_grads_match_float64(backend, dtype, temp, ent):
    x, y = draw((3, 13), 517, dtype, seed=1)
    y[0, 2] = y[2, 5] = -100  # ignored tokens: logp 0, no gradient
    xg, out = run_ours(x, y, temp, ent, backend)
    logp, entropy = out if ent else (out, None)
    xd = x.double().requires_grad_()
    rl, re = naive_logprobs(xd, y, temp)
    assert logp.dtype == torch.float32 and logp.shape == y.shape
    assert rel(logp, rl) < 1e-5
    assert (logp[y == -100] == 0).all()
    g = torch.Generator().manual_seed(2)
    g1, g2 = torch.randn(y.shape, generator=g).to(DEV), torch.randn(y.shape, generator=g).to(DEV)
    total = (logp * g1).sum() + ((entropy * g2).sum() if ent else 0)
    ref = (rl * g1.double()).sum() + ((re * g2.double()).sum() if ent else 0)
    total.backward()
    ref.backward()
    if ent:
        assert rel(entropy, re) < 1e-5
    assert xg.grad.dtype == dtype
    # bf16 stores the gradient in bf16: its rounding (2^-9 relative) dominates.
    assert rel(xg.grad, xd.grad) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_the_gradient_over_the_logits(backend):
    x, y = draw((29,), 300, torch.float32, seed=3)
    ref_x, (lp, en) = run_ours(x, y, 0.9, True, backend)
    (lp.sum() + 0.5 * en.sum()).backward()
    buf = x.clone()
    leaf = buf.clone().requires_grad_()
    logits = leaf * 1.0  # non-leaf, like an LM head's output
    lp2, en2 = logprobs_from_logits(logits, y, 0.9, True, backend=backend, block_v=BLOCK, inplace_backward=True)
    (g,) = torch.autograd.grad(lp2.sum() + 0.5 * en2.sum(), logits)
    assert g.data_ptr() == logits.data_ptr(), "the gradient should live in the logits' storage"
    assert rel(g, ref_x.grad) < 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # interpreter: nan lanes that tl.where drops
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_entries_minus_inf(backend):
    """-inf logits (a masked vocabulary) give the softmax over the rest, 0 gradient, no nan."""
    x, y = draw((21,), 400, torch.float32, seed=4)
    dead = torch.zeros(400, dtype=torch.bool)
    dead[torch.randperm(400, generator=torch.Generator().manual_seed(5))[:150]] = True
    dead[:BLOCK] = True  # a whole first block of -inf: the online max starts from -inf
    keep = (~dead).nonzero().squeeze(1)
    y = keep[torch.randint(0, keep.numel(), (21,))].to(DEV)
    x[:, dead.to(DEV)] = float("-inf")
    xg, (lp, en) = run_ours(x, y, 1.0, True, backend)
    (lp.sum() + en.sum()).backward()
    xs = x[:, keep.to(DEV)].double().requires_grad_()
    ysmall = torch.searchsorted(keep.to(DEV), y)
    rl, re = naive_logprobs(xs, ysmall, 1.0)
    (rl.sum() + re.sum()).backward()
    assert rel(lp, rl) < 1e-5 and rel(en, re) < 1e-5
    assert (xg.grad[:, dead.to(DEV)] == 0).all()
    assert rel(xg.grad[:, keep.to(DEV)], xs.grad) < 1e-5


def test_torch_path_chunks_rows(monkeypatch):
    """Several row chunks (the memory bound of the CPU path) give the same numbers as one."""
    monkeypatch.setattr(reference, "CHUNK_BYTES", 4 * 517 * 5)  # 5 rows per chunk
    assert reference.chunk_rows(37, 517) == 5
    test_logprobs_entropy_and_grads_match_float64("torch", torch.float32, 0.7, True)


def test_bad_label_is_a_clear_error():
    x, y = draw((5,), 50, torch.float32, seed=6)
    y[3] = 50
    with pytest.raises(ValueError, match="label 50 is outside the vocabulary"):
        logprobs_from_logits(x, y, 1.0, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hidden_matches_float64(backend, dtype):
    g = torch.Generator().manual_seed(7)
    T, H, V = 29, 24, 301
    hidden = torch.randn(T, H, generator=g).to(dtype).to(DEV)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype).to(DEV)
    y = torch.randint(0, V, (T,), generator=g).to(DEV)
    y[4] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, en = logprobs_from_hidden(h, w, y, 0.8, True, backend=backend, chunk_tokens=8)  # 4 chunks, last short
    g1, g2 = torch.randn(T, generator=g).to(DEV), torch.randn(T, generator=g).to(DEV)
    ((lp * g1).sum() + (en * g2).sum()).backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rl, re = naive_logprobs(hd @ wd.t(), y, 0.8)
    ((rl * g1.double()).sum() + (re * g2.double()).sum()).backward()
    # bf16: the chunk's logits are rounded to bf16 by the matmul, as an LM head's output would be.
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in ((lp, rl), (en, re), (h.grad, hd.grad), (w.grad, wd.grad)):
        assert rel(a, b) < tol
