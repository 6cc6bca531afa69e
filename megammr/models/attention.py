"""Core attention of the local (pure-torch) decoder layer: torch's fused scaled_dot_product_attention.

megatron-core's local DotProductAttention is unfused: it materialises the [b*heads, s, s] scores,
builds a causal mask, softmaxes and keeps the probabilities for backward. On CPU that was half of
the tiny model's forward and most of its backward. `SDPADotProductAttention` computes the same
causal softmax(Q K^T * softmax_scale) V in one fused kernel (what transformers' Qwen2.5-VL uses
too), in the plain case megammr runs; anything else goes to megatron's own forward, unchanged.
tests/unit/test_attention.py checks it against a float64 computation and megatron's class.
"""
from __future__ import annotations

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
        plain = (self._fusable and attention_mask is None and mask_type == AttnMaskType.causal
                 and attention_bias is None and packed_seq_params is None and query.shape[0] == key.shape[0]
                 and (self.attention_dropout.p == 0 or not self.training))
        if not plain:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        sq, b, heads, hd = query.shape
        # [s, b, n, d] -> [b, n, s, d]; key/value groups repeated along the heads as megatron does
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = heads // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=sq > 1, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hd)
