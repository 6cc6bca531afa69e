"""The memory planner behind `megammr plan`: per-rank bytes of one training step and of the rollout.

Static parts are exact, not estimated: the parameters each rank holds are listed in the order
megatron-core builds them (megammr.models.vlm: the vision tower and merger on the first stage,
then GPTModel's embedding, decoder layers, final norm and output layer, TP-sharded as megatron
shards them), and megatron's DDP grad buffer and DistributedOptimizer shards are laid out with its
own padding rules (megatron/core/distributed/param_and_grad_buffer.py, 0.16: with the distributed
optimizer each parameter starts at a multiple of 64 elements, the bucket ends at a multiple of
lcm(dp, 128), and a shared embedding gets its own bucket; one bucket per buffer since
overlap_grad_reduce is off). tests/unit/test_plan.py and tests/dist/test_plan_memory.py compare
these figures with the bytes the built model and optimizer allocate. Layout rules are the
trainer's own (megammr.config.load_recipe with the world size: check_parallel_layout and
layout_errors).

Activations are counted tensor by tensor (`activation_bytes_per_layer`: exact for the local spec on CPU,
derived for TE), the rollout's KV budget is an upper bound (vLLM's own activation peak is not known here).
Imports only megammr.config and megammr.backbones (pure arithmetic: no torch, no megatron).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

from megammr.backbones import Backbone, get_backbone
from megammr.config import Recipe, RecipeError, RecipeWarning, load_recipe
from megammr.config.rules import layout_errors

GIB = 2 ** 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 2}  # fp8 trains bf16 weights (TE casts per GEMM)

ACTIVATION_FORMULA = (
    "saved tensors per decoder layer and micro-batch of T tokens, the method of Korthikanti et al. 2022 "
    "('Reducing Activation Recomputation in Large Transformer Models', sec. 4.1: sbh(34 + 5as/h) for GPT without "
    "SP/recompute, TP dividing all but the norms and the inputs of the TP regions) re-derived for this decoder: "
    "dropout p=0 (no masks), flash/SDPA attention (no a*s^2 scores: fp32 softmax statistics 4*a/tp bytes/token), "
    "GQA, SwiGLU, unfused rotary (cos and sin saved for q and k). te: T*[2*(2*b*h + 4) + 4*b*d + "
    "b*((a + 2*kv)*d + a*d + 5*I)/tp + 4*a/tp]; local (measured equal on CPU): T*[2*(8*h + 4) + 2*b*h + 4*b*d + "
    "b*(4*a*d + 5*I)/tp + 4*a/tp] (fp32 RMSNorms, K and V expanded to a heads for SDPA); b = bytes of the model "
    "dtype; stage k of pp holds min(pp - k, micro-batches) micro-batches in flight (1F1B); model.recompute=full "
    "keeps b*T*h per layer plus one layer's set")
NOT_COUNTED = ("vision-tower activations, the embedding output, CUDA context / NCCL / TE workspaces, allocator "
               "fragmentation, vLLM's own activation peak (inside its gpu_memory_utilization claim), "
               "AdamW's scalar 'step' tensors")


# --------------------------------------------------------------------------- parameters per rank
def rank_parameters(bb: Backbone, tp: int, pp: int, stage: int) -> list[tuple[str, int, bool]]:
    """(name, numel, is_vision) of every parameter one rank of `stage` holds, in named_parameters()
    order of megammr.models.vlm.Qwen25VLModel with the local layer spec."""
    v = bb.vision
    out: list[tuple[str, int, bool]] = []
    first, last = stage == 0, stage == pp - 1
    if first:
        vh, vi = v.hidden_size, v.intermediate_size
        out.append(("vision_model.patch_embed.proj.weight",
                    vh * v.in_channels * v.temporal_patch_size * v.patch_size ** 2, True))
        for i in range(v.depth):
            p = f"vision_model.blocks.{i}."
            out += [(p + "norm1.weight", vh, True), (p + "norm2.weight", vh, True),
                    (p + "attn.qkv.weight", 3 * vh * vh, True), (p + "attn.qkv.bias", 3 * vh, True),
                    (p + "attn.proj.weight", vh * vh, True), (p + "attn.proj.bias", vh, True)]
            for name in ("gate_proj", "up_proj"):
                out += [(p + f"mlp.{name}.weight", vi * vh, True), (p + f"mlp.{name}.bias", vi, True)]
            out += [(p + "mlp.down_proj.weight", vh * vi, True), (p + "mlp.down_proj.bias", vh, True)]
        m = vh * v.spatial_merge_size ** 2
        out += [("vision_model.merger.ln_q.weight", vh, True), ("vision_model.merger.mlp.0.weight", m * m, True),
                ("vision_model.merger.mlp.0.bias", m, True),
                ("vision_model.merger.mlp.2.weight", v.out_hidden_size * m, True),
                ("vision_model.merger.mlp.2.bias", v.out_hidden_size, True)]
    h, d, a, kv = bb.hidden_size, bb.head_dim, bb.num_heads, bb.num_kv_heads
    ffn, vocab = bb.intermediate_size, bb.vocab_size
    lm = "language_model."
    if first:
        out.append((lm + "embedding.word_embeddings.weight", vocab // tp * h, False))
    per_stage = bb.num_layers // pp
    qkv = (a + 2 * kv) * d // tp
    for i in range(per_stage):
        p = f"{lm}decoder.layers.{i}."
        out += [(p + "input_layernorm.weight", h, False),
                (p + "self_attention.linear_proj.weight", h * (a * d // tp), False),
                (p + "self_attention.linear_qkv.weight", qkv * h, False),
                (p + "self_attention.linear_qkv.bias", qkv, False),
                (p + "pre_mlp_layernorm.weight", h, False),
                (p + "mlp.linear_fc1.weight", 2 * ffn // tp * h, False),
                (p + "mlp.linear_fc2.weight", h * (ffn // tp), False)]
    if last:
        out.append((lm + "decoder.final_layernorm.weight", h, False))
        if not bb.tie_word_embeddings or not first:
            out.append((lm + "output_layer.weight", vocab // tp * h, False))
    return out


def parameter_count(bb: Backbone) -> int:
    """Every parameter of the whole model (TP=1, PP=1)."""
    return sum(n for _, n, _ in rank_parameters(bb, 1, 1, 0))


def _shared_embedding(bb: Backbone, pp: int, name: str) -> bool:
    """megatron marks the tied embedding / output copy `shared_embedding` only when PP > 1."""
    return bb.tie_word_embeddings and pp > 1 and name.endswith(("word_embeddings.weight", "output_layer.weight"))


def grad_buffer_layout(params: list[tuple[str, int, bool]], dp: int, distributed: bool) -> tuple[list, list]:
    """megatron's _ParamAndGradBuffer layout of `params` (the trainable ones, in named_parameters
    order): ([(start, end, bucket)] per param in that order, [(bucket_start, bucket_end)])."""
    index: dict[int, tuple[int, int, int]] = {}
    buckets: list[tuple[int, int]] = []
    pad = (lambda n, k: -(-n // k) * k)
    bucket_end_div = math.lcm(dp, 128)
    start = bucket_start = 0
    n_in_bucket = 0
    end = 0
    for i in range(len(params) - 1, -1, -1):  # megatron walks the parameters backwards
        name, numel, shared = params[i]
        if distributed:
            start = pad(start, 64)
        if shared and distributed and n_in_bucket:
            e = pad(start, bucket_end_div)
            buckets.append((bucket_start, e))
            bucket_start, start, n_in_bucket = e, e, 0
        end = start + numel
        index[i] = (start, end, len(buckets))
        n_in_bucket += 1
        if shared and distributed:
            e = pad(end, bucket_end_div)
            buckets.append((bucket_start, e))
            bucket_start, start, n_in_bucket = e, e, 0
        else:
            start = end
    if n_in_bucket:
        buckets.append((bucket_start, pad(end, bucket_end_div) if distributed else end))
    return [index[i] for i in range(len(params))], buckets


@dataclass
class StaticBytes:
    """One rank's exact static bytes: weights (params, or megatron's param buffer with the distributed
    optimizer, plus frozen params), grad buffer, optimizer (fp32 main copies that are not the weights
    themselves + Adam exp_avg + exp_avg_sq), and the counts behind them."""
    weights: int
    grads: int
    optimizer: int
    params: int           # parameters on this rank
    trainable: int        # of which in the grad buffer
    buffer_numel: int     # grad buffer elements, padding included
    shard_numel: int      # elements this DP rank's optimizer updates


def param_bytes(name: str, precision: str, layer_spec: str) -> int:
    """Bytes per element of a parameter: the model dtype, except the decoder's RMSNorm weights with the
    local spec (torch.nn.RMSNorm, which megatron does not cast: they stay fp32; TE's are params_dtype)."""
    norm = name.endswith(("input_layernorm.weight", "pre_mlp_layernorm.weight", "final_layernorm.weight"))
    return 4 if norm and layer_spec == "local" else DTYPE_BYTES[precision]


def static_bytes(bb: Backbone, tp: int, pp: int, stage: int, dp: int, dp_rank: int, precision: str,
                 distributed_optimizer: bool, freeze_vision: bool, layer_spec: str) -> StaticBytes:
    """Exactly what megammr.train.setup.build_policy + build_optimizer allocate on one rank: megatron's
    DDP makes one buffer per parameter dtype (grads reduced in fp32: grad_reduce_in_fp32=True), in
    the order the dtypes first appear; 16-bit parameters get fp32 main copies, fp32 ones are their
    own main parameters."""
    params = rank_parameters(bb, tp, pp, stage)
    groups: dict[int, list] = {}
    frozen = 0
    for n, k, vis in params:
        b = param_bytes(n, precision, layer_spec)
        if vis and freeze_vision:
            frozen += k * b
        else:
            groups.setdefault(b, []).append((n, k, _shared_embedding(bb, pp, n)))
    weights, grads, optimizer, numel_all, shard_all, trainable = frozen, 0, 0, 0, 0, 0
    for b, train in groups.items():
        ranges, buckets = grad_buffer_layout(train, dp, distributed_optimizer)
        numel = buckets[-1][1] if buckets else 0
        count = sum(k for _, k, _ in train)
        if distributed_optimizer:
            shard = 0
            for i, (bs, be) in enumerate(buckets):
                size = (be - bs) // dp
                lo, hi = bs + dp_rank * size, bs + (dp_rank + 1) * size
                shard += sum(max(0, min(e, hi) - max(s, lo)) for s, e, bk in ranges if bk == i)
            weights += numel * b  # the parameters are views into the DDP param buffer
        else:
            shard = count
            weights += count * b
        optimizer += (4 * shard if b < 4 else 0) + 2 * 4 * shard  # fp32 main copy of 16-bit params; 2 moments
        grads += numel * 4
        numel_all, shard_all, trainable = numel_all + numel, shard_all + shard, trainable + count
    return StaticBytes(weights=weights, grads=grads, optimizer=optimizer, params=sum(k for _, k, _ in params),
                       trainable=trainable, buffer_numel=numel_all, shard_numel=shard_all)


# --------------------------------------------------------------------------- activations, rollout
def max_sequence_tokens(r: Recipe) -> int:
    return r.data.max_prompt_tokens + r.rollout.max_new_tokens


def micro_batch_tokens(r: Recipe) -> int:
    """Tokens of the largest micro-batch: the token budget, else rows x the longest sequence."""
    t = r.train
    return t.max_tokens_per_micro_batch or t.micro_batch_size * max_sequence_tokens(r)


def activation_bytes_per_layer(bb: Backbone, tokens: int, tp: int, act_bytes: int, layer_spec: str) -> int:
    """Bytes autograd saves in one decoder layer for a micro-batch of `tokens` (ACTIVATION_FORMULA).

    local (megatron's local spec with SDPA: the CPU path, measured equal in tests/unit/test_plan.py):
    each RMSNorm (torch, fp32 weights) saves its fp32 input, rstd and normalised output, and the linear
    after it its own input; SDPA gets K and V expanded to all heads. te: TE's LayerNormLinear saves
    input, rstd and the norm output once; its fused attention takes GQA K and V as they are. Both:
    q/k rotary saves cos and sin for each (4*d per token), attention saves q, k, v, its output and
    fp32 log-sum-exp; SwiGLU saves fc1's output (2I), the gate's input and silu output (I each) and
    fc2's input (I)."""
    h, d, a, kv, ffn, b = bb.hidden_size, bb.head_dim, bb.num_heads, bb.num_kv_heads, bb.intermediate_size, act_bytes
    t = tokens
    if layer_spec == "local":
        fixed = 2 * (8 * h + 4) + 2 * b * h + 4 * b * d
        sharded = b * (4 * a * d + 5 * ffn)
    else:
        fixed = 2 * (2 * b * h + 4) + 4 * b * d
        sharded = b * ((a + 2 * kv) * d + a * d + 5 * ffn)
    return t * fixed + t * sharded // tp + 4 * t * a // tp


def activation_bytes(r: Recipe, bb: Backbone, per_layer: int, tokens: int, layers: int, in_flight: int) -> int:
    """A stage's activations: every layer's saved tensors for each micro-batch in flight; with
    model.recompute=full (uniform, one layer per checkpoint: megammr.models.vlm) only each layer's
    input (b*T*h) is kept, plus one layer's full set while it is recomputed in the backward pass.
    model.recompute=selective recomputes the attention scores, which flash attention never stores:
    counted as no recompute."""
    if r.model.recompute == "full":
        return DTYPE_BYTES[r.model.precision] * tokens * bb.hidden_size * layers * in_flight + per_layer
    return per_layer * layers * in_flight


def kv_bytes_per_token(bb: Backbone, rollout_tp: int, dtype_bytes: int) -> int:
    """2 (K and V) x layers x kv heads on a rank (replicated when rollout tp > kv heads) x head_dim x bytes."""
    return 2 * bb.num_layers * max(1, bb.num_kv_heads // rollout_tp) * bb.head_dim * dtype_bytes


def _micro_batches_per_update(r: Recipe, dp: int) -> Optional[int]:
    t = r.train
    if t.max_tokens_per_micro_batch is not None:
        return None  # grouped by length: the count depends on the rollouts
    samples = t.prompts_per_step // dp // t.updates_per_step * r.rollout.n
    return max(1, -(-samples // t.micro_batch_size))


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int
    nodes: int
    gpu_mem_gib: float

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


def _backbone(r: Recipe) -> Backbone:
    return get_backbone(r.model.backbone)


def plan(r: Recipe, hw: Hardware) -> dict:
    """Every figure of `megammr plan`, in bytes (GiB under *_gib keys), for the largest stage."""
    errors = layout_errors(r, hw.world_size)
    if errors:
        raise RecipeError(errors)
    bb = _backbone(r)
    tp, pp = r.parallel.tp, r.parallel.pp
    dp = r.data_parallel_size(hw.world_size)
    wb = DTYPE_BYTES[r.model.precision]
    mem = hw.gpu_mem_gib * GIB
    tokens = micro_batch_tokens(r)
    n_micro = _micro_batches_per_update(r, dp)
    per_layer = activation_bytes_per_layer(bb, tokens, tp, wb, r.model.layer_spec)
    ref = r.algo.kl_coef > 0
    stages = []
    for s in range(pp):
        st = max((static_bytes(bb, tp, pp, s, dp, k, r.model.precision, r.optim.distributed_optimizer,
                               r.model.freeze_vision, r.model.layer_spec) for k in range(dp)),
                 key=lambda x: x.optimizer)
        ref_bytes = sum(k * param_bytes(n, r.model.precision, r.model.layer_spec)
                        for n, k, _ in rank_parameters(bb, tp, pp, s)) if ref else 0
        in_flight = min(pp - s, n_micro) if n_micro is not None else pp - s
        act = activation_bytes(r, bb, per_layer, tokens, bb.num_layers // pp, in_flight)
        logits = tokens * (bb.vocab_size // tp) * wb + 4 * 4 * tokens if s == pp - 1 else 0
        train_total = st.weights + st.grads + st.optimizer + ref_bytes + act + logits
        stages.append(dict(stage=s, params=st.params, weights=st.weights, grads=st.grads, optimizer=st.optimizer,
                           reference=ref_bytes, activations=act, micro_batches_in_flight=in_flight, logits=logits,
                           train_total=train_total))
    worst = max(stages, key=lambda x: x["train_total"])
    engine = "vllm" if r.rollout.engine in ("vllm", "auto") else r.rollout.engine  # auto is vLLM on a GPU
    offload = r.train.offload_during_rollout
    rollout: dict = dict(engine=engine, offload_during_rollout=offload)
    resident = []
    for s in stages:
        freed = s["grads"] + (s["optimizer"] if not (r.optim.distributed_optimizer and r.model.precision == "fp32")
                              else 0)
        keep = s["weights"] + s["reference"] + s["grads"] + s["optimizer"] - (freed if offload else 0)
        resident.append((keep, freed))
    keep, freed = max(resident)
    rollout.update(trainer_resident=keep, offload_frees=freed)
    if engine == "vllm":
        rtp = r.rollout.tp or tp
        vw = sum(k for _, k, _ in rank_parameters(bb, rtp, 1, 0)) * wb
        claim = r.rollout.gpu_memory_utilization * mem
        kv_tok = kv_bytes_per_token(bb, rtp, wb)
        kv_budget = claim - vw
        kv_tokens = max(0, int(kv_budget // kv_tok))
        seq = max_sequence_tokens(r)
        rollout.update(tp=rtp, gpu_memory_utilization=r.rollout.gpu_memory_utilization, vllm_claim=claim,
                       vllm_weights=vw, kv_bytes_per_token=kv_tok, kv_budget=kv_budget, kv_tokens=kv_tokens,
                       kv_sequences=kv_tokens // seq, total=keep + claim)
        rollout_short = max(keep + claim - mem, 0.0)
        if kv_tokens < seq:  # not one longest sequence fits in the KV cache
            rollout_short = max(rollout_short, (seq - kv_tokens) * kv_tok)
    else:
        rollout.update(total=keep, note=f"the {engine} engine's memory is not estimated")
        rollout_short = max(keep - mem, 0.0)
    train_short = max(worst["train_total"] - mem, 0.0)
    short = max(train_short, rollout_short)
    return dict(
        backbone=bb.name, parameters=parameter_count(bb), gpus=hw.world_size, gpus_per_node=hw.gpus_per_node,
        nodes=hw.nodes, gpu_mem=mem, tp=tp, pp=pp, dp=dp, precision=r.model.precision,
        distributed_optimizer=r.optim.distributed_optimizer, reference_model=ref,
        micro_batch_tokens=tokens, max_sequence_tokens=max_sequence_tokens(r),
        micro_batches_per_update=n_micro, layers_per_stage=bb.num_layers // pp,
        activation_bytes_per_layer=per_layer, stages=stages, largest_stage=worst["stage"], train=worst,
        rollout=rollout, fits=short == 0, short_by=short, train_short_by=train_short, rollout_short_by=rollout_short,
        activation_formula=ACTIVATION_FORMULA, not_counted=NOT_COUNTED)


NODES = "--nodes"  # a change of the machine rather than the recipe: more nodes (more DP, or room for more PP)


def _fitting_micro_batch(path, overrides, hw, r: Recipe) -> Optional[str]:
    """The largest smaller micro-batch (rows, or token budget in whole longest sequences) whose
    training step fits, re-planned; else the smallest one, when it is smaller than now."""
    t, seq = r.train, max_sequence_tokens(r)
    if t.max_tokens_per_micro_batch is None:
        key, sizes = "train.micro_batch_size", range(t.micro_batch_size - 1, 0, -1)
    else:
        key = "train.max_tokens_per_micro_batch"
        sizes = [k * seq for k in range(t.max_tokens_per_micro_batch // seq, 0, -1)
                 if k * seq < t.max_tokens_per_micro_batch]
    last = None
    for size in sizes:
        last = f"{key}={size}"
        q = _replan(path, overrides, hw, [last])
        if q is not None and q["train_short_by"] == 0:
            return last
    return last


def _candidates(path, overrides, hw: "Hardware", r: Recipe, p: dict) -> list[str]:
    """Single changes worth re-planning, cheapest first (a change of --nodes is the machine's)."""
    out = []
    bb = _backbone(r)
    if not r.optim.distributed_optimizer and p["dp"] > 1:
        out.append("optim.distributed_optimizer=true")
    if p["rollout_short_by"] > 0 and not r.train.offload_during_rollout \
            and not (r.optim.distributed_optimizer and r.model.precision == "fp32"):
        out.append("train.offload_during_rollout=true")
    if p["train_short_by"] > 0:
        mb = _fitting_micro_batch(path, overrides, hw, r)
        if mb:
            out.append(mb)
    ro = p["rollout"]
    if ro.get("engine") == "vllm" and p["rollout_short_by"] > 0:
        free = p["gpu_mem"] - ro["trainer_resident"]
        util = math.floor(free / p["gpu_mem"] * 20) / 20
        if 0 < util < r.rollout.gpu_memory_utilization:
            out.append(f"rollout.gpu_memory_utilization={util:.2f}")
    for pp in range(r.parallel.pp + 1, bb.num_layers + 1):
        if bb.num_layers % pp == 0:
            out.append(f"parallel.pp={pp}")
            break
    if r.optim.distributed_optimizer or r.train.offload_during_rollout:
        out.append(f"{NODES}={hw.nodes * 2}")  # twice the data-parallel ranks shard the optimizer further
    if p["train_short_by"] > 0 and r.model.recompute != "full":
        out.append("model.recompute=full")
    return out


def _hardware(hw: "Hardware", changes: list[str]) -> tuple["Hardware", list[str]]:
    nodes = [int(c.split("=")[1]) for c in changes if c.startswith(NODES + "=")]
    recipe = [c for c in changes if not c.startswith(NODES + "=")]
    return (Hardware(hw.gpus_per_node, nodes[-1], hw.gpu_mem_gib) if nodes else hw), recipe


def _replan(path, overrides, hw: "Hardware", changes: list[str]) -> Optional[dict]:
    """The plan with `changes`; a PP change the machine cannot hold gets the fewest nodes that can."""
    hw2, extra = _hardware(hw, changes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RecipeWarning)  # e.g. a micro-batch size that leaves a short last one
            r = load_recipe(path, list(overrides) + extra)
        if layout_errors(r, hw2.world_size):
            n = min_nodes(r, hw2.gpus_per_node)
            if n is None or n < hw2.nodes:
                return None
            hw2 = Hardware(hw2.gpus_per_node, n, hw2.gpu_mem_gib)
        q = plan(r, hw2)
    except RecipeError:
        return None
    q["nodes_changed"] = hw2.nodes != hw.nodes
    return q


def suggest(path: Optional[str], overrides: list[str], hw: Hardware, p: dict) -> list[dict]:
    """The one or two changes that make the recipe fit, each re-planned (not guessed): a list of
    {changes, fits, short_by, nodes, train_total, rollout_total}; the closest try when none fits."""
    base = load_recipe(path, list(overrides))

    def describe(c, q):
        changes = [x for x in c if not x.startswith(NODES + "=")]
        if q["nodes"] != hw.nodes:
            changes.append(f"{NODES}={q['nodes']}")
        return dict(changes=changes, fits=q["fits"], short_by=q["short_by"], nodes=q["nodes"],
                    train_total=q["train"]["train_total"], rollout_total=q["rollout"]["total"])

    tried = [([c], q) for c in _candidates(path, overrides, hw, base, p)
             if (q := _replan(path, overrides, hw, [c])) is not None]
    fits = [(c, q) for c, q in tried if q["fits"]]
    # Then pairs and triples: each best-so-far change, with every change re-planned on top of it.
    for _ in range(2):
        if fits:
            break
        for c, q in sorted(tried, key=lambda x: x[1]["short_by"])[:3]:
            hw1, extra = _hardware(hw, c)
            hw1 = Hardware(hw1.gpus_per_node, q["nodes"], hw1.gpu_mem_gib)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RecipeWarning)
                r1 = load_recipe(path, list(overrides) + extra)
            keys = {x.split("=")[0] for x in c}
            for c2 in _candidates(path, list(overrides) + extra, hw1, r1, q):
                if c2.split("=")[0] in keys:
                    continue
                q2 = _replan(path, overrides, hw, c + [c2])
                if q2 is not None:
                    tried.append((c + [c2], q2))
        fits = [(c, q) for c, q in tried if q["fits"]]
    if fits:  # fewest changes first, then no extra nodes, then the most headroom
        fits.sort(key=lambda x: (len(x[0]), x[1]["nodes"], x[1]["short_by"] - x[1]["gpu_mem"]
                                 + max(x[1]["train"]["train_total"], x[1]["rollout"]["total"])))
        return [describe(c, q) for c, q in fits[:2]]
    return [describe(c, q) for c, q in sorted(tried, key=lambda x: x[1]["short_by"])[:1]]


def min_nodes(r: Recipe, gpus_per_node: int, limit: int = 4096) -> Optional[int]:
    """The fewest nodes whose world size the trainer's layout rules accept, or None."""
    for n in range(1, limit + 1):
        if not layout_errors(r, gpus_per_node * n):
            return n
    return None


__all__ = ["ACTIVATION_FORMULA", "GIB", "Hardware", "NODES", "NOT_COUNTED", "StaticBytes", "activation_bytes",
           "activation_bytes_per_layer", "grad_buffer_layout", "kv_bytes_per_token", "micro_batch_tokens", "min_nodes",
           "param_bytes", "parameter_count", "plan", "rank_parameters", "static_bytes", "suggest"]
