"""The GRPO loop of one phase. Every rank runs this same loop (SPMD, no controller process).

    prompts -> rollouts -> rewards           (train.experience: model-parallel source rank, broadcast)
    -> group advantages -> micro-batches     (algo, train.batching)
    -> old / reference log-probs             (forward only, only when needed)
    -> megatron forward/backward + optimizer (train.step)
    -> weight sync into the rollout engine   (train.sync)
    -> metrics
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Sequence

import torch

from megammr import runtime
from megammr.algo import group_advantages
from megammr.config import Recipe, RecipeError, to_dict
from megammr.metrics import MetricsLog
from megammr.plot import print_summary, read_rows
from megammr.train import checkpoint, setup
from megammr.train.batching import Sample, filler_micro_batch, make_micro_batches, make_packed_micro_batches
from megammr.train.offload import offloaded
from megammr.train.report import StageTimes, step_metrics, wandb_args
from megammr.train.step import forward_logprobs, token_multiple, train_on
from megammr.train.sync import export_hf


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row)."""


def to_samples(groups, kind: str) -> list[Sample]:
    """GRPO: each group's rewards are normalised within the group (no communication needed)."""
    out = []
    for g in groups:
        adv = group_advantages(torch.tensor(g.rewards, dtype=torch.float64), group_size=len(g.rewards), kind=kind)
        for k, ids in enumerate(g.token_ids):
            out.append(Sample(g.prompt_ids, ids, float(adv[k]), g.logprobs[k], g.pixel_values, g.image_grid_thw))
    return out


def micro_batches(parts: setup.Parts, chunks) -> list[list]:
    """Each mini-batch of whole groups (one per optimizer update) as a list of micro-batches."""
    r = parts.recipe
    pp = r.parallel.pp > 1
    budget = dict(micro_batch_size=r.train.micro_batch_size, max_tokens=r.train.max_tokens_per_micro_batch,
                  fixed_shape=pp)
    if r.train.pack_sequences:
        budget["multiple"] = token_multiple(parts.model)
    make = make_packed_micro_batches if r.train.pack_sequences else make_micro_batches
    out = []
    for chunk in chunks:
        mbs = make(to_samples(chunk, r.algo.advantage), parts.backbone, pad_id=parts.pad_id, **budget)
        out.append(mbs or [filler_micro_batch(parts.backbone, pad_id=parts.pad_id)])
    return out


def attach_logprobs(parts: setup.Parts, minis) -> None:
    """Old-policy (off-policy updates) and reference (KL) log-probs, forward only, on the last stage."""
    r = parts.recipe
    temp = r.rollout.temperature
    for mbs in minis:
        if r.train.updates_per_step > 1:
            for mb, lp in zip(mbs, forward_logprobs(parts.model, mbs, temp) or []):
                mb.old_logp = lp
        if parts.ref_model is not None:
            for mb, lp in zip(mbs, forward_logprobs(parts.ref_model, mbs, temp) or []):
                mb.ref_logp = lp


class Preempted(RuntimeError):
    """A stop signal arrived: the run checkpointed and exits with checkpoint.PREEMPTED_EXIT."""


