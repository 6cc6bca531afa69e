"""Everything one phase needs, built once from the recipe: model, optimizer, schedule, reference
model, rollout engine, data, rewards, weight sync. `check_recipe` refuses what the run cannot honour
before anything is started."""
from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megammr import runtime
from megammr.backbones import Backbone, get_backbone
from megammr.config import Recipe, RecipeError
from megammr.config.rules import layout_errors
from megammr.data.loader import PhaseDataLoader
from megammr.data.synthetic import write_all
from megammr.metrics import wandb_missing_message
from megammr.models import te
from megammr.models.checkpoint_io import load_mcore_checkpoint
from megammr.models.mapping import load_hf_into_model
from megammr.models.processor import load_processor
from megammr.models.tiny import write_tiny_model
from megammr.rewards.pool import RewardPool
from megammr.rollout.registry import check_engine, engine_class, resolve_engine
from megammr.train.experience import Experience, replay_steps

# lazy in this module: megatron-core (~2.5 s of imports) and the modules that import it or
# transformers at their top (models.vlm, train.checkpoint, train.sync, warmup). `megammr train`
# runs check_recipe before it launches anything, and a recipe error exits without paying for them.


def check_recipe(r: Recipe, world_size: int, cuda: bool) -> str:
    """Raise RecipeError for a field this run cannot honour; return the rollout engine's name."""
    errors, notes = layout_errors(r, world_size), []  # world size against tp x pp x cp, prompts over DP ranks
    if r.parallel.cp > 1:
        errors.append("parallel.cp > 1: context parallelism is not supported by the trainer (use tp/pp)")
    if r.parallel.sequence_parallel:
        errors.append("parallel.sequence_parallel: not supported by the Qwen2.5-VL model (image features are "
                      "merged into the full-sequence embedding)")
    if not r.model.hf_path:
        errors.append("model.hf_path is required by the trainer (tokenizer, processor, initial weights); "
                      "tools/make_tiny_model.py writes one for the tiny backbone")
    elif not os.path.isfile(os.path.join(r.model.hf_path, "config.json")) and not preparable_tiny(r):
        errors.append(f"model.hf_path {r.model.hf_path}: no config.json there "
                      "(tools/make_tiny_model.py writes a tiny one)")
    if r.train.offload_during_rollout and r.optim.distributed_optimizer and r.model.precision == "fp32":
        errors.append("train.offload_during_rollout with optim.distributed_optimizer in fp32: the optimizer's shards "
                      "are views of the model's weights and cannot move to the CPU (use bf16, or either one alone)")
    engine = _check_engine(r, cuda, errors, notes)
    errors += gpu_model_problems(r, cuda)
    if r.rollout.replay:
        if r.train.save_rollouts:
            errors.append("train.save_rollouts with rollout.replay: a replayed run generates nothing to save")
        if r.algo.dynamic_sampling:
            errors.append("algo.dynamic_sampling with rollout.replay: the replayed groups were already filtered")
        if not os.path.isdir(r.rollout.replay):
            errors.append(f"rollout.replay {r.rollout.replay}: no such directory")
        else:
            missing = sorted(set(range(1, r.train.steps + 1)) - replay_steps(r.rollout.replay))
            if missing:
                errors.append(f"rollout.replay {r.rollout.replay}: no saved rollouts for steps {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} (train.steps={r.train.steps})")
    if r.train.wandb_project:
        if wandb_missing_message():
            errors.append(wandb_missing_message())
    if errors:
        raise RecipeError(errors)  # every problem, one line each
    # before the process group exists: the launcher's rank decides who speaks
    if notes and (runtime.is_rank0() if dist.is_initialized() else _launcher_rank() == 0):
        for note in notes:
            print(f"megammr train: {note}", flush=True)
    return engine


def _launcher_rank() -> int:
    try:
        return runtime.dist_env_from(os.environ).rank
    except RuntimeError:
        return 0


def _check_engine(r: Recipe, cuda: bool, errors: list, notes: list) -> str:
    """The engine's own rules live with the engine (megammr.rollout.registry.check_engine)."""
    engine, note = resolve_engine(r.rollout.engine, cuda)
    if note:
        notes.append(note)
    if r.rollout.replay:
        return engine  # no engine is built
    bad, warnings = check_engine(r, engine, cuda)
    errors += bad
    notes += [f"warning: {w}" for w in warnings]
    return engine


