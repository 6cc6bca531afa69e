"""Qwen2.5-VL vision tower and patch merger, written natively in torch.

Replicated on every tensor-parallel rank, not TP-sharded. Why:
- it is small next to the decoder (669M parameters for every Qwen2.5-VL size, 1 to 9 % of the model)
  and runs once per image, while the decoder runs over prompt + response tokens;
- every TP rank receives the same pixels, so a replicated tower computes identical activations and,
  because megatron's column-parallel input layers all-reduce the gradient flowing back into the
  (replicated) decoder input, identical gradients: no extra communication and no TP-averaging hook;
- its 16 heads and windowed variable-length attention would need their own sharded attention kernel
  for little gain; megatron-bridge makes the same choice (HF tower replicated, Megatron GPT decoder).
It lives on the first pipeline stage only (it feeds the embedding). With sequence parallelism the
merged features would need a scatter; this project does not enable sequence parallelism (it needs
TE or apex norms) and megammr.models.vlm refuses the combination.

Parameter names equal the HF checkpoint's `visual.*` names minus the prefix, so the HF<->Megatron
mapping of the tower is a rename. Numerics follow transformers' implementation: RMSNorm and rotary
in fp32, exact GELU in the merger, attention restricted to windows (cu_window_seqlens) except in
the `fullatt_block_indexes` blocks, which attend within each whole image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megammr.backbones import VisionSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over (temporal, patch, patch): a linear map of each flattened patch."""

    def __init__(self, v: VisionSpec):
        super().__init__()
        self.proj = nn.Conv3d(v.in_channels, v.hidden_size, kernel_size=(v.temporal_patch_size, v.patch_size, v.patch_size),
                              stride=(v.temporal_patch_size, v.patch_size, v.patch_size), bias=False)

    def forward(self, x):
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cu_seqlens: list[int], cos, sin):
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, n, d]
        # Attention inside one window / one image only. torch.split, not q[:, s:e]: the backward of
        # each slice allocates and adds a gradient of the whole [heads, n, d] tensor (quadratic in
        # the number of windows: most of a 32-image train step on CPU); split's backward is one cat.
        sizes = [e - s for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
        outs = [F.scaled_dot_product_attention(qi, ki, vi)
                for qi, ki, vi in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1)) if qi.shape[1]]
        o = torch.cat(outs, dim=1).transpose(0, 1).reshape(n, -1)
        return self.proj(o)


def _rotate(x, cos, sin):
    dtype = x.dtype
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return (x * cos[:, None] + rot * sin[:, None]).to(dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, v: VisionSpec):
        super().__init__()
        self.norm1 = RMSNorm(v.hidden_size, v.norm_eps)
        self.norm2 = RMSNorm(v.hidden_size, v.norm_eps)
        self.attn = Attention(v.hidden_size, v.num_heads)
        self.mlp = MLP(v.hidden_size, v.intermediate_size)

    def forward(self, x, cu_seqlens, cos, sin):
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 group of neighbouring patches concatenated and projected to the LM width."""

    def __init__(self, v: VisionSpec):
        super().__init__()
        self.merged = v.hidden_size * v.spatial_merge_size ** 2
        self.ln_q = RMSNorm(v.hidden_size, v.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(self.merged, self.merged), nn.GELU(), nn.Linear(self.merged, v.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.merged))


def _positions(grid_thw: torch.Tensor, m: int) -> torch.Tensor:
    """(h, w) patch coordinates in the processor's order: merge blocks of m x m patches, row-major."""
    out = []
    for t, h, w in grid_thw.tolist():
        hp = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m).transpose(1, 2).flatten()
        wp = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m).transpose(1, 2).flatten()
        out.append(torch.stack([hp, wp], dim=-1).repeat(t, 1))
    return torch.cat(out)


def _windows(grid_thw: torch.Tensor, v: VisionSpec) -> tuple[torch.Tensor, list[int], list[int]]:
    """Order of merge units grouped by window, window boundaries and whole-image boundaries (in patches)."""
    m = v.spatial_merge_size
    unit = m * m
    win = v.window_size // m // v.patch_size  # window side in merge units
    order, cu_win, cu_full, base = [], [0], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // m, w // m
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        nh, nw = -(-gh // win), -(-gw // win)
        for ti in range(t):
            for a in range(nh):
                for b in range(nw):
                    cell = idx[ti, a * win:(a + 1) * win, b * win:(b + 1) * win].reshape(-1)
                    order.append(cell + base)
                    cu_win.append(cu_win[-1] + cell.numel() * unit)
            cu_full.append(cu_full[-1] + h * w)  # full attention: each frame of each image alone
        base += t * gh * gw
    return torch.cat(order), cu_win, cu_full


class VisionTower(nn.Module):
    """pixel_values [n_patches, C*T*P*P] + image_grid_thw [n_images, 3] -> merged features [n_patches/4, out]."""

    def __init__(self, v: VisionSpec):
        super().__init__()
        self.spec = v
        self.patch_embed = PatchEmbed(v)
        self.blocks = nn.ModuleList([Block(v) for _ in range(v.depth)])
        self.merger = PatchMerger(v)
        head_dim = v.hidden_size // v.num_heads
        half = head_dim // 2
        # Not a parameter and not in checkpoints: recomputed, kept in fp32.
        self.register_buffer("inv_freq", 1.0 / (v.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half)),
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        v = self.spec
        unit = v.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        order, cu_win, cu_full = _windows(grid_thw.cpu(), v)
        order = order.to(x.device)
        x = x.reshape(n // unit, unit, -1)[order].reshape(n, -1)

        pos = _positions(grid_thw.cpu(), v.spatial_merge_size).to(x.device)
        inv_freq = self.inv_freq.to(x.device) if self.inv_freq.device.type != "meta" else self.inv_freq
        freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [n, head_dim/2]: h freqs then w freqs
        emb = torch.cat([freqs, freqs], dim=-1)
        emb = emb.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        cos, sin = emb.cos(), emb.sin()

        full = set(v.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_full if i in full else cu_win, cos, sin)
        merged = self.merger(x)
        return merged[torch.argsort(order)]


__all__ = ["VisionTower"]