def train(recipe: Recipe, shutdown: bool = True, summary: bool = True,
          on_step: Sequence[Callable[[dict], None]] = ()) -> dict:
    """Run one phase (or resume it from OUTPUT_DIR/checkpoints/latest); returns the last step's metrics.
    `summary`: print the phase's summary table and write OUTPUT_DIR/summary.md at the end (a
    curriculum writes one table for all its phases instead).
    `on_step`: callables run on every rank at the end of each step with its metrics row (README
    "Metrics"), after it is logged; time/*, tokens_per_s and memory/offloaded_mb are this rank's."""
    t_begin = time.perf_counter()
    setup.check_recipe(recipe, runtime.dist_env_from(os.environ).world_size, torch.cuda.is_available())
    rt = runtime.init(recipe)
    runtime.forked_children_die_with_parent()
    checkpoint.start_writer()
    r, parts, log, last = recipe, None, None, {}
    try:
        if rt.is_main:
            setup.prepare_tiny(recipe)
            checkpoint.clear_preempted(r.train.output_dir)
        runtime.barrier()
        parts = setup.build(recipe, rt)
        start, counters = resume(parts)
        wall_before = counters.get("wall_s", 0.0)  # earlier runs of this phase, up to their last checkpoint
        log = MetricsLog(r.train.output_dir, rt.is_main, r.train.steps, r.train.log_interval, resume_after=start - 1,
                         progress=r.train.progress, desc=r.phase.name, wandb=wandb_args(r))
        if parts.sync:
            parts.sync.sync()  # the engine starts from exactly the trainer's weights
        with checkpoint.StopRequest() as stop:
            for step in range(start, r.train.steps + 1):
                t = StageTimes()
                with offloaded(parts.model, parts.optimizer, r.train.offload_during_rollout) as freed:
                    chunks, stats = parts.experience.collect(step)
                t.rollout = time.perf_counter()

                minis = micro_batches(parts, chunks)
                attach_logprobs(parts, minis)
                t.logprobs = time.perf_counter()

                updates = [train_on(parts.model, parts.optimizer, mbs, r.algo, r.rollout.temperature) for mbs in minis]
                for u in updates:
                    if not u.skipped:
                        parts.scheduler.step(increment=1)
                t.train = time.perf_counter()

                if parts.sync:
                    parts.sync.sync()
                t.sync = time.perf_counter()

                skipped = sum(u.skipped for u in updates)
                counters["skipped_total"] += skipped
                counters["bad_in_row"] = counters["bad_in_row"] + 1 if skipped else 0
                counters["wall_s"] = wall_before + time.perf_counter() - t_begin
                last = step_metrics(parts, step, stats, updates, t, skipped_total=counters["skipped_total"],
                                    elapsed=counters["wall_s"], offloaded_mb=freed["offloaded_mb"])
                log.log(last)
                for hook in on_step:
                    hook(last)
                if counters["bad_in_row"] >= r.train.max_bad_steps:
                    raise TrainingError(f"{counters['bad_in_row']} steps in a row had a non-finite loss or grad norm "
                                        f"(train.max_bad_steps={r.train.max_bad_steps}); stopping at step {step}. "
                                        "Lower optim.lr, check the data, or set algo.tis_cap if the engine's "
                                        "log-probs are suspect")
                stopping = stop.agreed()
                if stopping or step % r.train.checkpoint_interval == 0 or step == r.train.steps:
                    checkpoint.save(parts, step, counters, parts.experience.loader)
                if stopping and step < r.train.steps:
                    if rt.is_main:
                        checkpoint.mark_preempted(r.train.output_dir, step, stop.signal)
                    raise Preempted(f"{stop.signal or 'a stop signal'} at step {step}: checkpointed to "
                                    f"{r.train.output_dir}/checkpoints; rerun the same command to resume")
            if r.train.export_hf:  # still under StopRequest: a late signal must not kill the export
                export_hf(parts.module, r.model.hf_path, os.path.join(r.train.output_dir, "hf"), r.train.sync_bucket_mb)
    finally:
        if log:
            log.close()  # before the summary: a progress bar would print over it
        for close in (parts.closers if parts else []):
            close()
        if shutdown:
            runtime.shutdown()
    if summary and log is not None and log.enabled:  # log.enabled: rank 0 (the process group is gone by now)
        print_summary(r.train.output_dir, [(r.phase.name, read_rows(log.path))])
    return last


def resume(parts: setup.Parts) -> tuple[int, dict]:
    """(first step to run, counters): from OUTPUT_DIR/checkpoints/latest when there is one."""
    r = parts.recipe
    counters = {"skipped_total": 0, "bad_in_row": 0}
    path = checkpoint.latest(r.train.output_dir)
    if path is None:
        return 1, counters
    with open(os.path.join(path, "megammr.json")) as f:
        saved = json.load(f)
    changes = checkpoint.recipe_changes(saved["recipe"], to_dict(r))
    if changes and not r.train.allow_recipe_change:
        raise RecipeError(f"{path} was written by a different recipe; these fields change the result:\n  - "
                          + "\n  - ".join(changes) + "\nRestore them, use another train.output_dir, or set "
                          "train.allow_recipe_change=true")
    meta = checkpoint.load(parts, path, parts.experience.loader)
    say(f"resumed from {path} (step {meta['step']})" + ("" if meta["same_layout"] else
        f": saved at {meta['layout']}, resharded to tp={r.parallel.tp} pp={r.parallel.pp}; "
        "results from here are not bitwise those of an uninterrupted run"))
    return meta["step"] + 1, dict(counters, **meta["counters"])


def say(msg: str) -> None:
    if runtime.is_rank0():
        print(f"megammr train: {msg}", flush=True)
