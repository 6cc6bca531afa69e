"""Model compute of one GRPO step, the model called directly (no trainer): the yardstick that
`megammr bench step` subtracts from a step to get the framework's overhead.

The same micro-batches go through the megatron model (`megatron_compute`, optionally paired with the
trainer's own train-side code on them) and through transformers' Qwen2.5-VL with torch AdamW
(`hf_compute`, TRL's model compute): reference forward, policy forward/backward of a minimal GRPO
loss, optimizer step. See megammr/bench/step.py for the definitions.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Optional

COMPUTE_KEYS = ("ref_forward_s", "forward_backward_s", "optimizer_s", "total_s")


def median(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def compat_mode_active() -> bool:
    """Whether megammr's CPU compatibility layer (a process-wide torch function mode) is active here."""
    mod = sys.modules.get("megammr.megatron_cpu")  # never imported here: its import alone changes nothing
    return bool(mod is not None and mod.mode_active())


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compute_params(recipe) -> dict:
    o = recipe.optim
    return {"model": recipe.model.hf_path, "seed": recipe.train.seed, "temperature": recipe.rollout.temperature,
            "kl_coef": recipe.algo.kl_coef, "clip": recipe.algo.clip_low, "lr": o.lr,
            "betas": [o.adam_beta1, o.adam_beta2], "eps": o.adam_eps, "weight_decay": o.weight_decay,
            "clip_grad": o.clip_grad}


