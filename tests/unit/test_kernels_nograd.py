"""No-grad (forward-only) log-probs: the old- and reference-policy passes stay memory-lean.

Under torch.no_grad() (or for logits that do not require grad) logprobs_from_logits skips its
autograd Function and takes the row statistics straight from the logits, in two fp32 work
buffers of a bounded size: these tests check its values against the autograd path and float64,
that nothing is copied or recorded, and its extra peak memory in a fresh process.
"""
import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    # Must precede the first import of megammr.kernels.triton_*: triton.jit reads it at definition.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from megammr.kernels import logprobs, logprobs_from_logits, reference  # noqa: E402
from megammr.kernels.reference import naive_logprobs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm()).item()


def draw(shape, vocab, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, vocab, generator=g) * 4.0).to(dtype)
    y = torch.randint(0, vocab, shape, generator=g)
    y.view(-1)[::7] = -100
    return x.to(DEV), y.to(DEV)


def _no_function(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the autograd Function ran on a no-grad pass")
    monkeypatch.setattr(logprobs._LogProbs, "apply", refuse)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,temp,ent", [(torch.float32, 1.0, True), (torch.float32, 0.7, True),
                                            (torch.float32, 0.7, False), (torch.bfloat16, 1.3, True)])
def test_nograd_values_equal_the_autograd_forward_and_float64(monkeypatch, backend, dtype, temp, ent):
    x, y = draw((2, 13), 517, dtype, seed=11)  # small: the Triton interpreter is slow on CPU
    kw = dict(backend=backend, block_v=128)
    a = logprobs_from_logits(x.clone().requires_grad_(), y, temp, ent, **kw)  # the autograd Function
    _no_function(monkeypatch)
    with torch.no_grad():
        b = logprobs_from_logits(x.clone().requires_grad_(), y, temp, ent, **kw)
    c = logprobs_from_logits(x, y, temp, ent, **kw)  # grad enabled, logits without grad: no Function either
    a, b, c = ((t,) if not ent else t for t in (a, b, c))
    rl, re = naive_logprobs(x.double(), y, temp)
    for ta, tb, tc, truth in zip(a, b, c, (rl, re)):
        assert tb.dtype == torch.float32 and tb.shape == y.shape and not tb.requires_grad
        assert torch.equal(ta.detach(), tb) and torch.equal(tb, tc)  # the same statistics code, bit for bit
        assert rel(tb, truth) < 1e-5
    assert (b[0][y == -100] == 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nograd_masked_vocabulary_minus_inf(monkeypatch):
    """-inf logits: exp(-inf) * (-inf) must not turn the entropy into nan (torch path, no grad)."""
    x, y = draw((19,), 400, torch.float32, seed=12)
    dead = torch.zeros(400, dtype=torch.bool)
    dead[torch.randperm(400, generator=torch.Generator().manual_seed(13))[:150]] = True
    keep = (~dead).nonzero().squeeze(1)
    y = keep[torch.randint(0, keep.numel(), (19,), generator=torch.Generator().manual_seed(14))].to(DEV)
    x[:, dead.to(DEV)] = float("-inf")
    _no_function(monkeypatch)
    with torch.no_grad():
        for temp in (1.0, 0.6):
            lp, en = logprobs_from_logits(x, y, temp, True, backend="torch")
            rl, re = naive_logprobs(x[:, keep.to(DEV)].double(), torch.searchsorted(keep.to(DEV), y), temp)
            assert rel(lp, rl) < 1e-5 and rel(en, re) < 1e-5


def test_nograd_reads_sliced_logits_in_place(monkeypatch):
    """logits[:, :-1] (rows that no view can flatten) is read where it lies: no [T, V] copy."""
    full, y = draw((3, 17), 300, torch.float32, seed=15)
    sliced = full[:, :-1]
    y = y[:, :-1]
    seen = []
    real = reference.torch_stats

    def spy(x, *a, **k):
        seen.append(x)
        return real(x, *a, **k)

    monkeypatch.setattr(reference, "torch_stats", spy)
    with torch.no_grad():
        lp, en = logprobs_from_logits(sliced, y, 0.8, True, backend="torch")
    assert seen and all(x.untyped_storage().data_ptr() == full.untyped_storage().data_ptr() for x in seen)
    rl, re = naive_logprobs(sliced.double(), y, 0.8)
    assert lp.shape == y.shape and rel(lp, rl) < 1e-5 and rel(en, re) < 1e-5


def test_chunk_budget_is_a_fraction_of_the_logits():
    """Two fp32 [rows, V] buffers stay within 2/CHUNK_FRACTION of the fp32 logits (1/32), capped at
    2 x CHUNK_BYTES; tiny inputs get at least MIN_CHUNK_BYTES per buffer."""
    for T, V in ((1024, 32768), (2048, 32768), (4096, 151936), (16384, 151936), (300, 50000)):
        rows = reference.chunk_rows(T, V)
        buf = 4 * rows * V
        assert buf <= max(reference.MIN_CHUNK_BYTES, 4 * T * V // reference.CHUNK_FRACTION, 4 * V)
        assert buf <= reference.CHUNK_BYTES
    assert reference.chunk_rows(4096, 151936) == 55  # 32 MiB per buffer at the benchmark's size
    assert reference.chunk_rows(10, 517) == 10  # everything in one chunk when it is small


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_nograd_extra_peak_memory_is_under_one_fortieth_of_naive(tmp_path):
    """Fresh processes (`megammr bench kernels`, variants naive-nograd and ours-nograd, T=2048,
    V=32768 fp32: 256 MiB of logits, temperature 0.7), extra peak RSS above the inputs.

    The criterion is relative to the logits' size, not to naive's measured figure alone: naive
    must make at least 2 [T, V] fp32 tensors (the scaled logits and the log-softmax, then exp and
    the product for the entropy; it measures 3.0x), and ours must stay under 1/20 of the logits
    (it holds two 4 MiB buffers, 1/32 of them, plus [T]-sized vectors: ~8 of 12.8 MiB). Together
    they imply ours <= naive / 40 with a margin that allocator noise of a few MiB cannot flip.
    One-time first-call costs (code paged in) are excluded by the benchmark's warm-up call.
    """
    out = tmp_path / "k.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "megammr.cli", "bench", "kernels", "-T", "2048", "-V", "32768",
                        "--variants", "naive-nograd,ours-nograd", "--json", str(out)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["cpu"]["rows"]}
    naive, ours = rows["naive-nograd"], rows["ours-nograd"]
    assert naive["extra_over_logits"] >= 2.0, naive
    assert ours["extra_over_logits"] <= 1 / 20, ours
    assert ours["ratio_vs_naive"] >= 40, ours
    assert ours["rel_err"] < 1e-5, ours
