"""Qwen2.5-VL on megatron-core: the native vision tower + a megatron-core GPTModel decoder.

The decoder is a plain GPTModel: RMSNorm, SwiGLU MLP, QKV bias, grouped-query attention,
multimodal rotary positions (position_embedding_type="mrope" with TransformerConfig.mrope_section),
tied or untied output layer, tensor and pipeline parallel. The layer spec (TransformerEngine or
local, whose core attention is torch's SDPA: megammr.models.attention) is chosen by `layer_spec`
(recipe field model.layer_spec); TE is imported only when asked for, because it cannot be imported
without CUDA.

On the first pipeline stage the token embeddings at <|image_pad|> positions are replaced by the
merged vision features, in the order transformers uses (batch-major, then sequence).
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt import gpt_layer_specs as specs
from megatron.core.tensor_parallel import layers as tpl
from megatron.core.transformer.transformer_config import TransformerConfig

from megammr import runtime
from megammr.backbones import Backbone, check_parallel_layout, get_backbone
from megammr.config import ModelConfig
from megammr.models.attention import SDPADotProductAttention
from megammr.models.te import fp8_config_fields, prepare_fp8_env, require_te
from megammr.models.vision import VisionTower


def transformer_config(bb: Backbone, tp: int, pp: int, cfg, *, perform_initialization: bool, **overrides):
    """TransformerConfig of the decoder of `bb` at TP=`tp`, PP=`pp`; numerics from `cfg`, a recipe's
    ModelConfig section (precision, fp8_recipe, recompute)."""
    precision, fp8_recipe, recompute = cfg.precision, cfg.fp8_recipe, cfg.recompute
    check_parallel_layout(bb, tp, pp)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[precision]
    kw = dict(
        num_layers=bb.num_layers, hidden_size=bb.hidden_size, ffn_hidden_size=bb.intermediate_size,
        num_attention_heads=bb.num_heads, num_query_groups=bb.num_kv_heads, kv_channels=bb.head_dim,
        normalization="RMSNorm", layernorm_epsilon=bb.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, mrope_section=list(bb.mrope_section),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=perform_initialization,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        # megatron's default; Qwen's attention scale is also 1/sqrt(head_dim)
        apply_query_key_layer_scaling=False,
    )
    if tp > 1 or pp > 1:
        kw["sequence_parallel"] = False
    # FP8 in the decoder only (megammr.models.te: format, recipe, BF16 first/last layers, bf16 weights)
    kw.update(fp8_config_fields(precision, fp8_recipe, bb.num_layers, pp))
    if recompute:
        kw.update(recompute_granularity=recompute)
        if recompute == "full":
            kw.update(recompute_method="uniform", recompute_num_layers=1)
    kw.update(overrides)
    return TransformerConfig(**kw)


def layer_spec(name: str):
    """megatron-core ModuleSpec of one decoder layer: 'te' (TransformerEngine) or 'local' (pure torch)."""
    if name == "local":
        spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=False)
        # megatron's local DotProductAttention keeps the full score matrix: SDPA is ~2-3x faster on CPU
        spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
        return spec
    if name == "te":
        require_te()  # one-line error naming the extra when TE cannot be imported
        # qk_layernorm is the only keyword passed: it exists in megatron-core 0.16 and 0.19 alike
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    raise ValueError(f"unknown layer spec {name!r}: expected 'te' or 'local'")


class Qwen25VLModel(torch.nn.Module):
    """vision_model (first stage only) + language_model (megatron GPTModel, this stage's layers).

    A plain nn.Module holding a GPTModel: megatron's schedules, DDP and finalize_model_grads only
    need `config`, `set_input_tensor`, `share_embeddings_and_output_weights`,
    `shared_embedding_or_output_weight` and `sharded_state_dict`, which are forwarded here.
    """

    def __init__(self, bb: Backbone, config, spec, pre_process: bool = True, post_process: bool = True,
                 vision_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if config.sequence_parallel:
            raise ValueError("sequence parallelism is not supported by the Qwen2.5-VL model (image features "
                             "are merged into a full-sequence embedding)")
        self.backbone, self.config = bb, config
        self.pre_process, self.post_process = pre_process, post_process
        self.vision_model = VisionTower(bb.vision).to(vision_dtype or config.params_dtype) if pre_process else None
        self.language_model = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=bb.vocab_size,
            max_sequence_length=bb.max_position_embeddings, pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=bb.tie_word_embeddings, position_embedding_type="mrope",
            rotary_base=int(bb.rope_theta) if float(bb.rope_theta).is_integer() else bb.rope_theta,
        )
        # megatron's schedules and finalize_model_grads look for these on the model they drive
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = bb.tie_word_embeddings

    # ---- megatron pipeline plumbing
    def set_input_tensor(self, input_tensor):
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        sd = self.language_model.sharded_state_dict(prefix=f"{prefix}language_model.", metadata=metadata)
        if self.vision_model is not None:
            # Replicated over TP and DP: one main replica (tp rank 0, dp rank 0) writes each tensor.
            replica = (0, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True))
            for name, t in self.vision_model.state_dict(prefix=f"{prefix}vision_model.", keep_vars=True).items():
                sd[name] = ShardedTensor.from_rank_offsets(name, t, replica_id=replica)
        return sd

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decoder input [s, b, h]: token embeddings with image features at <|image_pad|> positions."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if pixel_values is None:
            return emb
        feats = self.vision_model(pixel_values, image_grid_thw).to(emb.dtype)
        mask = input_ids == self.backbone.image_token_id  # [b, s]
        n = int(mask.sum())
        if n != feats.shape[0]:
            raise ValueError(f"{n} <|image_pad|> tokens but {feats.shape[0]} image features "
                             f"(image_grid_thw={image_grid_thw.tolist()})")
        bsh = emb.transpose(0, 1).masked_scatter(mask[..., None], feats)
        return bsh.transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **kwargs):
        """input_ids [b, s]; position_ids [3, b, s] (see `mrope_position_ids`). Returns what GPTModel
        returns: logits [b, s, vocab/tp] on the last stage (per-token loss when labels are given),
        hidden states elsewhere."""
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        return self.language_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   decoder_input=decoder_input, labels=labels, **kwargs)


def build_model(bb: Backbone, cfg, *, perform_initialization: bool, pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None) -> Qwen25VLModel:
    """This rank's part of the model, from megatron parallel_state (TP/PP sizes and stage).

    cfg: a recipe's ModelConfig section (layer_spec, precision, fp8_recipe, recompute,
    freeze_vision). perform_initialization=False skips megatron's random init (weights loaded next).
    pre_process / post_process (None: from the pipeline stage) build the embedding / output layer."""
    if cfg.precision == "fp8" and cfg.layer_spec != "te":
        raise ValueError("model.precision=fp8 needs model.layer_spec=te")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if cfg.precision == "fp8":
        prepare_fp8_env(cfg.fp8_recipe)
    tcfg = transformer_config(bb, tp, pp, cfg, perform_initialization=perform_initialization)
    pre = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post = ps.is_pipeline_last_stage() if post_process is None else post_process
    model = Qwen25VLModel(bb, tcfg, layer_spec(cfg.layer_spec), pre, post)
    vision = model.vision_model
    if vision is not None and torch.cuda.is_available() and next(vision.parameters()).device.type == "cpu":
        # megatron allocates the decoder on the current GPU itself; the vision tower is a plain module
        vision.to(runtime.device())
    mark_tensor_parallel_weights(model)
    if cfg.freeze_vision and model.vision_model is not None:
        model.vision_model.requires_grad_(False)
    return model


def mark_tensor_parallel_weights(model) -> int:
    """Give every tensor-parallel weight megatron's `tensor_model_parallel` attributes.

    megatron-core sets them only inside its weight initialisers, so with
    perform_initialization=False (weights loaded from a checkpoint) the weights of column/row
    parallel linears and of the vocab-parallel embedding lack them, while their biases have them.
    The grad norm then counts such a weight as a TP-replicated duplicate (rank 0's slice only),
    and gradient clipping is wrong at TP > 1. Returns the number of weights marked."""
    dims = {tpl.ColumnParallelLinear: 0, tpl.VocabParallelEmbedding: 0, tpl.RowParallelLinear: 1}
    n = 0
    for module in model.modules():
        dim = next((d for cls, d in dims.items() if isinstance(module, cls)), None)
        w = getattr(module, "weight", None)
        if dim is not None and isinstance(w, torch.nn.Parameter) and not getattr(w, "tensor_model_parallel", False):
            w.tensor_model_parallel, w.partition_dim, w.partition_stride = True, dim, 1
            n += 1
    return n


def build_from_recipe(recipe, bb: Optional[Backbone] = None) -> Qwen25VLModel:
    """The model of a recipe: backbone from model.hf_path's config.json when given, else the table."""
    m = recipe.model
    if bb is None:
        if m.hf_path:
            bb = Backbone.from_hf_dir(m.hf_path, name=m.backbone)
        else:
            bb = get_backbone(m.backbone)
    return build_model(bb, m, perform_initialization=True)


def mrope_position_ids(input_ids: torch.Tensor, bb: Backbone, image_grid_thw: Optional[torch.Tensor] = None,
                       attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[3, b, s] multimodal rotary positions, as transformers' Qwen2.5-VL get_rope_index for images.

    Text tokens advance all three components together; an image's tokens get (t, h, w) grid
    coordinates (in merge units) offset by the position where the image starts, and the text after
    it resumes at that offset + max(h, w). Padding (attention_mask == 0) is skipped and gets 0.
    """
    m = bb.vision.spatial_merge_size
    b, s = input_ids.shape
    out = torch.zeros(3, b, s, dtype=torch.long, device=input_ids.device)
    grids = iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(())
    for i in range(b):
        keep = attention_mask[i].bool() if attention_mask is not None else torch.ones(s, dtype=torch.bool)
        ids = input_ids[i][keep].tolist()
        pieces, cur = [], 0
        for is_img, run in itertools.groupby(ids, key=lambda t: t == bb.image_token_id):
            n = len(list(run))
            if not is_img:
                pieces.append(torch.arange(n).expand(3, n) + cur)
                cur += n
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError(f"sequence {i} has more <|image_pad|> runs than image_grid_thw rows") from None
            gh, gw = h // m, w // m
            if n != t * gh * gw:
                raise ValueError(f"sequence {i}: an <|image_pad|> run of {n} tokens does not match grid {t, h, w}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(gh, gw)
        if pieces:
            out[:, i, keep.to(out.device)] = torch.cat(pieces, dim=1).to(out.device)
    return out


__all__ = ["Qwen25VLModel", "build_from_recipe", "build_model", "check_parallel_layout", "layer_spec",
           "mrope_position_ids",
           "transformer_config"]


def count_parameters_meta(bb: Backbone) -> int:
    """Parameters of the whole model at TP=1/PP=1, built on the meta device (no memory used).

    Needs megatron parallel_state initialised with TP=1, PP=1 (megammr.runtime.init)."""
    # The count does not depend on the numerics; the local spec builds without CUDA.
    with torch.device("meta"):
        model = build_model(bb, ModelConfig(layer_spec="local"), perform_initialization=False, pre_process=True,
                            post_process=True)
    return sum(p.numel() for p in model.parameters())