def gpu_model_problems(r: Recipe, cuda: bool) -> list[str]:
    """What model.layer_spec=te / precision=fp8 cannot honour on this machine (TE is not imported)."""
    m, out = r.model, []
    if m.layer_spec != "te":
        return out
    if not cuda:
        return [f"model.layer_spec=te needs CUDA and transformer-engine ({te.INSTALL_HINT}); "
                "use model.layer_spec=local on CPU"]
    ver = te.te_version()
    if ver is None:
        out.append(f"model.layer_spec=te: transformer-engine is not installed ({te.INSTALL_HINT}), "
                   "or use model.layer_spec=local")
    if m.precision == "fp8":
        cap = torch.cuda.get_device_capability()
        out += [p for p in te.fp8_problems(m.fp8_recipe, ver, cap, torch.version.cuda) if ver is not None
                or "transformer-engine" not in p]
        bb = _backbone_if_known(r)
        if bb is not None:
            out += [f"model.precision=fp8: {p} (FP8 GEMMs need it)" for p in te.fp8_shape_problems(bb, r.parallel.tp)]
    return out


def _backbone_if_known(r: Recipe):
    try:
        if r.model.hf_path and os.path.isfile(os.path.join(r.model.hf_path, "config.json")):
            return Backbone.from_hf_dir(r.model.hf_path, name=r.model.backbone)
        return get_backbone(r.model.backbone)
    except (ValueError, KeyError, OSError):
        return None  # reported elsewhere (config.json) or at model build


def preparable_tiny(r: Recipe) -> bool:
    """The embedded default: a tiny backbone whose model and bundled data this run can create."""
    return r.model.backbone == "tiny" and bool(r.model.hf_path)


def prepare_tiny(r: Recipe, log=print) -> None:
    """Create what the tiny default needs when absent (rank 0 only; the caller synchronises):
    bundled data for a dataset path named phase1/2/3 (tools/make_synthetic_data.py), and at
    model.hf_path a random tiny Qwen2.5-VL given a short supervised format warm-up on the
    phase-1 data (megammr.warmup: without it a random model never writes the answer
    format, every reward is 0 and GRPO has nothing to learn from)."""
    if not preparable_tiny(r):
        return
    data_roots = set()
    for d in r.data.datasets:
        m = re.fullmatch(r"phase([123])", os.path.basename(d.path.rstrip("/")))
        if m and not os.path.exists(os.path.join(d.path, "megammr.json")):
            data_roots.add(os.path.dirname(d.path.rstrip("/")) or ".")
    need_model = not os.path.isfile(os.path.join(r.model.hf_path, "config.json"))
    if need_model:
        data_roots.add(os.path.join(os.path.dirname(r.model.hf_path.rstrip("/")) or ".", "data"))
    for root in sorted(data_roots):
        if not os.path.exists(os.path.join(root, "phase1", "megammr.json")):
            log(f"megammr train: preparing the bundled data in {root} (tools/make_synthetic_data.py)")
            t0 = time.perf_counter()
            write_all(root, progress=False)
            log(f"megammr train: bundled data ready in {time.perf_counter() - t0:.1f} s")
    if need_model:
        from megammr.warmup import format_warmup
        root = sorted(data_roots)[-1]
        log(f"megammr train: preparing the tiny model in {r.model.hf_path} (random, then a supervised format "
            f"warm-up on {root}/raw/phase1.jsonl)")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tiny-init-") as tmp:
            format_warmup(write_tiny_model(tmp, seed=0), r.model.hf_path, os.path.join(root, "raw", "phase1.jsonl"))
        log(f"megammr train: tiny model ready in {time.perf_counter() - t0:.1f} s")


@dataclass
class Parts:
    recipe: Recipe
    backbone: Any
    model: Any                 # megatron DDP-wrapped Qwen25VLModel (this rank's part)
    module: Any                # the unwrapped model
    optimizer: Any
    scheduler: Any
    ref_model: Optional[Any]   # frozen reference policy (algo.kl_coef > 0), never synced
    engine: Optional[Any]      # RolloutEngine: on the model-parallel source rank (every rank of the
                               # group when it is collective); None in replay
    sync: Optional[Any]
    experience: Any
    pad_id: int
    closers: list


