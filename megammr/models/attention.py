"""Core attention of the local (pure-torch) decoder layer: torch's fused scaled_dot_product_attention.

megatron-core's local DotProductAttention is unfused: it materialises the [b*heads, s, s] scores,
builds a causal mask, softmaxes and keeps the probabilities for backward. On CPU that was half of
the tiny model's forward and most of its backward. `SDPADotProductAttention` computes the same
causal softmax(Q K^T * softmax_scale) V in one fused kernel (what transformers' Qwen2.5-VL uses
too), in the plain case megammr runs; anything else goes to megatron's own forward, unchanged.
tests/unit/test_attention.py checks it against a float64 computation and megatron's class.

Packed (THD) sequences (megatron's PackedSeqParams, qkv_format "thd": [t, heads, head_dim], batch
squeezed by megatron) are megatron's local attention's gap (it asserts they are absent): here each
sequence, between the padded boundaries `cu_seqlens_q_padded`, attends causally to itself only.
A sequence's own tail padding comes after its real tokens, so it changes none of them. This keeps
`train.pack_sequences` exact on CPU and with the local spec; with TE, TEDotProductAttention does it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    """DotProductAttention's interface: [s, b, heads, head_dim] in, [s, b, heads * head_dim] out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # What the fused path does not reproduce: query-key layer scaling (megatron divides
        # softmax_scale by the layer number and multiplies it back inside its softmax), a sliding
        # window, a softmax offset. Those configurations keep megatron's forward.
        c = self.config
        self._fusable = (not c.apply_query_key_layer_scaling and c.window_size is None
                         and c.softmax_type == "vanilla")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        plain = self._plain_causal(attention_mask, mask_type, attention_bias)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if not plain:
                raise ValueError("packed (THD) sequences with the local layer spec support plain causal attention "
                                 "only (no mask, bias, dropout, sliding window or query-key layer scaling); use "
                                 "model.layer_spec=te or train.pack_sequences=false")
            return self._packed(query, key, value, packed_seq_params)
        if not plain or packed_seq_params is not None or query.shape[0] != key.shape[0]:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        sq, b, heads, hd = query.shape
        out = self._sdpa(*(t.permute(1, 2, 0, 3) for t in (query, key, value)))  # [s, b, n, d] -> [b, n, s, d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hd)

    def _plain_causal(self, attention_mask, mask_type, attention_bias) -> bool:
        """The case the fused kernel computes exactly: causal, no explicit mask or bias, no dropout."""
        return (self._fusable and attention_mask is None and mask_type == AttnMaskType.causal
                and attention_bias is None and (self.attention_dropout.p == 0 or not self.training))

    def _sdpa(self, q, k, v):
        """Causal SDPA on [b, n, s, d]; key/value groups repeated along the heads as megatron does."""
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=self.softmax_scale)

    def _packed(self, query, key, value, params):
        """[t, n, d] packed sequences: each between its padded boundaries, on its own."""
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        bounds = [int(x) for x in cu.tolist()]
        t, heads, hd = query.shape
        if bounds[0] != 0 or bounds[-1] != t:
            raise ValueError(f"packed sequence boundaries {bounds[0]}..{bounds[-1]} do not cover the {t} tokens")
        outs = [self._sdpa(*(x[a:b].transpose(0, 1).unsqueeze(0) for x in (query, key, value))).squeeze(0)
                for a, b in zip(bounds[:-1], bounds[1:])]  # [n, s_i, d] each
        return torch.cat(outs, dim=1).transpose(0, 1).reshape(t, heads * hd)
