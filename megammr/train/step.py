"""One Megatron update on micro-batches, and forward-only log-prob passes.

Both go through megatron-core's `get_forward_backward_func()`, so TP/PP/DP behave exactly as
megatron schedules them. The loss of a micro-batch is `megammr.algo.policy_loss` on the
vocab-parallel LM-head logits, with the gradient written in place over the logits.

Loss normalisation (token_mean): the TransformerConfig has `calculate_per_token_loss=True`,
so each micro-batch returns the *sum* of its per-token losses and its token count; megatron
sums gradients over micro-batches and DP ranks (no 1/dp, no 1/num_microbatches) and
finalize_model_grads divides them by the step's token count, all-reduced over DP once. The
gradient therefore equals that of one process holding the whole step, at any layout. seq_mean
is the same with per-sequence token means summed and the sequence count as the divisor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megammr import runtime
from megammr.algo import policy_loss
from megammr.kernels import logprobs_from_logits
from megammr.models.te import fp8_pad_multiple
from megammr.train.batching import MicroBatch, pad_to_multiple

# Per-step sums reported by the last pipeline stage (index order of the packed metrics tensor).
SUM_KEYS = ("loss", "count", "tokens", "kl", "clip", "entropy", "logp_diff", "positions", "real_positions")


def _forward(model, mb: MicroBatch):
    kw = {}
    if mb.packed:
        kw["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=mb.cu_seqlens, cu_seqlens_kv=mb.cu_seqlens,
            cu_seqlens_q_padded=mb.cu_seqlens_padded, cu_seqlens_kv_padded=mb.cu_seqlens_padded,
            max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen)
    return model(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=None,
                 pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw, **kw)


def token_multiple(model) -> int:
    """The token-count multiple the model's GEMMs need: 16 for FP8 (32 for mxfp8), else 1."""
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "fp8", None):
        return 1
    return fp8_pad_multiple(getattr(cfg, "fp8_recipe", None))


def _fp8_pad(model, mbs: list[MicroBatch]) -> None:
    """FP8 GEMMs need token counts divisible by 16 (32 for mxfp8): pad every micro-batch's sequence
    in place (once; the old/ref log-prob passes and the update then see the same shapes). Packed
    micro-batches were padded per sequence when they were built (batching), never here."""
    multiple = token_multiple(model)
    if multiple == 1:
        return
    for mb in mbs:
        if not mb.packed:
            pad_to_multiple(mb, multiple)
        elif mb.shape[1] % multiple:
            raise ValueError(f"a packed micro-batch of {mb.shape[1]} tokens is not padded to the {multiple} FP8 needs "
                             "(build it with make_packed_micro_batches(multiple=token_multiple(model)))")


def _schedule(model, mbs: list[MicroBatch], forward_step, forward_only: bool, collect_non_loss: bool = False):
    _fp8_pad(model, mbs)
    dev = runtime.device()
    for mb in mbs:  # batching builds them on the CPU; the model may be on a GPU (no-op on CPU)
        mb.to(dev)
    seq, rows = mbs[0].shape[1], mbs[0].shape[0]  # shapes are fixed under PP (see batching)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(mbs), model=[model], num_microbatches=len(mbs),
        seq_length=seq, micro_batch_size=rows, forward_only=forward_only, collect_non_loss_data=collect_non_loss)


def _tp_group():
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


@torch.no_grad()
def forward_logprobs(model, mbs: list[MicroBatch], temperature: float) -> Optional[list[torch.Tensor]]:
    """log p(label) [b, s] per micro-batch at `temperature` (0 outside the loss mask), on the last
    pipeline stage; None elsewhere. No gradient and no [T, V] fp32 copy of the logits."""
    group = _tp_group()

    def step(it, m):
        mb = next(it)
        out = _forward(m, mb)

        def collect(logits, non_loss_data=True):
            return logprobs_from_logits(logits, mb.labels, temperature, group=group)
        return out, collect

    out = _schedule(model, mbs, step, forward_only=True, collect_non_loss=True)
    return list(out) if ps.is_pipeline_last_stage() else None


@dataclass
class UpdateResult:
    sums: dict[str, float]    # SUM_KEYS over this rank's micro-batches (last stage; zeros elsewhere)
    grad_norm: float
    skipped: bool             # non-finite loss or grad norm: the optimizer step was not taken


def train_on(model, optimizer, mbs: list[MicroBatch], algo, temperature: float) -> UpdateResult:
    """Forward/backward over `mbs`, then one optimizer step with gradient clipping.

    A non-finite loss (on any rank) or grad norm skips the step: gradients are dropped, weights
    and optimizer state stay as they were.
    """
    group = _tp_group()
    per_seq = algo.loss_agg == "seq_mean"
    need_rollout = algo.tis_cap is not None

    def step(it, m):
        mb = next(it)
        out = _forward(m, mb)

        def loss_func(logits):
            loss, metrics, logp = policy_loss(
                logits, mb.labels, mb.loss_mask, mb.advantages, algo, old_logp=mb.old_logp, ref_logp=mb.ref_logp,
                rollout_logp=mb.rollout_logp if need_rollout else None, temperature=temperature, tp_group=group,
                seq_ids=mb.seq_ids, normalizer=1.0, inplace_backward=True)
            tokens = mb.loss_mask.sum()
            count = mb.sequences_with_loss() if per_seq else tokens
            diff = ((logp - mb.rollout_logp).abs() * mb.loss_mask).sum()
            positions = [tokens.new_tensor(float(mb.input_ids.numel())), tokens.new_tensor(float(mb.real_positions))]
            sums = torch.stack([loss.detach(), count.float(), tokens, metrics["kl"] * tokens, metrics["clip_frac"] * tokens,
                                metrics.get("entropy", torch.zeros(())) * tokens, diff, *positions]).float()
            return loss, count.to(torch.int), {"sums": sums}
        return out, loss_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    out = _schedule(model, mbs, step, forward_only=False)
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    if ps.is_pipeline_last_stage() and out:
        sums = torch.stack([o["sums"] for o in out]).double().sum(0)
    grad_norm, skipped = optimizer_step(optimizer, loss_ok=bool(torch.isfinite(sums[0])))
    return UpdateResult(dict(zip(SUM_KEYS, sums.tolist())), grad_norm, skipped)


def optimizer_step(optimizer, loss_ok: bool) -> tuple[float, bool]:
    """megatron's optimizer.step(), split so that a non-finite loss or grad norm skips the update.

    The decision is the same on every rank: the grad norm is already reduced over model-parallel
    ranks, and the loss flag is all-reduced here (the loss lives on the last pipeline stage only).
    """
    bad = torch.tensor([0.0 if loss_ok else 1.0], device=runtime.device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    found_inf = optimizer.prepare_grads()
    norm = float(optimizer.get_grad_norm())
    if found_inf or bad.item() > 0 or not math.isfinite(norm):
        optimizer.zero_grad()
        return norm, True
    # As ChainedOptimizer.step: clip every sub-optimizer's parameters by the one total norm.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    optimizer.step_with_ready_grads()
    return norm, False