def _mp_source() -> tuple[Any, int, bool]:
    """The model-parallel group, the global rank of its source (TP rank 0, first stage), and whether this is it."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    me = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage()
    ranks = dist.get_process_group_ranks(group)
    flags = [None] * len(ranks)
    dist.all_gather_object(flags, (me, dist.get_rank()), group=group)
    (src,) = [rank for flag, rank in flags if flag]
    return group, src, me


def _load_initial_weights(module, r: Recipe, frozen: bool = False) -> None:
    if r.phase.init_from:
        from megammr.train.checkpoint import resolve
        try:
            path = resolve(r.phase.init_from)
        except (FileNotFoundError, RuntimeError) as e:
            raise RecipeError(f"phase.init_from: {e} (the previous phase has not finished?)") from None
        load_mcore_checkpoint(module, path)
        if not frozen and runtime.is_rank0():
            print(f"megammr train: {r.phase.name}: initial weights from {path}", flush=True)
    else:
        load_hf_into_model(module, r.model.hf_path)


def build_policy(r: Recipe, bb, frozen: bool = False, initial_weights: bool = True):
    """The policy (or, frozen, the reference) model with the phase's initial weights; without
    `initial_weights` the parameters are left unset for a checkpoint load to fill."""
    from megammr.models.vlm import build_model

    module = build_model(bb, r.model, perform_initialization=False)
    # See megammr.train.step: megatron normalises the loss by the step's global token count.
    module.config.calculate_per_token_loss = True
    if initial_weights:
        _load_initial_weights(module, r, frozen)
    if frozen:
        module.requires_grad_(False)
        module.eval()
    return module


def build_optimizer(r: Recipe, module):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = r.optim
    ddp = DistributedDataParallel(
        config=module.config, module=module,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                 use_distributed_optimizer=o.distributed_optimizer))
    module.config.finalize_model_grads_func = finalize_model_grads
    module.config.no_sync_func = ddp.no_sync
    cfg = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                          adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                          clip_grad=o.clip_grad, bf16=r.model.precision != "fp32",
                          use_distributed_optimizer=o.distributed_optimizer)
    opt = get_megatron_optimizer(cfg, [ddp])
    total = max(1, r.train.steps * r.train.updates_per_step)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(total, o.warmup_steps + 1), lr_decay_style=o.schedule,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=total, wd_incr_style="constant")
    return ddp, opt, sched


def build_engine(cls, r: Recipe, rt, *, before_model: bool, group, src: int, is_src: bool):
    """This rank's engine of class `cls` when build() makes it at this point, else None.
    A collective engine lives on every rank of the model-parallel group, any other on its source
    rank; build_before_model engines are made before Megatron allocates, the others after the model."""
    if cls is None or cls.build_before_model != before_model or not (cls.collective or is_src):
        return None
    return cls.build(r, rt, group=group, leader=src, is_leader=is_src)


def build(r: Recipe, rt) -> Parts:
    from megatron.core import parallel_state as ps

    from megammr.train.checkpoint import latest
    from megammr.train.sync import WeightSync

    bb = Backbone.from_hf_dir(r.model.hf_path, name=r.model.backbone)
    mp_group, src, is_src = _mp_source()
    engine_name, _ = resolve_engine(r.rollout.engine, torch.cuda.is_available())
    engine_cls = None if r.rollout.replay else engine_class(engine_name)
    place = dict(group=mp_group, src=src, is_src=is_src)
    engine = build_engine(engine_cls, r, rt, before_model=True, **place)
    try:
        resuming = latest(r.train.output_dir) is not None
    except RuntimeError:  # a broken `latest`: the trainer's resume() reports it
        resuming = False
    # A resumed phase loads every policy weight from its own checkpoint: reading the initial weights
    # first would only cost their I/O (minutes for a 72B model). The reference model is not
    # checkpointed and always starts from the initial weights.
    module = build_policy(r, bb, initial_weights=not resuming)
    ref = build_policy(r, bb, frozen=True) if r.algo.kl_coef > 0 else None
    ddp, opt, sched = build_optimizer(r, module)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    processor = load_processor(r.model.hf_path)
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
    if engine is None:
        engine = build_engine(engine_cls, r, rt, before_model=False, **place)
    loader = pool = None
    closers = []
    if is_src and not r.rollout.replay:
        loader = PhaseDataLoader(r.data, seed=r.train.seed, dp_rank=dp_rank, dp_size=dp_size, tokenizer=tok)
        pool = RewardPool(r.reward)
        closers += [loader.close, pool.close]
    sync = None if r.rollout.replay else WeightSync(module, engine, r.train.sync_bucket_mb)
    exp = Experience(r, engine=engine, loader=loader, pool=pool, dp_rank=dp_rank, dp_size=dp_size,
                     mp_group=mp_group, src=src, is_src=is_src,
                     vision_token_ids=(bb.image_token_id, bb.video_token_id))
    return Parts(r, bb, ddp, module, opt, sched, ref, engine, sync, exp, pad_id, closers)

