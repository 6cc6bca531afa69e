"""Worker: the megatron GRPO loss and gradient of one update against a float64 reference.

    python tests/dist/trainer_reference_worker.py RECIPE key=value ...   (rollout.replay=DIR required)

Runs the trainer's own stages (setup.build, experience, micro-batching, old/ref log-probs,
train_on) for step 1 with two updates per step. The second update is off-policy (weights W1 after
the first update, old and reference policy = the initial weights W0), so the clip bounds, the k3
KL, truncated importance sampling and the entropy bonus all act. Its loss and gradients (learning
rate 0, no clipping, so the weights stay W1) are compared with a float64 GRPO loss written out
below from transformers' Qwen2.5-VL logits at W0 and W1 (W1 exported through the weight sync).
Prints `RESULT {json}`.
"""
import json
import sys

import torch

from megammr.rollout.base import WeightTarget


class Collector(WeightTarget):
    """A rollout 'engine' that only keeps what the weight sync sends (HF checkpoint names)."""

    def __init__(self):
        self.tensors = {}

    def update_weights(self, named):
        for name, t in named:
            self.tensors[name] = t.clone()
        return len(named)


def hf_terms(model, s, temperature, image_token_id):
    """(logp, entropy) of the response tokens, float64, from a transformers forward."""
    ids = torch.tensor([s.prompt_ids + s.response_ids])[:, :-1]
    kw = {}
    if s.pixel_values is not None:
        kw = dict(pixel_values=s.pixel_values.double(), image_grid_thw=s.image_grid_thw,
                  mm_token_type_ids=(ids == image_token_id).int())  # without it transformers uses 1-D positions
    logits = model(input_ids=ids, **kw).logits[0, len(s.prompt_ids) - 1:] / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def main():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megammr import runtime
    from megammr.config import load_recipe
    from megammr.models.processor import load_processor
    from megammr.rollout.hf_engine import TransformersEngine
    from megammr.train import setup
    from megammr.train.step import train_on
    from megammr.train.sync import WeightSync
    from megammr.trainer import attach_logprobs, micro_batches, to_samples

    r = load_recipe(sys.argv[1], sys.argv[2:])
    assert r.train.updates_per_step == 2 and r.optim.clip_grad == 0 and r.rollout.replay
    rt = runtime.init(r)
    parts = setup.build(r, rt)
    chunks, _ = parts.experience.collect(1)
    minis = micro_batches(parts, chunks)
    attach_logprobs(parts, minis)
    train_on(parts.model, parts.optimizer, minis[0], r.algo, r.rollout.temperature)  # W0 -> W1
    for g in parts.optimizer.param_groups:
        g["lr"] = 0.0
    got = train_on(parts.model, parts.optimizer, minis[1], r.algo, r.rollout.temperature)
    grads = {n: p.main_grad.double().clone() for n, p in parts.module.named_parameters()}

    collector = Collector()
    WeightSync(parts.module, collector, r.train.sync_bucket_mb).sync()
    w0 = Qwen2_5_VLForConditionalGeneration.from_pretrained(r.model.hf_path, dtype=torch.float64)
    w1 = Qwen2_5_VLForConditionalGeneration.from_pretrained(r.model.hf_path, dtype=torch.float64)
    TransformersEngine(w1, load_processor(r.model.hf_path), max_batch_sequences=r.rollout.max_batch_sequences).update_weights(
        collector.tensors.items())

    a, T, img = r.algo, r.rollout.temperature, parts.backbone.image_token_id
    total, tokens, clipped, kl_sum = 0.0, 0, 0, 0.0
    for s in to_samples(chunks[1], a.advantage):
        with torch.no_grad():
            old, _ = hf_terms(w0, s, T, img)  # old policy and reference are both W0 here
        logp, ent = hf_terms(w1, s, T, img)
        rollout = torch.tensor(s.rollout_logp, dtype=torch.float64)
        ratio = torch.exp(logp - old)
        pg = torch.maximum(-s.advantage * ratio, -s.advantage * ratio.clamp(1 - a.clip_low, 1 + a.clip_high))
        pg = pg * torch.exp(old - rollout).clamp(max=a.tis_cap)
        kl = torch.exp(old - logp) - 1 - (old - logp)
        total = total + (pg + a.kl_coef * kl - a.entropy_coef * ent).sum()
        tokens += len(s.response_ids)
        clipped += int(((ratio < 1 - a.clip_low) | (ratio > 1 + a.clip_high)).sum())
        kl_sum += float(kl.sum())
    loss = total / tokens
    loss.backward()
    hf_params = dict(w1.named_parameters())
    pairs = {"vision_model.patch_embed.proj.weight": "model.visual.patch_embed.proj.weight",
             "language_model.decoder.layers.1.self_attention.linear_proj.weight":
                 "model.language_model.layers.1.self_attn.o_proj.weight",
             "language_model.decoder.layers.3.mlp.linear_fc2.weight": "model.language_model.layers.3.mlp.down_proj.weight"}
    grad_err = {m: float((grads[m] - hf_params[h].grad).norm() / hf_params[h].grad.norm()) for m, h in pairs.items()}
    print("RESULT " + json.dumps(dict(
        megatron_loss=got.sums["loss"] / got.sums["count"], reference_loss=float(loss), tokens=tokens,
        megatron_tokens=got.sums["count"], packed=all(mb.packed for mbs in minis for mb in mbs), clipped_tokens=clipped, kl_mean=kl_sum / tokens,
        grad_rel_err=grad_err, grad_norm=float(hf_params[pairs["vision_model.patch_embed.proj.weight"]].grad.norm()))),
        flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
