"""Everything one phase needs, built once from the recipe: model, optimizer, schedule, reference
model, rollout engine, data, rewards, weight sync. `check_recipe` refuses what the run cannot honour
before anything is started."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megammr.config import Recipe, RecipeError, RolloutConfig
from megammr.config_rules import layout_errors


def check_recipe(r: Recipe, world_size: int, cuda: bool) -> str:
    """Raise RecipeError for a field this run cannot honour; return the rollout engine's name."""
    errors = layout_errors(r, world_size)  # world size against tp x pp x cp, prompts over DP ranks
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
    engine = r.rollout.engine
    if engine == "vllm":
        errors.append("rollout.engine=vllm: the vLLM engine is not part of this build yet; use 'transformers'")
    engine = "transformers"
    defaults = RolloutConfig()
    for name in ("gpu_memory_utilization", "tp", "enforce_eager"):
        if getattr(r.rollout, name) != getattr(defaults, name):
            errors.append(f"rollout.{name} is a vLLM setting: the transformers engine cannot honour it "
                          f"(remove it or set rollout.engine=vllm)")
    if r.rollout.replay:
        if r.train.save_rollouts:
            errors.append("train.save_rollouts with rollout.replay: a replayed run generates nothing to save")
        if r.algo.dynamic_sampling:
            errors.append("algo.dynamic_sampling with rollout.replay: the replayed groups were already filtered")
        if not os.path.isdir(r.rollout.replay):
            errors.append(f"rollout.replay {r.rollout.replay}: no such directory")
        else:
            from megammr.train.experience import replay_steps
            missing = sorted(set(range(1, r.train.steps + 1)) - replay_steps(r.rollout.replay))
            if missing:
                errors.append(f"rollout.replay {r.rollout.replay}: no saved rollouts for steps {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''} (train.steps={r.train.steps})")
    if errors:
        raise RecipeError(errors)  # every problem, one line each
    return engine


def preparable_tiny(r: Recipe) -> bool:
    """The embedded default: a tiny backbone whose model and bundled data this run can create."""
    return r.model.backbone == "tiny" and bool(r.model.hf_path)


def prepare_tiny(r: Recipe, log=print) -> None:
    """Create what the tiny default needs when absent (rank 0 only; the caller synchronises):
    bundled data for a dataset path named phase1/2/3 (tools/make_synthetic_data.py), and at
    model.hf_path a random tiny Qwen2.5-VL given a short supervised format warm-up on the
    phase-1 data (megammr.models.warmup: without it a random model never writes the answer
    format, every reward is 0 and GRPO has nothing to learn from)."""
    import re
    import tempfile

    from megammr.data.synthetic import write_all

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
            write_all(root, progress=False)
    if need_model:
        from megammr.models.tiny import write_tiny_model
        from megammr.models.warmup import format_warmup
        root = sorted(data_roots)[-1]
        log(f"megammr train: preparing the tiny model in {r.model.hf_path} (random, then a supervised format "
            f"warm-up on {root}/raw/phase1.jsonl)")
        with tempfile.TemporaryDirectory(prefix="tiny-init-") as tmp:
            format_warmup(write_tiny_model(tmp, seed=0), r.model.hf_path, os.path.join(root, "raw", "phase1.jsonl"))


@dataclass
class Parts:
    recipe: Recipe
    backbone: Any
    model: Any                 # megatron DDP-wrapped Qwen25VLModel (this rank's part)
    module: Any                # the unwrapped model
    optimizer: Any
    scheduler: Any
    ref_model: Optional[Any]   # frozen reference policy (algo.kl_coef > 0), never synced
    engine: Optional[Any]      # rollout engine (model-parallel source rank, not in replay)
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
    from megammr.models.mapping import load_hf_into_model
    from megammr.models.parity import load_mcore_checkpoint

    if r.phase.init_from:
        from megammr.train.checkpoint import resolve
        try:
            path = resolve(r.phase.init_from)
        except (FileNotFoundError, RuntimeError) as e:
            raise RecipeError(f"phase.init_from: {e} (the previous phase has not finished?)") from None
        load_mcore_checkpoint(module, path)
        if not frozen and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            print(f"megammr train: {r.phase.name}: initial weights from {path}", flush=True)
    else:
        load_hf_into_model(module, r.model.hf_path)


def build_policy(r: Recipe, bb, frozen: bool = False):
    from megammr.models.vlm import build_model

    m = r.model
    module = build_model(bb, m.layer_spec, m.precision, m.fp8_recipe, m.recompute, perform_initialization=False,
                         freeze_vision=m.freeze_vision)
    # See megammr.train.step: megatron normalises the loss by the step's global token count.
    module.config.calculate_per_token_loss = True
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


def build(r: Recipe, rt) -> Parts:
    from megammr.models.backbones import Backbone
    from megammr.models.processor import load_processor
    from megammr.train.experience import Experience
    from megammr.train.sync import WeightSync

    with open(os.path.join(r.model.hf_path, "config.json")) as f:
        bb = Backbone.from_hf_config(json.load(f), name=r.model.backbone)
    module = build_policy(r, bb)
    ref = build_policy(r, bb, frozen=True) if r.algo.kl_coef > 0 else None
    ddp, opt, sched = build_optimizer(r, module)

    from megatron.core import parallel_state as ps
    mp_group, src, is_src = _mp_source()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    processor = load_processor(r.model.hf_path)
    tok = processor.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
    engine = loader = pool = None
    closers = []
    if is_src and not r.rollout.replay:
        from megammr.data.loader import PhaseDataLoader
        from megammr.rewards.pool import RewardPool
        from megammr.rollout.hf_engine import TransformersEngine

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[r.model.precision]
        engine = TransformersEngine.from_pretrained(
            r.model.hf_path, device=str(rt.device), dtype=dtype, max_batch_sequences=r.rollout.max_batch_sequences,
            min_pixels=r.data.min_pixels, max_pixels=r.data.max_pixels)
        loader = PhaseDataLoader(r.data, seed=r.train.seed, dp_rank=dp_rank, dp_size=dp_size, tokenizer=tok)
        pool = RewardPool(r.reward)
        closers += [loader.close, pool.close]
    sync = None if r.rollout.replay else WeightSync(module, engine, r.train.sync_bucket_mb)
    exp = Experience(r, engine=engine, loader=loader, pool=pool, dp_rank=dp_rank, dp_size=dp_size,
                     mp_group=mp_group, src=src, is_src=is_src,
                     vision_token_ids=(bb.image_token_id, bb.video_token_id))
    return Parts(r, bb, ddp, module, opt, sched, ref, engine, sync, exp, pad_id, closers)

