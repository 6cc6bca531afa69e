"""The rules between recipe fields that a type cannot express, run when a recipe is loaded
(megammr.config.load.load_recipe): value ranges, the backbone name, whether TP x PP splits the
backbone, and, given a world size, the data-parallel split. Each rule names the keys it reads,
so a rule about a key that already failed to load is skipped instead of judging a default.

Imports only the schema and megammr.backbones (pure data, below config): never the model code.
"""
from __future__ import annotations

import difflib
import os
from typing import Optional

from megammr.backbones import BACKBONES, Backbone, check_parallel_layout
from megammr.config.schema import Recipe


def _rules(r: Recipe) -> list[tuple[tuple[str, ...], bool, str]]:
    """(keys read, holds, message) of each cross-field rule."""
    p, m, ro, a, t, d, rw, o = r.parallel, r.model, r.rollout, r.algo, r.train, r.data, r.reward, r.optim
    return [
        (("parallel.tp", "parallel.pp", "parallel.cp"), p.tp >= 1 and p.pp >= 1 and p.cp >= 1,
         "parallel.tp, pp and cp must be >= 1"),
        (("parallel.dist_timeout_s",), p.dist_timeout_s > 0, "parallel.dist_timeout_s must be > 0"),
        (("parallel.sequence_parallel", "parallel.tp"), not p.sequence_parallel or p.tp > 1,
         "parallel.sequence_parallel needs parallel.tp > 1"),
        (("model.precision", "model.layer_spec"), m.precision != "fp8" or m.layer_spec == "te",
         "model.precision=fp8 needs model.layer_spec=te"),
        (("rollout.n",), ro.n >= 1, "rollout.n must be >= 1"),
        (("rollout.temperature",), ro.temperature > 0, "rollout.temperature must be > 0"),
        (("rollout.top_p",), 0 < ro.top_p <= 1, "rollout.top_p must be in (0, 1]"),
        (("train.steps",), t.steps >= 0, "train.steps must be >= 0"),
        (("train.prompts_per_step",), t.prompts_per_step >= 1, "train.prompts_per_step must be >= 1"),
        (("train.micro_batch_size",), t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (("train.checkpoint_interval",), t.checkpoint_interval >= 1, "train.checkpoint_interval must be >= 1"),
        (("train.updates_per_step",), t.updates_per_step >= 1, "train.updates_per_step must be >= 1"),
        (("train.max_tokens_per_micro_batch",),
         t.max_tokens_per_micro_batch is None or t.max_tokens_per_micro_batch >= 1,
         "train.max_tokens_per_micro_batch must be >= 1 (or null)"),
        (("train.max_bad_steps",), t.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (("train.sync_bucket_mb",), t.sync_bucket_mb >= 1, "train.sync_bucket_mb must be >= 1"),
        (("train.cpu_threads",), t.cpu_threads is None or t.cpu_threads >= 1,
         "train.cpu_threads must be >= 1 (or null)"),
        (("rollout.max_new_tokens",), ro.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1"),
        (("rollout.max_batch_sequences",), ro.max_batch_sequences >= 1, "rollout.max_batch_sequences must be >= 1"),
        (("rollout.gpu_memory_utilization",), 0 < ro.gpu_memory_utilization < 1,
         "rollout.gpu_memory_utilization must be in (0, 1)"),
        (("rollout.tp",), ro.tp is None or ro.tp >= 1, "rollout.tp must be >= 1 (or null)"),
        (("rollout.max_images",), ro.max_images >= 0, "rollout.max_images must be >= 0"),
        (("rollout.sleep_level",), ro.sleep_level in (1, 2), "rollout.sleep_level must be 1 or 2"),
        (("algo.max_resample_rounds",), a.max_resample_rounds >= 0, "algo.max_resample_rounds must be >= 0"),
        (("algo.overlong_buffer", "rollout.max_new_tokens"),
         0 <= a.overlong_buffer < ro.max_new_tokens or a.overlong_buffer == 0,
         "algo.overlong_buffer must be >= 0 and < rollout.max_new_tokens"),
        (("algo.policy_loss", "algo.loss_agg"), a.policy_loss != "gspo" or a.loss_agg == "seq_mean",
         "algo.policy_loss=gspo is a per-sequence objective: it needs algo.loss_agg=seq_mean"),
        (("algo.tis_cap",), a.tis_cap is None or a.tis_cap > 0, "algo.tis_cap must be > 0 (or null)"),
        (("reward.timeout_s",), rw.timeout_s > 0, "reward.timeout_s must be > 0"),
        (("reward.workers",), rw.workers >= 1, "reward.workers must be >= 1"),
        (("algo.clip_low", "algo.clip_high"), a.clip_low >= 0 and a.clip_high >= 0,
         "algo.clip_low and clip_high must be >= 0"),
        (("optim.lr",), o.lr >= 0, "optim.lr must be >= 0"),
        (("data.min_pixels", "data.max_pixels"), 0 < d.min_pixels <= d.max_pixels,
         "data.min_pixels must be > 0 and <= data.max_pixels"),
        (("data.curate",), d.curate is None or (
            d.curate.n >= 1 and len(d.curate.keep) == 2 and 0 <= d.curate.keep[0] <= d.curate.keep[1] <= 1
            and bool(d.curate.model)),
         "data.curate: n must be >= 1, keep a pair [LO, HI] with 0 <= LO <= HI <= 1, and model 'previous' or an "
         "HF directory"),
        (("data.num_workers", "data.shuffle_buffer_size", "data.max_samples_per_sequence"),
         d.num_workers >= 0 and d.shuffle_buffer_size >= 1 and d.max_samples_per_sequence >= 1,
         "data.num_workers must be >= 0; data.shuffle_buffer_size and max_samples_per_sequence >= 1"),
    ] + [(("data.datasets",), ds.weight > 0, f"data.datasets[{i}].weight must be > 0")
         for i, ds in enumerate(d.datasets)]


def _hf_backbone(r: Recipe):
    """The numbers of model.hf_path/config.json when it holds a readable Qwen2.5-VL config (the
    model builder reads the same file), else None: the backbones table decides."""
    if not r.model.hf_path or not os.path.isfile(os.path.join(r.model.hf_path, "config.json")):
        return None
    try:
        return Backbone.from_hf_dir(r.model.hf_path, name=r.model.backbone)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the builder reports a broken config.json when it gets there


def _model_rules(r: Recipe) -> list[tuple[tuple[str, ...], str]]:
    """(keys, message) of what the backbone cannot do: an unknown name, a TP or PP size that does
    not split its heads, MLP, vocabulary or layers (backbones.check_parallel_layout)."""
    name, tp, pp = r.model.backbone, r.parallel.tp, r.parallel.pp
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, list(BACKBONES), n=1, cutoff=0.3)
        return [(("model.backbone",), f"model.backbone: {name!r} is not in the backbones table"
                 + (f"; did you mean {close[0]!r}?" if close else "") + f" (known: {', '.join(BACKBONES)})")]
    if tp < 1 or pp < 1:
        return []  # said by the >= 1 rule
    bb = _hf_backbone(r) or BACKBONES[name]
    for key, size, problem, sizes in (
            ("parallel.tp", tp, _layout_problem(bb, tp, 1), [(t, 1) for t in range(1, 65)]),
            ("parallel.pp", pp, _layout_problem(bb, 1, pp), [(1, q) for q in range(1, bb.num_layers + 1)])):
        if problem:
            ok = ", ".join(str(max(t, q)) for t, q in sizes if _layout_problem(bb, t, q) is None)
            return [((key, "model.backbone", "model.hf_path"), f"{key}={size}: {problem} ({key[9:]} can be {ok})")]
    return []


def _layout_problem(bb, tp: int, pp: int) -> Optional[str]:
    try:
        check_parallel_layout(bb, tp, pp)
    except ValueError as e:
        return str(e)
    return None


def layout_errors(r: Recipe, world_size: int) -> list[str]:
    """What `world_size` processes cannot do with this recipe: dp = world size / (tp x pp x cp),
    and each data-parallel rank owns whole prompt groups."""
    return [msg for _, msg in _layout_rules(r, world_size)]


def _layout_rules(r: Recipe, world_size: int) -> list[tuple[tuple[str, ...], str]]:
    mp = r.parallel.tp * r.parallel.pp * r.parallel.cp
    if mp < 1:
        return []
    if world_size % mp:
        return [(("parallel.tp", "parallel.pp", "parallel.cp"),
                 f"world size {world_size} is not divisible by parallel.tp x pp x cp = {mp} "
                 f"(launch tp*pp*cp*dp processes, e.g. torchrun --nproc-per-node {mp})")]
    dp, per = world_size // mp, r.train.prompts_per_step
    if per % dp:
        return [(("train.prompts_per_step",), f"train.prompts_per_step={per} does not split over {dp} data-parallel "
                 "ranks (each rank owns whole prompt groups)")]
    if per // dp < r.train.updates_per_step:
        return [(("train.updates_per_step", "train.prompts_per_step"),
                 f"train.updates_per_step={r.train.updates_per_step} exceeds the prompts per data-parallel "
                 f"rank ({per // dp}): every update needs at least one group")]
    return []


def _micro_batch_note(r: Recipe, world_size: Optional[int]) -> list[str]:
    """A micro-batch size that leaves a short last micro-batch: correct (padding and filler rows are
    masked out of the loss) but rarely meant."""
    t, mp = r.train, r.parallel.tp * r.parallel.pp * r.parallel.cp
    if t.max_tokens_per_micro_batch is not None or min(t.micro_batch_size, t.updates_per_step, r.rollout.n, mp) < 1:
        return []
    dp = world_size // mp if world_size and world_size % mp == 0 else 1
    if t.prompts_per_step % (dp * t.updates_per_step):
        return []  # uneven by construction (or a DP error)
    samples = t.prompts_per_step // (dp * t.updates_per_step) * r.rollout.n
    if samples <= t.micro_batch_size or samples % t.micro_batch_size == 0:
        return []
    where = f" on each of {dp} data-parallel ranks" if dp > 1 else ""
    return [f"train.micro_batch_size={t.micro_batch_size} does not divide the {samples} samples of an update{where} "
            f"(train.prompts_per_step x rollout.n / train.updates_per_step{' / dp' if dp > 1 else ''}): "
            f"the last micro-batch holds {samples % t.micro_batch_size}"
            + (" and is filled with masked rows under pipeline parallelism" if r.parallel.pp > 1 else "")]


def cross_checks(r: Recipe, origins: dict, skip: set, world_size: Optional[int]) -> tuple[list[str], list[str]]:
    """(errors, notes) of the rules between fields. A rule reading a key that already failed is
    skipped; each error names where its first key was set (file or command line)."""
    def hit(keys):
        return any(k == b or k.startswith(b + ".") or b.startswith(k + ".") for k in keys for b in skip)

    def where(keys):
        src = next((origins[k] for k in keys if k in origins), None)
        return f"{src}: " if src else ""

    found = [(keys, msg) for keys, ok, msg in _rules(r) if not ok] + _model_rules(r)
    errors = [where(keys) + msg for keys, msg in found if not hit(keys)]
    if world_size is not None and not errors and not skip:
        errors += [where(keys) + msg for keys, msg in _layout_rules(r, world_size)]
    notes = _micro_batch_note(r, world_size) if not errors else []
    return errors, notes