def token_logp(logits, labels, temperature: float):
    import torch
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(
        -1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def grpo_loss(logp, ref_logp, mask, adv, kl_coef: float, clip: float, total: float):
    """Minimal token-mean GRPO: clipped ratio x advantage (ratio 1 on-policy) + k3 KL to the reference."""
    import torch
    ratio = torch.exp(logp - logp.detach())
    a = adv.unsqueeze(-1)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    if ref_logp is not None:
        d = ref_logp - logp
        pg = pg + kl_coef * (torch.exp(d) - d - 1)
    return (pg * mask).sum() / total


def compute_step(ref_forward, policy_forward, zero_grad, optimizer_step, kl: float, clip: float, T: float):
    """one(mbs) -> times of the reference forward, forward/backward and optimizer step of one step."""
    import torch

    def one(mbs) -> dict:
        sync()
        t0 = time.perf_counter()
        ref_lp = [None] * len(mbs)
        if ref_forward is not None:
            with torch.no_grad():
                ref_lp = [token_logp(ref_forward(mb), mb["labels"], T) for mb in mbs]
        sync()
        t1 = time.perf_counter()
        zero_grad()
        total = sum(float(mb["loss_mask"].sum()) for mb in mbs)
        for mb, rl in zip(mbs, ref_lp):
            logp = token_logp(policy_forward(mb), mb["labels"], T)
            grpo_loss(logp, rl, mb["loss_mask"], mb["advantages"], kl, clip, total).backward()
        sync()
        t2 = time.perf_counter()
        optimizer_step()
        sync()
        t3 = time.perf_counter()
        return {"ref_forward_s": t1 - t0, "forward_backward_s": t2 - t1, "optimizer_s": t3 - t2, "total_s": t3 - t0,
                "shapes": [list(mb["input_ids"].shape) for mb in mbs]}
    return one


def time_compute(batches, one, what: str, paired=None) -> dict:
    """one(mbs) for every step's micro-batches after one warm-up; paired(i), when given, right after
    step i (so both see the same machine load)."""
    one(batches[0])  # warm-up: first-call allocations
    if paired is not None:
        paired(0)
    steps, pair_rows = [], []
    for i, mbs in enumerate(batches):
        steps.append(dict(one(mbs), index=i))
        if paired is not None:
            pair_rows.append(dict(paired(i), index=i))
    out = {"what": what, "steps": steps, "median": {k: median(s[k] for s in steps) for k in COMPUTE_KEYS}}
    if pair_rows:
        out["trainer_path"] = {"steps": pair_rows,
                               "median": {k: median(r[k] for r in pair_rows) for k in pair_rows[0] if k != "index"}}
    return out


def to_device(batches, device) -> list[list[dict]]:
    return [[{k: (v.to(device) if v is not None else None) for k, v in mb.items()} for mb in mbs] for mbs in batches]


def megatron_compute(recipe, batches, objects=None) -> dict:
    """Reference forward, policy forward/backward and optimizer step of the megatron model, called
    directly. With `objects` (the same micro-batches as megammr MicroBatch objects), each step is
    followed by the trainer's own code path on it (megammr.train.step.forward_logprobs + train_on:
    megatron's schedule, the fused loss kernels, the metric sums, the guarded optimizer step), so the
    difference of the two is the train-side framework cost measured under the same load."""
    from megammr import runtime
    from megammr.backbones import Backbone
    from megammr.train import setup

    rt = runtime.init(recipe)
    try:
        bb = Backbone.from_hf_dir(recipe.model.hf_path, name=recipe.model.backbone)
        module = setup.build_policy(recipe, bb)
        ref = setup.build_policy(recipe, bb, frozen=True) if recipe.algo.kl_coef > 0 else None
        ddp, opt, _ = setup.build_optimizer(recipe, module)

        def fwd(m):
            return lambda mb: m(input_ids=mb["input_ids"], position_ids=mb["position_ids"], attention_mask=None,
                                pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"])

        def zero():
            ddp.zero_grad_buffer()
            opt.zero_grad()

        paired = None
        if objects is not None:
            from megammr.train.step import forward_logprobs, train_on
            T = recipe.rollout.temperature
            objs = [[mb.to(rt.device) for mb in mbs] for mbs in objects]

            def paired(i):
                mbs = objs[i]
                sync()
                t0 = time.perf_counter()
                if ref is not None:
                    for mb, lp in zip(mbs, forward_logprobs(ref, mbs, T) or []):
                        mb.ref_logp = lp
                sync()
                t1 = time.perf_counter()
                train_on(ddp, opt, mbs, recipe.algo, T)
                sync()
                t2 = time.perf_counter()
                return {"ref_forward_s": t1 - t0, "train_s": t2 - t1, "total_s": t2 - t0}

        p = compute_params(recipe)
        one = compute_step(fwd(ref) if ref is not None else None, fwd(ddp), zero, opt.step, p["kl_coef"], p["clip"],
                            p["temperature"])
        return time_compute(to_device(batches, rt.device), one,
                             "megatron model called directly (megatron DDP wrapper and optimizer), plain torch "
                             "log_softmax/gather loss", paired=paired)
    finally:
        runtime.shutdown()


def hf_compute(params: dict, batches) -> dict:
    """The same work with transformers' Qwen2.5-VL and torch AdamW (TRL's model compute)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megammr import runtime

    dev = runtime.device()
    torch.manual_seed(params["seed"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(params["model"], dtype=torch.float32).to(dev).train()
    ref = None
    if params["kl_coef"] > 0:
        ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(params["model"], dtype=torch.float32).to(dev).eval()
        ref.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"],
                            weight_decay=params["weight_decay"])
    batches = to_device(batches, dev)
    for mbs in batches:  # right padding: attend to everything up to the last response token
        for mb in mbs:
            mask = mb["loss_mask"]
            b, s = mask.shape
            last = torch.where(mask.sum(1) > 0, s - 1 - mask.flip(1).argmax(1), torch.zeros(b, dtype=torch.long))
            mb["attention_mask"] = (torch.arange(s, device=dev).unsqueeze(0) <= last.unsqueeze(1)).long()

    def fwd(m):
        return lambda mb: m(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits

    def step():
        if params["clip_grad"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), params["clip_grad"])
        opt.step()

    what = ("transformers Qwen2_5_VLForConditionalGeneration (its default attention), torch AdamW + "
            "clip_grad_norm_, plain torch log_softmax/gather loss"
            + (" (under megammr's CPU torch-function mode)" if compat_mode_active() else ""))
    one = compute_step(fwd(ref) if ref is not None else None, fwd(model), lambda: opt.zero_grad(set_to_none=True),
                        step, params["kl_coef"], params["clip"], params["temperature"])
    return time_compute(batches, one, what)
