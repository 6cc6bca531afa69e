"""CPU compatibility layer for megatron-core (0.16.x; the 0.17+ call sites are noted too).

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths:
device="cuda" literals, torch.cuda.current_device() as a device argument, stream and
synchronize calls, a CUDA RNG tracker, and `Tensor.type()` string checks. With the patches
below TP, PP, DP, the optimizer, DDP and torch_dist checkpoints (with resharding) run on CPU
over gloo, which is how every distributed path of megammr is tested without a GPU.

Rules: `apply()` is called by megammr.runtime only when CUDA is absent; it is idempotent;
every patch names the megatron-core call sites it serves. Nothing here changes numerics.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_APPLIED: list[str] = []
_MODE = None


def _is_cuda_device(d) -> bool:
    if d is None or isinstance(d, bool):
        return False
    if isinstance(d, int):  # torch.cuda.current_device() style ordinals
        return True
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return isinstance(d, str) and d.startswith("cuda")


class CudaToCpuMode(TorchFunctionMode):
    """Maps device="cuda"/ordinal arguments to CPU and makes .cuda()/.to("cuda") no-ops.

    Serves the hard-coded literals that cannot be patched by name, e.g. (0.16.1):
    pipeline_parallel/schedules.py `torch.zeros([], dtype=torch.int, device="cuda")` (token counts),
    distributed/param_and_grad_buffer.py `torch.zeros([1], device="cuda")` (warm-up tensor),
    optimizer/optimizer.py `torch.tensor([0.0], ..., device='cuda')` (found_inf, loss scale),
    optimizer/clip_grads.py `device='cuda'` (norm buffers), and tensor_parallel/layers.py and
    p2p_communication.py `device=torch.cuda.current_device()` (an int after the patch below).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], torch.dtype) \
                and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class CPURNGStatesTracker:
    """Stands in for tensor_parallel.random.CudaRNGStatesTracker with forks of the CPU generator.

    Serves model_parallel_cuda_manual_seed (random.py) and every get_cuda_rng_tracker().fork()
    around parameter initialisation and dropout in tensor-parallel regions (layers.py,
    transformer/attention.py). The CUDA tracker calls torch.cuda.get_rng_state(), which fails
    without CUDA.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _NullStream:
    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return None


def apply() -> list[str]:
    """Apply every patch once. Returns the names applied (for logs and tests)."""
    global _MODE
    if torch.cuda.is_available():
        raise RuntimeError("megammr.megatron_cpu.apply() is for machines without CUDA")
    if _APPLIED:
        return list(_APPLIED)

    # tensor_parallel/layers.py, p2p_communication.py, parallel_state.py (device_ids=[...]),
    # async_utils.py: torch.cuda.current_device() is used as a device argument.
    # Returning an ordinal keeps `device_ids=[...]` shapes; CudaToCpuMode maps it to CPU.
    torch.cuda.current_device = lambda: 0
    _APPLIED.append("current_device")

    # parallel_state.py (after group creation), p2p_communication.py (after batched isend/irecv),
    # distributed_data_parallel.py: synchronize is a no-op when all work is synchronous on CPU.
    torch.cuda.synchronize = lambda *a, **k: None
    _APPLIED.append("synchronize")

    # 0.17+/0.19 distributed_data_parallel.py start_grad_sync and param_and_grad_buffer.py call
    # torch.cuda.current_stream()/default_stream() unconditionally; CPU work has no streams.
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    _APPLIED.append("streams")

    # lazy: megammr.runtime imports this module at its top, and runtime must not import megatron-core
    # (`megammr train` checks a recipe with runtime before megatron is needed)
    from megatron.core.tensor_parallel import random as mcore_random
    mcore_random.CudaRNGStatesTracker = CPURNGStatesTracker
    mcore_random.initialize_rng_tracker(force_reset=True)
    _APPLIED.append("rng_tracker")

    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # stays active for the life of the process (thread-local: main thread)
    _APPLIED.append("device_mode")

    # optimizer/optimizer.py Float16OptimizerWithFloat16Params (bf16) checks
    # param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor', 'torch.cuda.FloatTensor'];
    # optimizer/clip_grads.py clip_grad_by_total_norm_fp32 asserts
    # param.grad.type() == 'torch.cuda.FloatTensor'. CPU tensors report the CUDA name for the
    # no-argument form only; conversions (`t.type(torch.float64)`) are untouched.
    original_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type
    _APPLIED.append("cuda_type_names")
    return list(_APPLIED)


def applied() -> list[str]:
    return list(_APPLIED)


def mode_active() -> bool:
    """Whether the CPU device mode (a process-wide torch function mode) was entered in this process."""
    return _MODE is not None


@contextlib.contextmanager
def suspended():
    """The device mode switched off for code that never reaches megatron-core, e.g. the rollout
    engine's transformers `generate`: its many small ops per token pay the mode's Python dispatch,
    1.33x slower with it active (BENCHMARKS.md). A no-op when the mode is not applied or another
    mode sits above it (popping that one instead would be wrong)."""
    if _MODE is None or torch.overrides._get_current_function_mode() is not _MODE:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield
