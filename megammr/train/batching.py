"""Samples -> right-padded micro-batches for the Megatron train step.

A sample is one (prompt, response) sequence. The model reads prompt + response without its last
token and predicts the next token at every position, so response token k is scored at position
len(prompt) - 1 + k: labels are the input shifted by one, and the loss mask covers exactly the
response positions (prompt, padding and filler rows are masked out; labels there are -100).

Why right padding and attention_mask=None: with megatron-core's local layer spec a padding-only
mask would drop causality, while right padding under a causal mask cannot change any real
position (padding comes after every real token). M-RoPE positions skip padding (value 0).

Micro-batches group sequences by length (longest first) under a token budget counted with
padding (rows x longest row). Under pipeline parallelism megatron's p2p communication needs one
shape for every micro-batch: then all are [micro_batch_size, longest sequence of the step], the
last one filled with masked rows.

Packed (THD) micro-batches (`train.pack_sequences`) hold their sequences back to back in one row
[1, T] instead: no row is padded to the longest. Each sequence is padded at its own end to
`multiple` tokens (FP8 GEMMs need token counts divisible by 16); `cu_seqlens` / `cu_seqlens_padded`
give the real and padded sequence boundaries that megatron's PackedSeqParams carries to the
attention (every sequence attends only to itself, causally) and to the rotary embedding (the
M-RoPE positions of each sequence are its own, starting at 0). Under pipeline parallelism every
pack is padded to the fullest pack of the step (the tail padding belongs to the last sequence);
the packs are then filled first-fit up to a padded micro-batch's token count (`plan_packs`).
Labels, loss mask, engine log-probs and advantages (per token here) line up as in the padded rows,
so the loss sums are the same; `seq_ids` says which sequence each token belongs to (seq_mean).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megammr.models.vlm import mrope_position_ids

IGNORE = -100


@dataclass
class Sample:
    """One sequence the trainer learns from (plain data; tensors on CPU)."""
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    rollout_logp: list[float]                     # the engine's log-probs of response_ids
    pixel_values: Optional[torch.Tensor] = None   # [patches, C*T*P*P] of this prompt's images
    image_grid_thw: Optional[torch.Tensor] = None  # [n_images, 3]

    @property
    def length(self) -> int:
        """Input positions: prompt + response minus the last token (it has nothing to predict)."""
        return len(self.prompt_ids) + len(self.response_ids) - 1


@dataclass
class MicroBatch:
    input_ids: torch.Tensor          # [b, s]
    position_ids: torch.Tensor       # [3, b, s] M-RoPE
    labels: torch.Tensor             # [b, s] next token at response positions, else -100
    loss_mask: torch.Tensor          # [b, s] float32
    advantages: torch.Tensor         # [b] float32
    rollout_logp: torch.Tensor       # [b, s] engine log-probs aligned with labels (0 outside the mask)
    rows: list[int]                  # sample index of each row (of each sequence when packed), -1 for a filler row
    real_positions: int = 0          # input positions that hold a sample's token (the rest is padding)
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    old_logp: Optional[torch.Tensor] = None   # filled by a forward-only pass when needed (last stage)
    ref_logp: Optional[torch.Tensor] = None
    # packed (THD) micro-batches only (b = 1; advantages are then per token, [1, T]):
    cu_seqlens: Optional[torch.Tensor] = None         # [n + 1] int32, real sequence boundaries
    cu_seqlens_padded: Optional[torch.Tensor] = None  # [n + 1] int32, boundaries with each sequence's padding
    max_seqlen: int = 0                               # longest padded sequence
    seq_ids: Optional[torch.Tensor] = None            # [1, T] sequence index of every token
    extra: dict = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def sequences_with_loss(self) -> torch.Tensor:
        """How many sequences have at least one loss token (the seq_mean divisor's share)."""
        if self.seq_ids is None:
            return (self.loss_mask.sum(1) > 0).sum()
        per_seq = torch.zeros(len(self.cu_seqlens) - 1, dtype=self.loss_mask.dtype, device=self.loss_mask.device)
        per_seq.scatter_add_(0, self.seq_ids.reshape(-1), self.loss_mask.reshape(-1))
        return (per_seq > 0).sum()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device) -> "MicroBatch":
        for name in ("input_ids", "position_ids", "labels", "loss_mask", "advantages", "rollout_logp",
                     "pixel_values", "image_grid_thw", "old_logp", "ref_logp", "cu_seqlens", "cu_seqlens_padded",
                     "seq_ids"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device, non_blocking=True))
        return self


