"""Worker: vocab-parallel log-probs / entropy / policy loss at TP=2 against the TP=1 call and float64.

Run under torchrun by tests/dist/test_vocab_parallel.py. Every rank draws the same full logits
(and hidden states / output weight), keeps its vocab shard, and calls megammr.kernels with the
tensor-parallel group; the unsharded call (TP=1) and the float64 naive computation are done in the
same process for comparison. Sharded gradients are gathered over the group before comparing.
Environment: BACKEND=torch|triton (triton runs under TRITON_INTERPRET=1 on CPU).
Prints `RESULT {json}` from rank 0 with relative errors.
"""
import dataclasses
import json
import os

import torch
import torch.distributed as dist


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def gather_cols(t, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def main():
    from megammr import runtime
    from megammr.config import AlgoConfig, load_recipe

    tp = int(os.environ.get("TP", 2))
    backend = os.environ.get("BACKEND", "torch")
    rt = runtime.init(load_recipe(None, [f"parallel.tp={tp}"]))
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    from megammr.algo import policy_loss, policy_loss_from_hidden
    from megammr.kernels import logprobs_from_hidden, logprobs_from_logits, vocab_parallel_logprobs_from_logits
    from megammr.kernels.reference import naive_logprobs

    group = ps.get_tensor_model_parallel_group()
    r, n = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    g = torch.Generator().manual_seed(0)
    T, H, V, temp = 23, 16, 2 * 151, 0.8  # V/2 = 151: not a multiple of the block
    vl = V // n
    logits = torch.randn(T, V, generator=g) * 4
    labels = torch.randint(0, V, (T,), generator=g)
    labels[5] = -100
    g1, g2 = torch.randn(T, generator=g), torch.randn(T, generator=g)
    kw = dict(backend=backend, block_v=64) if backend == "triton" else dict(backend=backend)
    out = {}

    # 1. from logits: sharded vs whole vs float64, values and gradients
    shard = logits[:, r * vl:(r + 1) * vl].clone().requires_grad_()
    lp, en = vocab_parallel_logprobs_from_logits(shard, labels, temp, True, **kw)  # default group: Megatron TP
    ((lp * g1).sum() + (en * g2).sum()).backward()
    grad_tp = gather_cols(shard.grad, group)
    whole = logits.clone().requires_grad_()
    lp1, en1 = logprobs_from_logits(whole, labels, temp, True, **kw)
    ((lp1 * g1).sum() + (en1 * g2).sum()).backward()
    xd = logits.double().requires_grad_()
    rl, re = naive_logprobs(xd, labels, temp)
    ((rl * g1.double()).sum() + (re * g2.double()).sum()).backward()
    out.update(logp_vs_tp1=rel(lp, lp1), ent_vs_tp1=rel(en, en1), grad_vs_tp1=rel(grad_tp, whole.grad),
               logp_vs_f64=rel(lp, rl), ent_vs_f64=rel(en, re), grad_vs_f64=rel(grad_tp, xd.grad))

    # 2. from hidden states with the output weight sharded over the vocabulary
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    h = hidden.clone().requires_grad_()
    w = weight[r * vl:(r + 1) * vl].clone().requires_grad_()
    hk = {k: v for k, v in kw.items() if k != "block_v"}
    lph, enh = logprobs_from_hidden(h, w, labels, temp, True, group=group, chunk_tokens=6, **hk)
    ((lph * g1).sum() + (enh * g2).sum()).backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rl2, re2 = naive_logprobs(hd @ wd.t(), labels, temp)
    ((rl2 * g1.double()).sum() + (re2 * g2.double()).sum()).backward()
    out.update(hidden_logp_vs_f64=rel(lph, rl2), hidden_ent_vs_f64=rel(enh, re2),
               hidden_dh_vs_f64=rel(h.grad, hd.grad),
               hidden_dw_vs_f64=rel(gather_cols(w.grad.t(), group).t(), wd.grad))

    # 3. the policy loss with a TP group equals the TP=1 loss
    algo = dataclasses.replace(AlgoConfig(), kl_coef=0.05, entropy_coef=0.01, clip_high=0.28)
    mask = torch.ones(T, dtype=torch.bool)
    mask[5] = mask[17] = False
    old = (lp1.detach() + torch.randn(T, generator=g) * 0.2)
    ref = (lp1.detach() + torch.randn(T, generator=g) * 0.3)
    adv = torch.randn(T, generator=g)
    shard2 = logits[:, r * vl:(r + 1) * vl].clone().requires_grad_()
    loss_tp, _, _ = policy_loss(shard2, labels, mask, adv, algo, old_logp=old, ref_logp=ref, temperature=temp,
                                tp_group=group, backend=backend)
    loss_tp.backward()
    whole2 = logits.clone().requires_grad_()
    loss_1, _, _ = policy_loss(whole2, labels, mask, adv, algo, old_logp=old, ref_logp=ref, temperature=temp,
                               backend=backend)
    loss_1.backward()
    loss_h, _, _ = policy_loss_from_hidden(hidden, weight[r * vl:(r + 1) * vl], labels, mask, adv, algo,
                                           old_logp=old, ref_logp=ref, temperature=temp, tp_group=group,
                                           backend=backend)
    loss_h1, _, _ = policy_loss(hidden @ weight.t(), labels, mask, adv, algo, old_logp=old, ref_logp=ref,
                                temperature=temp, backend=backend)
    out["hidden_loss_vs_tp1"] = abs(loss_h.item() - loss_h1.item()) / abs(loss_h1.item())
    out.update(loss_vs_tp1=abs(loss_tp.item() - loss_1.item()) / abs(loss_1.item()),
               loss_grad_vs_tp1=rel(gather_cols(shard2.grad, group), whole2.grad), loss=loss_1.item())
    losses = [torch.zeros(1) for _ in range(n)]
    dist.all_gather(losses, loss_tp.detach().reshape(1), group=group)
    out["loss_same_on_all_ranks"] = all(float(x) == float(losses[0]) for x in losses)
    out.update(tp=n, world=rt.env.world_size, backend=backend)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
