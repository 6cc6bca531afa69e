"""Process start-up: torch.distributed from torchrun or Slurm, megatron parallel_state, seeds.

NCCL with CUDA, gloo without; on a machine without CUDA the project's CPU compatibility layer
for megatron-core (megammr.megatron_cpu) is applied before anything from megatron is built.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import os
import random
import signal
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from megammr import megatron_cpu
from megammr.config import Recipe

# lazy in this module: megatron-core (~2.5 s of imports). `megammr train` reads the launcher's
# environment from here (dist_env_from) while it checks a recipe, and a recipe error exits before
# megatron is imported; init(), seed_everything() and shutdown() import it when they run.


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, read from the launcher's environment."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist ("node[01-04],gpu7" -> "node01"), via scontrol if present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def dist_env_from(environ: Mapping[str, str]) -> DistEnv:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK win; else Slurm's SLURM_PROCID/NTASKS/LOCALID; else one process."""
    def _int(key):
        try:
            return int(environ[key])
        except ValueError:
            raise RuntimeError(f"environment variable {key}={environ[key]!r} is not an integer") from None

    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world, local = _int("RANK"), _int("WORLD_SIZE"), int(environ.get("LOCAL_RANK", "0"))
        launcher = "torchrun"
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world = _int("SLURM_PROCID"), _int("SLURM_NTASKS")
        local = int(environ.get("SLURM_LOCALID", "0"))
        launcher = "slurm"
    else:
        rank, world, local, launcher = 0, 1, 0, "single"
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is outside world size {world}")

    addr = environ.get("MASTER_ADDR")
    if addr is None:
        if launcher == "slurm" and int(environ.get("SLURM_NNODES", "1")) > 1:
            nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
            if not nodelist:
                raise RuntimeError("multi-node Slurm job without MASTER_ADDR or SLURM_JOB_NODELIST")
            addr = _first_slurm_host(nodelist)
        else:
            addr = "127.0.0.1"
    if "MASTER_PORT" in environ:
        port = _int("MASTER_PORT")
    elif launcher == "slurm" and "SLURM_JOB_ID" in environ:
        # Same on every task of a job, different between jobs that share a node.
        port = 20000 + int(environ["SLURM_JOB_ID"]) % 20000
    elif launcher == "single":
        port = 0  # one process: any free port (init picks it), so concurrent single runs never collide
    else:
        port = 29500
    return DistEnv(rank, world, local, addr, port, launcher)


@dataclass
class Runtime:
    """What the rest of the program needs to know about the process layout."""
    env: DistEnv
    device: torch.device
    backend: str
    tp: int
    pp: int
    cp: int
    dp: int
    cpu_patches: list[str]

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def seed_everything(seed: int) -> None:
    """Python, NumPy, torch and megatron's model-parallel RNG tracker (when parallel_state is up).

    The tracker gives tensor-parallel ranks different streams for sharded initialisation and
    dropout, and the same stream for replicated parts, exactly as megatron does on GPU.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(seed)


def init(recipe: Recipe, environ: Optional[Mapping[str, str]] = None) -> Runtime:
    """Start torch.distributed and megatron parallel_state for this recipe; seed every RNG."""
    env = dist_env_from(os.environ if environ is None else environ)
    cuda = torch.cuda.is_available()
    patches: list[str] = []
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        patches = megatron_cpu.apply()
        backend = "gloo"
        if recipe.train.cpu_threads:
            torch.set_num_threads(recipe.train.cpu_threads)

    tp, pp, cp = recipe.parallel.tp, recipe.parallel.pp, recipe.parallel.cp
    dp = recipe.data_parallel_size(env.world_size)  # raises naming the sizes when it does not divide

    if not dist.is_initialized():
        if env.master_port == 0:
            env = dataclasses.replace(env, master_port=_free_port(env.master_addr))
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=recipe.parallel.dist_timeout_s),
        )
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized() and (ps.get_tensor_model_parallel_world_size(), 
                                               ps.get_pipeline_model_parallel_world_size(),
                                               ps.get_context_parallel_world_size()) != (tp, pp, cp):
        ps.destroy_model_parallel()  # a later curriculum phase at another layout, same process group
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp)
    seed_everything(recipe.train.seed)
    return Runtime(env, device(), backend, tp, pp, cp, dp, patches)


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


_DIE_WITH_PARENT = False
# Slurm delivers a job's signals (srun's forwarding, scancel, the time limit) to every process of a
# step, not only to the trainer. The trainer acts on these (finish the step, checkpoint, exit 75);
# its helper processes must not die of them mid-step or mid-checkpoint. They end with the trainer instead.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def forked_children_die_with_parent() -> None:
    """Children forked from now on (data-loader workers, checkpoint writers) get SIGKILL when this
    process dies, and ignore the stop signals (STOP_SIGNALS: the trainer's to handle).

    After a kill -9 of the trainer, a loader worker blocked on a full queue would otherwise live
    on, holding the run's files and the reward workers' pipes open. Linux only (prctl); idempotent."""
    global _DIE_WITH_PARENT
    if _DIE_WITH_PARENT or not hasattr(os, "register_at_fork"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return

    def _set():
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)

    os.register_at_fork(after_in_child=_set)
    _DIE_WITH_PARENT = True


@contextlib.contextmanager
def stop_signals_blocked():
    """Processes started (fork + exec) inside have STOP_SIGNALS blocked for life: a blocked mask,
    unlike a handler, survives exec. For helper processes whose start this code does not control.
    Blocked, not ignored, here: a stop signal that arrives meanwhile is delivered afterwards (or to
    another thread, whose C handler flags it for the main thread), never lost."""
    sigs = {getattr(signal, name) for name in STOP_SIGNALS}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    """Global rank 0, or the only process when torch.distributed is not started."""
    return not dist.is_initialized() or dist.get_rank() == 0


def device() -> torch.device:
    """This process's current CUDA device, else the CPU (also under the CPU layer, whose
    torch.cuda.is_available() stays False)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shutdown() -> None:
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["STOP_SIGNALS", "DistEnv", "Runtime", "barrier", "device", "dist_env_from",
           "forked_children_die_with_parent", "init", "is_rank0", "seed_everything", "shutdown",
           "stop_signals_blocked"]
