"""The local layer spec's core attention (torch SDPA) computes what megatron's DotProductAttention
computes: causal softmax(Q K^T / sqrt(d)) V with grouped-query heads, checked against a float64
computation written out here (outputs and the gradients of Q, K, V) and against megatron's own class
in fp32; inputs outside its plain causal case (an explicit mask) take megatron's own forward."""
from conftest import free_port, run_python

_WORKER = r"""
import json, math, sys, torch
from megammr import runtime
from megammr.config import load_recipe
runtime.init(load_recipe(None, []), environ=dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                                 MASTER_PORT=sys.argv[1]))
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megammr.models.attention import SDPADotProductAttention
from megammr.backbones import get_backbone
from megammr.models.vlm import transformer_config
from megammr.config import ModelConfig

bb = get_backbone("tiny")
cfg = transformer_config(bb, 1, 1, ModelConfig(precision="fp32"), perform_initialization=False)
heads, groups, d = bb.num_heads, bb.num_kv_heads, bb.head_dim
assert heads // groups > 1, "the tiny backbone exercises grouped-query attention"

def reference64(q, k, v):  # [s, b, n, d] float64, causal, kv heads repeated
    s = q.shape[0]
    k = k.repeat_interleave(heads // groups, dim=2)
    v = v.repeat_interleave(heads // groups, dim=2)
    scores = torch.einsum("qbnd,kbnd->bnqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bnqk,kbnd->qbnd", scores.softmax(-1), v).reshape(s, q.shape[1], heads * d)

g = torch.Generator().manual_seed(0)
s, b = 37, 3
q = torch.randn(s, b, heads, d, generator=g)
k = torch.randn(s, b, groups, d, generator=g)
v = torch.randn(s, b, groups, d, generator=g)
w = torch.randn(s, b, heads * d, generator=g)  # a random cotangent
out = {}
for name, cls in (("sdpa", SDPADotProductAttention), ("megatron", DotProductAttention)):
    att = cls(cfg, 1, AttnMaskType.causal, "self")
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    y = att(*x, attention_mask=None)
    (y * w).sum().backward()
    out[name] = [y.detach()] + [t.grad for t in x]
x = [t.double().requires_grad_() for t in (q, k, v)]
y = reference64(*x)
(y * w.double()).sum().backward()
ref = [y.detach()] + [t.grad for t in x]
res = {}
for name in out:
    res[name] = [float((a.double() - r).abs().max() / r.abs().max()) for a, r in zip(out[name], ref)]
res["sdpa_vs_megatron"] = [float((a - m).abs().max()) for a, m in zip(out["sdpa"], out["megatron"])]
# bf16: megatron rounds scores and probabilities to bf16, the fused kernel only its output
cfg16 = transformer_config(bb, 1, 1, ModelConfig(precision="bf16"), perform_initialization=False)
for name, cls in (("sdpa", SDPADotProductAttention), ("megatron", DotProductAttention)):
    y = cls(cfg16, 1, AttnMaskType.causal, "self")(q.bfloat16(), k.bfloat16(), v.bfloat16(), attention_mask=None)
    res[name + "_bf16"] = float((y.double() - ref[0]).abs().max() / ref[0].abs().max())
# an explicit mask is not the fused path's case: megatron's forward runs, with its result
att = SDPADotProductAttention(cfg, 1, AttnMaskType.causal, "self")
mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None].expand(b, 1, s, s)
ref_att = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
fallback = float((att(q, k, v, attention_mask=mask) - ref_att(q, k, v, attention_mask=mask)).abs().max())
print("RESULT " + json.dumps(dict(res=res, fallback=fallback)))
runtime.shutdown()
"""


def test_sdpa_attention_equals_float64_and_megatron_dot_product_attention():
    got = run_python(_WORKER, str(free_port()))
    for name in ("sdpa", "megatron"):  # output, dQ, dK, dV relative to the float64 reference
        assert max(got["res"][name]) < 1e-6, got["res"]
    assert max(got["res"]["sdpa_vs_megatron"]) < 5e-6, got["res"]
    assert got["fallback"] == 0.0
    # bf16: rounding level, and no further from the exact result than megatron's own bf16 attention
    assert got["res"]["sdpa_bf16"] < 2e-2 and got["res"]["sdpa_bf16"] <= got["res"]["megatron_bf16"], got["res"]
