"""Packed (THD) micro-batches: the layout and positions against hand-built expectations, and the
local spec's packed attention / the tiny model's packed log-probs against the padded path and a
float64 computation. The full GRPO update, packed versus padded, at TP=1 and TP=2xPP=2 and against
transformers in float64 is in tests/dist/test_trainer_parity.py."""
import torch

from conftest import free_port, run_python
from megammr.backbones import get_backbone
from megammr.train.batching import IGNORE, Sample, make_micro_batches, make_packed_micro_batches, plan_packs

BB = get_backbone("tiny")
P = 0  # pad id


def samples():
    return [Sample([1, 2, 3], [4, 5], 0.5, [-0.1, -0.2]),    # 4 input positions
            Sample([6, 7], [8], -1.0, [-0.3]),                # 2
            Sample([9], [10, 11, 12], 2.0, [-0.4, -0.5, -0.6])]  # 3


def test_sequences_back_to_back_with_their_own_positions():
    a, c = make_packed_micro_batches(samples(), BB, pad_id=P, micro_batch_size=2)
    # longest first: A (4) and C (3) share the first pack, B the second
    assert a.rows == [0, 2] and c.rows == [1]
    assert a.input_ids.tolist() == [[1, 2, 3, 4, 9, 10, 11]]
    assert a.labels.tolist() == [[IGNORE, IGNORE, 4, 5, 10, 11, 12]]
    assert a.loss_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1]]
    assert a.rollout_logp.tolist() == [[0, 0, -0.1, -0.2, -0.4, -0.5, -0.6]] or torch.allclose(
        a.rollout_logp, torch.tensor([[0, 0, -0.1, -0.2, -0.4, -0.5, -0.6]]))
    assert a.advantages.tolist() == [[0.5] * 4 + [2.0] * 3]
    assert a.seq_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert a.cu_seqlens.tolist() == [0, 4, 7] and a.cu_seqlens_padded.tolist() == [0, 4, 7]
    assert a.cu_seqlens.dtype == torch.int32 and a.max_seqlen == 4
    assert a.position_ids.tolist() == [[[0, 1, 2, 3, 0, 1, 2]]] * 3  # each sequence starts at 0
    assert c.input_ids.tolist() == [[6, 7]] and c.labels.tolist() == [[IGNORE, 8]]


def test_each_sequence_padded_to_the_multiple_and_fixed_shapes_under_pp():
    packs = make_packed_micro_batches(samples(), BB, pad_id=P, micro_batch_size=2, multiple=4, fixed_shape=True)
    # padded lengths 4, 4, 4: ties keep sample order, so A+B, then C alone, padded to the same 8 tokens
    assert [p.rows for p in packs] == [[0, 1], [2]]
    a, c = packs
    assert a.input_ids.tolist() == [[1, 2, 3, 4, 6, 7, P, P]]
    assert a.labels.tolist() == [[IGNORE, IGNORE, 4, 5, IGNORE, 8, IGNORE, IGNORE]]
    assert a.cu_seqlens.tolist() == [0, 4, 6] and a.cu_seqlens_padded.tolist() == [0, 4, 8]
    assert a.position_ids[0].tolist() == [[0, 1, 2, 3, 0, 1, 0, 0]]
    assert a.seq_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    # the pack's tail padding belongs to its last sequence: the rotary offsets need cu_padded[-1] == T
    assert c.shape == (1, 8) and c.cu_seqlens.tolist() == [0, 3] and c.cu_seqlens_padded.tolist() == [0, 8]
    assert c.loss_mask.sum() == 3 and c.max_seqlen == 8


def test_token_budget_counts_real_and_padding_tokens():
    # longest first, a new pack when the next sequence would overflow the budget
    assert plan_packs([5, 3, 2, 2], micro_batch_size=99, max_tokens=7) == [[0], [1, 2, 3]]
    assert plan_packs([4, 3, 2, 1], micro_batch_size=2, max_tokens=None) == [[0, 1], [2, 3]]
    assert plan_packs([9, 1], micro_batch_size=99, max_tokens=4) == [[0], [1]]  # too long: alone
    assert plan_packs([], micro_batch_size=2, max_tokens=None) == []


def test_fixed_shapes_fill_packs_first_fit_up_to_a_padded_micro_batch():
    # pipeline parallelism: packs of at most micro_batch_size x longest (here 2 x 6) tokens, first fit
    lengths = [6, 5, 4, 3, 2, 2]
    plans = plan_packs(lengths, micro_batch_size=2, max_tokens=None, fixed_shape=True)
    assert plans == [[0, 1], [2, 3, 4, 5]]  # 6+5, 4+3+2+2: 2 packs of width 11 vs 3 padded rows pairs of 6
    packed_positions = len(plans) * max(sum(lengths[i] for i in p) for p in plans)
    assert packed_positions == 22 < 3 * 2 * 6  # the padded path: 3 micro-batches of 2 x 6
    assert plan_packs(lengths, micro_batch_size=2, max_tokens=8, fixed_shape=True) == [[0, 4], [1, 3], [2, 5]]


