"""Worker: the bytes the built model, DDP grad buffer and megatron optimizer really allocate on each rank.

Run under torchrun by tests/dist/test_plan_memory.py (and as one plain process by
tests/unit/test_plan.py, RANK=0 WORLD_SIZE=1). For each configuration (precision x distributed
optimizer x frozen vision) the tiny backbone is built with megammr.train.setup's own functions
(build_policy, build_optimizer), one optimizer step materialises Adam's state, and the storages
are summed (each storage once). Environment: TP, PP. Prints `RESULT {json}` from every rank.
"""
import json
import os

import torch
import torch.distributed as dist

CONFIGS = [("fp32", False, False), ("fp32", True, False), ("bf16", False, False), ("bf16", True, False),
           ("bf16", True, True)]


def storages(tensors) -> dict:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def measure(r, bb):
    from megammr.train.setup import build_optimizer, build_policy

    module = build_policy(r, bb, initial_weights=False)
    for p in module.parameters():
        p.data.zero_()
    ddp, opt, _ = build_optimizer(r, module)
    for p in module.parameters():
        if p.requires_grad:
            p.main_grad.zero_()
    opt.step()  # Adam's state exists from the first step on
    model_st = storages(module.parameters())
    grads = sum(storages(b.grad_data for b in list(ddp.buffers) + list(getattr(ddp, "expert_parallel_buffers", [])))
                .values())
    tensors = []
    for o in getattr(opt, "chained_optimizers", [opt]):
        inner = o.optimizer
        tensors += [p for g in inner.param_groups for p in g["params"]]
        tensors += [v for s in inner.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    opt_st = {k: v for k, v in storages(tensors).items() if k not in model_st}
    return dict(weights=sum(model_st.values()), grads=grads, optimizer=sum(opt_st.values()),
                params=sum(p.numel() for p in module.parameters()))


def main():
    from megammr import runtime
    from megammr.backbones import get_backbone
    from megammr.config import load_recipe

    tp, pp = int(os.environ.get("TP", 1)), int(os.environ.get("PP", 1))
    base = [f"parallel.tp={tp}", f"parallel.pp={pp}", "train.cpu_threads=1", "algo.kl_coef=0"]
    runtime.init(load_recipe(None, base))
    from megatron.core import parallel_state as ps

    bb = get_backbone("tiny")
    out = dict(rank=dist.get_rank(), tp=ps.get_tensor_model_parallel_world_size(),
               pp=ps.get_pipeline_model_parallel_world_size(), stage=ps.get_pipeline_model_parallel_rank(),
               dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(), configs=[])
    for precision, distributed, freeze in CONFIGS:
        r = load_recipe(None, base + [f"model.precision={precision}", f"optim.distributed_optimizer={distributed}",
                                      f"model.freeze_vision={freeze}"])
        m = measure(r, bb)
        out["configs"].append(dict(precision=precision, distributed_optimizer=distributed, freeze_vision=freeze, **m))
    print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
