"""`train.offload_during_rollout`: the trainer's memory the engine can use while it generates.

While the rollout engine generates (its KV cache awake), the trainer needs neither its gradient
buffers (train_on zeroes them before every update anyway) nor its optimizer state. megatron-core
(0.16) has the calls for this, written for RL: `DistributedDataParallel.offload_grad_buffers()` /
`restore_grad_buffers()` free the grad buffers' storage and reallocate it zeroed (the `main_grad`
views stay valid), and `MegatronOptimizer.offload_to_cpu()` / `restore_from_cpu()` move the
optimizer's parameters (fp32 main copies with bf16 training) and state tensors that live on the
GPU to the CPU and back. On a CPU-only run only the grad buffers are freed (nothing is on a GPU).

Not with the distributed optimizer in fp32: there its fp32 shards are views into the model's own
parameters, which `offload_to_cpu` would turn into detached copies (setup.check_recipe refuses it).
The engine's weights are loaded at the weight sync, before this window opens.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _grad_buffers(model) -> list:
    return list(getattr(model, "buffers", [])) + list(getattr(model, "expert_parallel_buffers", []))


def _optimizer_cuda_bytes(optimizer) -> int:
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        tensors = [p for g in inner.param_groups for p in g["params"]]
        tensors += [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
        total += sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)
    return total


@contextmanager
def offloaded(model, optimizer, enabled: bool):
    """Within the block: grad buffers freed, optimizer state on the CPU. Yields a dict that holds
    `offloaded_mb` (what was released: grad buffer storage + optimizer bytes that were on a GPU)."""
    stats = {"offloaded_mb": 0.0}
    if not enabled:
        yield stats
        return
    cuda = torch.cuda.is_available()
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in _grad_buffers(model)
                if b.grad_data is not None and b.grad_data.untyped_storage().size() > 0)
    opt_bytes = _optimizer_cuda_bytes(optimizer) if cuda else 0
    model.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
    if opt_bytes:
        optimizer.offload_to_cpu()
    stats["offloaded_mb"] = (grads + opt_bytes) / 2 ** 20
    try:
        yield stats
    finally:
        if opt_bytes:
            optimizer.restore_from_cpu()
        model.restore_grad_buffers(synchronize=cuda)
