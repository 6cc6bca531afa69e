"""Checkpoints of a phase: written atomically, resumed exactly.

Layout of OUTPUT_DIR/checkpoints/:
    step_000010/            torch_dist model + optimizer (megatron dist_checkpointing: reshardable)
        megammr.json        step, lr schedule, skipped-step counters, resolved recipe, layout
        data_dp<R>.pt       the data loader state of data-parallel rank R (energon, exact resume)
        rng_rank<R>.pt      every RNG state of global rank R (Python, NumPy, torch, CUDA, megatron tracker)
    latest                  a one-line file naming the newest complete checkpoint

Atomicity: everything is written into step_NNNNNN.tmp, every file is fsynced, the directory is
renamed, and only then `latest` is replaced (write + fsync + rename). A process killed at any
moment leaves `latest` naming a complete checkpoint; stale .tmp directories are removed by the next
save. Older checkpoints are removed only after a save succeeded (train.keep_checkpoints newest kept).
The rollout engine needs no state: its sampler is seeded from (seed, step, DP rank) every step.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from multiprocessing import resource_tracker
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megammr.config import to_dict
from megammr.models.checkpoint_io import CheckpointError
from megammr.runtime import STOP_SIGNALS, barrier, device, is_rank0, stop_signals_blocked

try:  # a megatron-core without it keeps its own writer start (start_writer)
    from megatron.core.dist_checkpointing.strategies import filesystem_async
except ImportError:
    filesystem_async = None

FORMAT = 1
# Recipe fields that may differ on resume without changing the result.
RESUME_FREE = {"train.output_dir", "train.checkpoint_interval", "train.keep_checkpoints",
               "train.log_interval", "train.max_bad_steps", "train.save_rollouts", "train.sync_bucket_mb",
               "train.allow_recipe_change", "train.export_hf", "reward.workers", "rollout.max_batch_sequences",
               "parallel.tp", "parallel.pp", "parallel.dist_timeout_s", "phase.init_from", "train.progress",
               "train.wandb_project", "train.offload_during_rollout"}


def _fsync_tree(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = os.path.join(output_dir, "checkpoints", "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(output_dir, "checkpoints", name)
    if not os.path.isfile(os.path.join(path, "megammr.json")):
        raise RuntimeError(f"{pointer} names {name}, which is not a complete checkpoint (removed by hand?)")
    return path


def resolve(path: str) -> str:
    """A checkpoint directory (ours or tools/convert_checkpoint.py's), a `checkpoints/latest` file,
    a run's `checkpoints/` directory or a run directory -> the checkpoint directory."""
    p = path.rstrip("/")
    if os.path.isfile(os.path.join(p, "megammr.json")) or os.path.isfile(os.path.join(p, "metadata.json")):
        return p
    run = None
    if os.path.basename(p) == "latest" and os.path.isfile(p):
        run = os.path.dirname(os.path.dirname(p))
    elif os.path.basename(p) == "checkpoints" and os.path.isdir(p):
        run = os.path.dirname(p)
    elif os.path.isdir(os.path.join(p, "checkpoints")):
        run = p
    found = latest(run) if run is not None else None
    if found is None:
        raise FileNotFoundError(f"{path}: no checkpoint there (expected a checkpoint directory, a run's "
                                "checkpoints/latest, or a run directory that has one)")
    return found


def save(parts, step: int, counters: dict, loader) -> str:
    """Write checkpoint `step` of this run (every rank calls it); return its directory."""
    r = parts.recipe
    root = os.path.join(r.train.output_dir, "checkpoints")
    name = f"step_{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    rank, rank0 = (dist.get_rank() if dist.is_initialized() else 0), is_rank0()
    if rank0:
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):  # a save killed half-way; never the pointer's target
            if stale.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    model_sd = parts.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": parts.optimizer.sharded_state_dict(model_sd)}, tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    if loader is not None:
        torch.save(loader.state_dict(), os.path.join(tmp, f"data_dp{ps.get_data_parallel_rank()}.pt"))
    if rank0:
        meta = {"format": FORMAT, "step": step, "scheduler": parts.scheduler.state_dict(), "counters": counters,
                "recipe": to_dict(r), "layout": {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                                                 "tp": r.parallel.tp, "pp": r.parallel.pp}}
        with open(os.path.join(tmp, "megammr.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
    barrier()
    if rank0:
        _fsync_tree(tmp)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        pointer = os.path.join(root, "latest")
        with open(pointer + ".tmp", "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer + ".tmp", pointer)
        _fsync_dir(root)
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[:-r.train.keep_checkpoints]:
            if old != name:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()
    return final


def recipe_changes(saved: dict, now: dict) -> list[str]:
    """Dotted fields whose value differs and that change the result (RESUME_FREE excluded)."""
    out = []

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}{k}"
            va, vb = a.get(k), b.get(k)
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, key + ".")
            elif va != vb and key not in RESUME_FREE:
                out.append(f"{key}: checkpoint {va!r}, now {vb!r}")
    walk(saved, now, "")
    return out


def load(parts, path: str, loader) -> dict:
    """Restore model, optimizer, schedule, data and RNG state from `path`; returns its metadata."""
    with open(os.path.join(path, "megammr.json")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this build reads {FORMAT}")
    saved_dp = len([n for n in os.listdir(path) if n.startswith("data_dp") and n.endswith(".pt")])
    dp = ps.get_data_parallel_world_size()
    if loader is not None and saved_dp and saved_dp != dp:
        # Each data-parallel rank's loader resumes from its own saved position: another DP size would
        # repeat or skip prompts, so it is refused rather than resumed silently wrong.
        raise CheckpointError(
            f"{path}: saved with data-parallel size {saved_dp}, this launch has {dp}; the data loaders' "
            f"positions cannot be split differently. Resume with {saved_dp} data-parallel ranks (world size = "
            f"{saved_dp} x tp x pp; tp and pp may change), or start the phase in a new train.output_dir")
    model_sd = parts.module.sharded_state_dict()
    opt_sd = parts.optimizer.sharded_state_dict(model_sd, is_loading=True)
    state = dist_checkpointing.load({"model": model_sd, "optimizer": opt_sd}, path)
    # strict=False for megatron's _extra_state entries only: every parameter must come from the
    # checkpoint (a resumed policy is built without its initial weights).
    result = parts.module.load_state_dict(state["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} model tensors of this build, "
                           f"e.g. {missing[:3]}")
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(meta["scheduler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    same_layout = meta["layout"] == {"world_size": world, "tp": parts.recipe.parallel.tp, "pp": parts.recipe.parallel.pp}
    if same_layout:
        set_rng_state(torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False))
    if loader is not None:
        data = os.path.join(path, f"data_dp{ps.get_data_parallel_rank()}.pt")
        if os.path.exists(data):
            loader.load_state_dict(torch.load(data, weights_only=False))
    meta["same_layout"] = same_layout
    return meta


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the Slurm scripts requeue on it (any other non-zero exit is a failure)


def start_writer() -> None:
    """Start megatron's checkpoint result-queue process now, with the stop signals ignored.

    megatron-core creates it lazily at the first save as a spawned process (fresh interpreter,
    default signal dispositions); a preemption signal that Slurm sends to the whole step would then
    kill it and with it the very checkpoint the signal asks for. Started here, it has them blocked.
    (A megatron-core without this helper just keeps its own behaviour.)"""
    get_queue = getattr(filesystem_async, "_get_write_results_queue", None)
    if get_queue is None:
        return
    with stop_signals_blocked():
        resource_tracker.ensure_running()  # the manager needs it; starting it unblocks SIGTERM again, so:
        with stop_signals_blocked():
            get_queue()


def preempted_marker(output_dir: str) -> str:
    return os.path.join(output_dir, "PREEMPTED")


def mark_preempted(output_dir: str, step: int, signal: str | None) -> None:
    """Rank 0, after the checkpoint: OUTPUT_DIR/PREEMPTED says this run stopped on a signal with its
    state saved. slurm/launch.sh requeues on it even when a launcher reports a different exit code
    (srun --kill-on-bad-exit may kill a rank that was still tearing down after the checkpoint)."""
    tmp = preempted_marker(output_dir) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "signal": signal, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, preempted_marker(output_dir))


def clear_preempted(output_dir: str) -> None:
    try:
        os.remove(preempted_marker(output_dir))
    except FileNotFoundError:
        pass


class StopRequest:
    """SIGTERM / SIGUSR1 ask the loop to finish its step, checkpoint and exit with PREEMPTED_EXIT.

    The handler only sets a flag, so a second signal during the checkpoint changes nothing. Ranks
    agree once per step with one all-reduce (a signal may reach the ranks at different times)."""

    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.flag, self.signal, self._old = False, None, {}

    def __enter__(self):
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag, self.signal = True, signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self) -> bool:
        x = torch.tensor([1.0 if self.flag else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            x = x.to(device())
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return bool(x.item() > 0)