def test_image_positions_and_pixels_equal_the_padded_rows():
    img = BB.image_token_id
    grid = torch.tensor([[1, 4, 6]])  # 1 x (4/2) x (6/2) = 6 merged tokens
    px = torch.randn(24, 3 * 2 * 14 * 14)
    ss = [Sample([1, img, img, img, img, img, img, 2], [3, 4, 5], 1.0, [-1.0] * 3, px, grid),
          Sample([7, 8], [9], 0.0, [-1.0]),
          Sample([5, img, img, img, img, img, img], [6], -1.0, [-1.0], px * 2, grid)]
    (pack,) = make_packed_micro_batches(ss, BB, pad_id=P, micro_batch_size=3)
    rows = make_micro_batches(ss, BB, pad_id=P, micro_batch_size=3)[0]
    for k, i in enumerate(pack.rows):
        a, b = int(pack.cu_seqlens[k]), int(pack.cu_seqlens[k + 1])
        r = rows.rows.index(i)
        n = b - a
        assert torch.equal(pack.position_ids[:, 0, a:b], rows.position_ids[:, r, :n])
        assert torch.equal(pack.input_ids[0, a:b], rows.input_ids[r, :n])
        assert torch.equal(pack.labels[0, a:b], rows.labels[r, :n])
    # image features are scattered in token order: pixels follow the pack's sequence order
    assert torch.equal(pack.pixel_values, torch.cat([ss[i].pixel_values for i in pack.rows if ss[i].pixel_values is not None]))


_WORKER = r"""
import json, math, sys, torch
from megammr import runtime
from megammr.config import ModelConfig, load_recipe
r = load_recipe(None, ["model.precision=fp32"])
runtime.init(r, environ=dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1]))
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megammr.models.attention import SDPADotProductAttention
from megammr.backbones import get_backbone
from megammr.models.vlm import build_model, transformer_config

bb = get_backbone("tiny")
cfg = transformer_config(bb, 1, 1, ModelConfig(precision="fp32"), perform_initialization=False)
heads, groups, d = bb.num_heads, bb.num_kv_heads, bb.head_dim
g = torch.Generator().manual_seed(0)
res = {}

# 1. attention: three packed sequences (one with tail padding) vs float64, each sequence on its own
bounds = [0, 5, 6, 15]  # sequences of 5, 1 and 9 tokens
t = bounds[-1]
q = torch.randn(t, heads, d, generator=g, dtype=torch.float64)
k = torch.randn(t, groups, d, generator=g, dtype=torch.float64)
v = torch.randn(t, groups, d, generator=g, dtype=torch.float64)
ref = []
for a, b in zip(bounds[:-1], bounds[1:]):
    kk, vv = (x[a:b].repeat_interleave(heads // groups, dim=1) for x in (k, v))
    s = torch.einsum("qnd,knd->nqk", q[a:b], kk) / math.sqrt(d)
    s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
    ref.append(torch.einsum("nqk,knd->qnd", s.softmax(-1), vv).reshape(b - a, heads * d))
ref = torch.cat(ref)
cu = torch.tensor(bounds, dtype=torch.int32)
params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                         cu_seqlens_kv_padded=cu, max_seqlen_q=9, max_seqlen_kv=9)
att = SDPADotProductAttention(cfg, 1, AttnMaskType.causal, "self")
out = att(q.float(), k.float(), v.float(), attention_mask=None, packed_seq_params=params)
res["attention"] = float((out.double() - ref).abs().max() / ref.abs().max())

# 2. the tiny model: packed log-probs (text and image sequences, padding to 16 per sequence) equal
#    the padded path's, sequence by sequence
sys.path.insert(0, "tests")
from packing_cases import packed_vs_padded_logprobs, packing_samples
torch.manual_seed(0)
model = build_model(bb, r.model, perform_initialization=True)
model.eval()
pad, pack, packed = packed_vs_padded_logprobs(model, packing_samples(bb), multiple=16)
res["logprobs"] = max(float((x - y).abs().max()) for x, y in zip(pad, pack))
res["tokens"] = packed.shape[1]
print("RESULT " + json.dumps(res))
runtime.shutdown()
"""


def test_packed_attention_and_model_log_probs_equal_the_padded_path():
    got = run_python(_WORKER, str(free_port()))
    assert got["attention"] < 1e-6, got
    assert got["logprobs"] < 1e-5, got
    assert got["tokens"] % 16 == 0, got