def plan_micro_batches(lengths: list[int], *, micro_batch_size: int, max_tokens: Optional[int],
                       fixed_shape: bool) -> list[list[int]]:
    """Indices of the samples of each micro-batch (longest first), see the module docstring."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not order:
        return []
    if fixed_shape:
        longest = lengths[order[0]]
        rows = micro_batch_size if max_tokens is None else max(1, min(micro_batch_size, max_tokens // longest))
        return [order[i:i + rows] for i in range(0, len(order), rows)]
    plans, cur = [], []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]  # sorted: the first row is the longest
        full = len(cur) >= micro_batch_size if max_tokens is None else (len(cur) + 1) * longest > max_tokens
        if cur and full:
            plans.append(cur)
            cur = []
        cur.append(i)
    plans.append(cur)
    return plans


def make_micro_batches(samples: list[Sample], backbone, *, pad_id: int, micro_batch_size: int,
                       max_tokens: Optional[int] = None, fixed_shape: bool = False) -> list[MicroBatch]:
    """Right-padded micro-batches of `samples`; every sample lands in exactly one row."""
    lengths = _checked_lengths(samples)
    plans = plan_micro_batches(lengths, micro_batch_size=micro_batch_size, max_tokens=max_tokens,
                               fixed_shape=fixed_shape)
    width = max(lengths) if (fixed_shape and lengths) else None
    out = []
    for plan in plans:
        rows = list(plan)
        if fixed_shape:
            rows += [-1] * (len(plans[0]) - len(rows))
        s_len = width or max(lengths[i] for i in plan)
        b = len(rows)
        ids = torch.full((b, s_len), pad_id, dtype=torch.long)
        labels = torch.full((b, s_len), IGNORE, dtype=torch.long)
        mask = torch.zeros(b, s_len, dtype=torch.float32)
        attn = torch.zeros(b, s_len, dtype=torch.long)
        rlogp = torch.zeros(b, s_len, dtype=torch.float32)
        adv = torch.zeros(b, dtype=torch.float32)
        pixels, grids = [], []
        for r, i in enumerate(rows):
            if i < 0:
                continue
            s = samples[i]
            full = s.prompt_ids + s.response_ids
            n, p = len(full) - 1, len(s.prompt_ids)
            ids[r, :n] = torch.tensor(full[:-1])
            attn[r, :n] = 1
            labels[r, p - 1:n] = torch.tensor(s.response_ids)
            mask[r, p - 1:n] = 1.0
            rlogp[r, p - 1:n] = torch.tensor(s.rollout_logp, dtype=torch.float32)
            adv[r] = s.advantage
            if s.pixel_values is not None:
                pixels.append(s.pixel_values)
                grids.append(s.image_grid_thw)
        grid = torch.cat(grids) if grids else None
        out.append(MicroBatch(
            input_ids=ids, position_ids=mrope_position_ids(ids, backbone, grid, attn), labels=labels,
            loss_mask=mask, advantages=adv, rollout_logp=rlogp, rows=rows, real_positions=sum(lengths[i] for i in plan),
            pixel_values=torch.cat(pixels) if pixels else None, image_grid_thw=grid))
    return out


def _checked_lengths(samples: list[Sample]) -> list[int]:
    for i, s in enumerate(samples):
        if not s.response_ids:
            raise ValueError(f"sample {i} has an empty response: nothing to learn from")
        if len(s.rollout_logp) != len(s.response_ids):
            raise ValueError(f"sample {i}: {len(s.rollout_logp)} engine log-probs for {len(s.response_ids)} tokens")
    return [s.length for s in samples]


def plan_packs(lengths: list[int], *, micro_batch_size: int, max_tokens: Optional[int],
               fixed_shape: bool = False) -> list[list[int]]:
    """Indices of the sequences of each pack, longest first.

    Free shapes: up to micro_batch_size sequences per pack (the padded path's grouping), or with a
    budget as many as fit in max_tokens tokens; a longer sequence is packed alone. Fixed shapes
    (pipeline parallelism: every pack is padded to the fullest one): first-fit decreasing into
    packs of max_tokens, or of the padded path's micro-batch (micro_batch_size x longest) tokens,
    so that no pack holds more tokens than a padded micro-batch and few positions are padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if fixed_shape and order:
        cap = max(max_tokens or micro_batch_size * lengths[order[0]], lengths[order[0]])
        bins, used = [], []
        for i in order:
            k = next((k for k, u in enumerate(used) if u + lengths[i] <= cap), None)
            if k is None:
                bins.append([])
                used.append(0)
                k = len(bins) - 1
            bins[k].append(i)
            used[k] += lengths[i]
        return bins
    plans, cur, used = [], [], 0
    for i in order:
        full = len(cur) >= micro_batch_size if max_tokens is None else used + lengths[i] > max_tokens
        if cur and full:
            plans.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    return plans + [cur] if cur else plans


def make_packed_micro_batches(samples: list[Sample], backbone, *, pad_id: int, micro_batch_size: int,
                              max_tokens: Optional[int] = None, fixed_shape: bool = False,
                              multiple: int = 1) -> list[MicroBatch]:
    """Packed (THD) micro-batches of `samples` (module docstring); every sample is in exactly one pack."""
    multiple = max(1, int(multiple))
    lengths = _checked_lengths(samples)
    padded = [n + (-n % multiple) for n in lengths]
    plans = plan_packs(padded, micro_batch_size=micro_batch_size, max_tokens=max_tokens, fixed_shape=fixed_shape)
    totals = [sum(padded[i] for i in plan) for plan in plans]
    out = []
    for plan, total in zip(plans, totals):
        t_len = max(totals) if fixed_shape else total
        ids = torch.full((1, t_len), pad_id, dtype=torch.long)
        labels = torch.full((1, t_len), IGNORE, dtype=torch.long)
        mask, rlogp, adv = (torch.zeros(1, t_len, dtype=torch.float32) for _ in range(3))
        pos = torch.zeros(3, 1, t_len, dtype=torch.long)
        seq_ids = torch.zeros(1, t_len, dtype=torch.long)
        cu_pad, pixels, grids = [0], [], []
        for k, i in enumerate(plan):
            s, a = samples[i], cu_pad[-1]
            full = s.prompt_ids + s.response_ids
            n, p = len(full) - 1, len(s.prompt_ids)
            end = t_len if k == len(plan) - 1 else a + padded[i]  # the pack's tail padding: last sequence
            ids[0, a:a + n] = torch.tensor(full[:-1])
            labels[0, a + p - 1:a + n] = torch.tensor(s.response_ids)
            mask[0, a + p - 1:a + n] = 1.0
            rlogp[0, a + p - 1:a + n] = torch.tensor(s.rollout_logp, dtype=torch.float32)
            adv[0, a:end] = s.advantage
            seq_ids[0, a:end] = k
            pos[:, :, a:a + n] = mrope_position_ids(ids[:, a:a + n], backbone, s.image_grid_thw)
            cu_pad.append(end)
            if s.pixel_values is not None:
                pixels.append(s.pixel_values)
                grids.append(s.image_grid_thw)
        # cu_seqlens (real) counts only real tokens, back to back, as TE's THD format defines it
        real = torch.tensor([0] + [lengths[i] for i in plan]).cumsum(0).to(torch.int32)
        cu_pad_t = torch.tensor(cu_pad, dtype=torch.int32)
        out.append(MicroBatch(
            input_ids=ids, position_ids=pos, labels=labels, loss_mask=mask, advantages=adv, rollout_logp=rlogp,
            rows=list(plan), real_positions=int(real[-1]), pixel_values=torch.cat(pixels) if pixels else None,
            image_grid_thw=torch.cat(grids) if grids else None, cu_seqlens=real, cu_seqlens_padded=cu_pad_t,
            max_seqlen=int((cu_pad_t[1:] - cu_pad_t[:-1]).max()), seq_ids=seq_ids))
    return out


def pad_to_multiple(mb: MicroBatch, multiple: int) -> MicroBatch:
    """Right-pad `mb` in place so that its sequence length is a multiple of `multiple` (FP8 GEMMs
    need token counts divisible by 16). The new positions are padding like any other: label -100,
    loss mask 0, position 0, after every real token under the causal mask, so no real position
    changes. Idempotent; log-probs already attached (old/ref) are padded with zeros too."""
    s = mb.input_ids.shape[1]
    extra = -s % max(1, int(multiple))
    if not extra:
        return mb

    def grow(t, value):
        if t is None:
            return None
        pad = torch.full((*t.shape[:-1], extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([t, pad], dim=-1)

    mb.input_ids = grow(mb.input_ids, int(mb.input_ids[0, -1]) if mb.input_ids.numel() else 0)
    mb.position_ids = grow(mb.position_ids, 0)
    mb.labels = grow(mb.labels, IGNORE)
    for name in ("loss_mask", "rollout_logp", "old_logp", "ref_logp"):
        setattr(mb, name, grow(getattr(mb, name), 0))
    return mb


def filler_micro_batch(backbone, *, pad_id: int, rows: int = 1, seq: int = 1) -> MicroBatch:
    """A fully masked micro-batch: a rank with no sample this step still runs the collective step."""
    ids = torch.full((rows, seq), pad_id, dtype=torch.long)
    z = torch.zeros(rows, seq)
    return MicroBatch(input_ids=ids, position_ids=torch.zeros(3, rows, seq, dtype=torch.long),
                      labels=torch.full((rows, seq), IGNORE, dtype=torch.long), loss_mask=z.clone(),
                      advantages=torch.zeros(rows), rollout_logp=z.clone(), rows=[-1] * rows)
