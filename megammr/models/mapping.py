"""HF <-> Megatron parameter mapping for Qwen2.5-VL (used by conversion, loading and weight sync).

Three views of the same weights:
- HF: the published checkpoint names (`model.layers.N.self_attn.q_proj.weight`, `visual.*`,
  `lm_head.weight`); transformers-5 in-memory names (`model.language_model.*`, `model.visual.*`)
  are accepted on input and normalised.
- global Megatron: what megatron-core's torch_dist checkpoint stores, keyed by sharded key, with
  decoder layers stacked on a leading axis; QKV interleaved per query group ([q heads of the group,
  k, v] for each group); linear_fc1 = [gate; up]; layer norms under their TransformerEngine names
  (the local spec maps its names to these, so one checkpoint serves both specs).
- local Megatron: one rank's module parameters: a tensor-parallel slice of the global tensor.

All functions move tensors without arithmetic, so HF -> Megatron -> HF is bit-exact.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator, Optional

import torch
from safetensors import safe_open

from megammr.backbones import Backbone
from megammr.models.checkpoint_io import CheckpointError

# lazy in this module: megatron-core (~2.5 s of imports), in load_hf_into_model only; the checkpoint
# converter (models/convert.py, tools/convert_checkpoint.py) moves tensors without it.

LM = "language_model."
DEC = LM + "decoder.layers."

# Per-layer tensors: global short name -> HF names (inside model.layers.N.) it is built from.
LAYER_KEYS = {
    "self_attention.linear_qkv.layer_norm_weight": ["input_layernorm.weight"],
    "self_attention.linear_qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "self_attention.linear_qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "self_attention.linear_proj.weight": ["self_attn.o_proj.weight"],
    "mlp.linear_fc1.layer_norm_weight": ["post_attention_layernorm.weight"],
    "mlp.linear_fc1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.linear_fc2.weight": ["mlp.down_proj.weight"],
}
# Local (module) names of the local spec -> global short names (TE spec modules already use these).
LOCAL_ALIASES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                 "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
# Dimension along which the tensor-parallel slice is taken (None: replicated).
TP_DIM = {"self_attention.linear_qkv.weight": 0, "self_attention.linear_qkv.bias": 0,
          "self_attention.linear_proj.weight": 1, "mlp.linear_fc1.weight": 0, "mlp.linear_fc2.weight": 1,
          "self_attention.linear_qkv.layer_norm_weight": None, "mlp.linear_fc1.layer_norm_weight": None}


def normalize_hf_name(name: str) -> str:
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


# ----------------------------------------------------------------------------- HF expected tensors
def hf_param_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of a hub-format Qwen2.5-VL config (published key names)."""
    v = cfg["vision_config"]
    H, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = H // nh
    vh, vi = v["hidden_size"], v["intermediate_size"]
    p, tp_, m = v["patch_size"], v["temporal_patch_size"], v["spatial_merge_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (vh, v.get("in_chans", v.get("in_channels", 3)), tp_, p, p)}
    for i in range(v["depth"]):
        b = f"visual.blocks.{i}."
        shapes.update({b + "norm1.weight": (vh,), b + "norm2.weight": (vh,),
                       b + "attn.qkv.weight": (3 * vh, vh), b + "attn.qkv.bias": (3 * vh,),
                       b + "attn.proj.weight": (vh, vh), b + "attn.proj.bias": (vh,),
                       b + "mlp.gate_proj.weight": (vi, vh), b + "mlp.gate_proj.bias": (vi,),
                       b + "mlp.up_proj.weight": (vi, vh), b + "mlp.up_proj.bias": (vi,),
                       b + "mlp.down_proj.weight": (vh, vi), b + "mlp.down_proj.bias": (vh,)})
    mh = vh * m * m
    shapes.update({"visual.merger.ln_q.weight": (vh,), "visual.merger.mlp.0.weight": (mh, mh),
                   "visual.merger.mlp.0.bias": (mh,), "visual.merger.mlp.2.weight": (v["out_hidden_size"], mh),
                   "visual.merger.mlp.2.bias": (v["out_hidden_size"],)})
    shapes["model.embed_tokens.weight"] = (cfg["vocab_size"], H)
    for i in range(L):
        b = f"model.layers.{i}."
        shapes.update({b + "input_layernorm.weight": (H,), b + "post_attention_layernorm.weight": (H,),
                       b + "self_attn.q_proj.weight": (nh * d, H), b + "self_attn.q_proj.bias": (nh * d,),
                       b + "self_attn.k_proj.weight": (nkv * d, H), b + "self_attn.k_proj.bias": (nkv * d,),
                       b + "self_attn.v_proj.weight": (nkv * d, H), b + "self_attn.v_proj.bias": (nkv * d,),
                       b + "self_attn.o_proj.weight": (H, nh * d),
                       b + "mlp.gate_proj.weight": (I, H), b + "mlp.up_proj.weight": (I, H),
                       b + "mlp.down_proj.weight": (H, I)})
    shapes["model.norm.weight"] = (H,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (cfg["vocab_size"], H)
    return shapes


def hf_shapes(bb: Backbone) -> dict[str, tuple[int, ...]]:
    return hf_param_shapes(bb.to_hf_config())


class HFReader:
    """Reads tensors of an HF checkpoint directory one at a time (single file or sharded with index).

    Files are opened per read and closed after, so memory-mapped pages of tensors already read
    are released (peak memory stays near the tensors of one group).
    """

    def __init__(self, path: str, bb: Optional[Backbone] = None):
        self.path = path
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory" if os.path.exists(path) else f"{path}: no such directory")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise CheckpointError(f"{path}: no config.json")
        self.backbone = bb or Backbone.from_hf_dir(path)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                wm = json.load(f)["weight_map"]
            self.files = {normalize_hf_name(k): v for k, v in wm.items()}
            for fname in sorted(set(wm.values())):
                if not os.path.exists(os.path.join(path, fname)):
                    raise CheckpointError(f"{path}: missing shard {fname} (listed in model.safetensors.index.json "
                                          f"for e.g. {next(k for k, v in wm.items() if v == fname)})")
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            with self._open("model.safetensors") as f:
                self.files = {normalize_hf_name(k): "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
        self._raw = {}  # normalised name -> name inside the file
        self.expected = hf_shapes(self.backbone)
        missing = [k for k in self.expected if k not in self.files]
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:3]}")
        # A tensor config.json has no place for (more layers or vision blocks than the config says,
        # an untied lm_head under tie_word_embeddings=true) would be dropped without a word.
        # A tied checkpoint may still store lm_head.weight: validate() checks it equals the embedding.
        unused = [k for k in self.files if k not in self.expected
                  and not (k == "lm_head.weight" and self.backbone.tie_word_embeddings)]
        if unused:
            raise CheckpointError(f"{path}: {len(unused)} tensors that config.json has no place for, e.g. "
                                  f"{unused[:3]} (config.json of a different model?)")

    def _open(self, fname: str):
        """safe_open naming the file when it is truncated or not safetensors at all."""
        try:
            return safe_open(os.path.join(self.path, fname), "pt")
        except Exception as e:  # SafetensorError, OSError
            raise CheckpointError(f"{self.path}/{fname}: cannot read safetensors file "
                                  f"(truncated or corrupt?): {e}") from e

    def validate(self) -> None:
        """Check every expected tensor's shape from the file headers (no tensor data is read)."""
        by_file: dict[str, list[str]] = {}
        for name in self.expected:
            by_file.setdefault(self.files[name], []).append(name)
        for fname, names in sorted(by_file.items()):
            with self._open(fname) as f:
                for name in names:
                    shape = tuple(f.get_slice(self._key_in_file(f, fname, name)).get_shape())
                    if shape != tuple(self.expected[name]):
                        raise CheckpointError(f"{self.path}/{fname}: tensor {name} has shape {shape}, "
                                              f"expected {tuple(self.expected[name])} from config.json")
        if "lm_head.weight" in self.files and self.backbone.tie_word_embeddings:
            if not torch.equal(self.get("lm_head.weight"), self.get("model.embed_tokens.weight")):
                raise CheckpointError(f"{self.path}: config.json says tie_word_embeddings=true but lm_head.weight "
                                      "differs from model.embed_tokens.weight (it would be dropped)")

    def _key_in_file(self, f, fname: str, name: str) -> str:
        """The name a normalised tensor name has inside the open file `f` (names read once per file)."""
        keys = self._raw.get(fname)
        if keys is None:
            keys = self._raw[fname] = {normalize_hf_name(k): k for k in f.keys()}
        if name not in keys:
            raise CheckpointError(f"{self.path}/{fname}: tensor {name} not in the file "
                                  "(model.safetensors.index.json says it is)")
        return keys[name]

    def dtype(self, name: str) -> str:
        """The safetensors dtype of a tensor ('F32', 'BF16', ...), from the file header only."""
        fname = self.files.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: tensor {name} not found")
        with self._open(fname) as f:
            return f.get_slice(self._key_in_file(f, fname, name)).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        fname = self.files.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: tensor {name} not found")
        with self._open(fname) as f:
            t = f.get_tensor(self._key_in_file(f, fname, name))
        exp = self.expected.get(name)
        if exp is not None and tuple(t.shape) != tuple(exp):
            raise CheckpointError(f"{self.path}/{fname}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(exp)} from config.json")
        return t


# ----------------------------------------------------------------------------- HF <-> global Megatron
def qkv_interleave(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bb: Backbone) -> torch.Tensor:
    g, d = bb.num_kv_heads, bb.head_dim
    per = bb.num_heads // g
    rest = q.shape[1:]
    return torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
                     ).reshape(-1, *rest)


def qkv_split(qkv: torch.Tensor, bb: Backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = bb.num_kv_heads, bb.head_dim
    per = bb.num_heads // g
    rest = qkv.shape[1:]
    x = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = x.split([per * d, d, d], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous())


def hf_layer_to_global(get: Callable[[str], torch.Tensor], bb: Backbone, layer: int, key: str) -> torch.Tensor:
    """One global per-layer tensor (without the layer axis) from HF tensors."""
    src = [get(f"model.layers.{layer}.{n}") for n in LAYER_KEYS[key]]
    if key.startswith("self_attention.linear_qkv.") and not key.endswith("layer_norm_weight"):
        return qkv_interleave(*src, bb)
    if key == "mlp.linear_fc1.weight":
        return torch.cat(src, dim=0)
    return src[0]


def global_layer_to_hf(t: torch.Tensor, bb: Backbone, layer: int, key: str) -> dict[str, torch.Tensor]:
    names = [f"model.layers.{layer}.{n}" for n in LAYER_KEYS[key]]
    if key.startswith("self_attention.linear_qkv.") and not key.endswith("layer_norm_weight"):
        return dict(zip(names, qkv_split(t, bb)))
    if key == "mlp.linear_fc1.weight":
        gate, up = t.chunk(2, dim=0)
        return {names[0]: gate.contiguous(), names[1]: up.contiguous()}
    return {names[0]: t}


def global_nonlayer_keys(bb: Backbone) -> dict[str, str]:
    """Global sharded key -> HF name for everything outside the decoder layers."""
    keys = {LM + "embedding.word_embeddings.weight": "model.embed_tokens.weight",
            LM + "decoder.final_layernorm.weight": "model.norm.weight"}
    if not bb.tie_word_embeddings:
        keys[LM + "output_layer.weight"] = "lm_head.weight"
    for name in hf_shapes(bb):
        if name.startswith("visual."):
            keys["vision_model." + name[len("visual."):]] = name
    return keys


# ----------------------------------------------------------------------------- global <-> local (TP)
def tp_slice(t: torch.Tensor, key: str, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of a global tensor (layer axis removed) under tensor parallelism."""
    if size == 1:
        return t
    if key == "mlp.linear_fc1.weight":  # gate and up are each split, then concatenated per rank
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)
    dim = TP_DIM.get(key)
    if key in (LM + "embedding.word_embeddings.weight", LM + "output_layer.weight"):
        dim = 0
    return t if dim is None else t.chunk(size, dim=dim)[rank]


def local_to_global_name(local: str, layer_offset: int = 0) -> tuple[str, Optional[int]]:
    """Module parameter name -> (global key or per-layer short key, global layer index or None)."""
    if local.startswith(DEC):
        i, rest = local[len(DEC):].split(".", 1)
        return LOCAL_ALIASES.get(rest, rest), int(i) + layer_offset
    return local, None


def load_hf_into_model(model, hf_path: str) -> list[str]:
    """Fill this rank's parameters of a Qwen25VLModel from an HF checkpoint (TP slice, PP stage).

    Returns the names that were set. Raises CheckpointError on a missing tensor or shape mismatch.
    """
    from megatron.core import parallel_state as ps

    reader = HFReader(hf_path, model.backbone)
    bb = model.backbone
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    nonlayer = global_nonlayer_keys(bb)
    offset = _layer_offset(model)
    done = []
    with torch.no_grad():
        for name, p in model.state_dict(keep_vars=True).items():
            if name.endswith("_extra_state") or not isinstance(p, torch.Tensor):
                continue
            key, layer = local_to_global_name(name, offset)
            if layer is not None:
                full = hf_layer_to_global(reader.get, bb, layer, key)
            elif key == LM + "output_layer.weight" and bb.tie_word_embeddings:
                full = reader.get("model.embed_tokens.weight")  # the last stage's copy of the tied weight
            elif key in nonlayer:
                full = reader.get(nonlayer[key])
            else:
                raise CheckpointError(f"no HF source for model parameter {name}")
            local = tp_slice(full, key, rank, size)
            if local.shape != p.shape:
                raise CheckpointError(f"{hf_path}: {name} would get shape {tuple(local.shape)}, "
                                      f"the model has {tuple(p.shape)}")
            p.copy_(local.to(p.dtype))
            done.append(name)
    return done


def _layer_offset(model) -> int:
    layers = getattr(model.language_model.decoder, "layers", [])
    return (layers[0].layer_number - 1) if len(layers) else 0


__all__ = ["HFReader", "LAYER_KEYS", "global_layer_to_hf", "global_nonlayer_keys",
           "hf_layer_to_global", "hf_param_shapes", "hf_shapes", "load_hf_into_model", "local_to_global_name", "normalize_hf_name",
           "qkv_interleave", "qkv_split", "tp_slice"]


def iter_hf_from_global(get_global: Callable[[str, Optional[int]], torch.Tensor], bb: Backbone
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors, one group at a time, from a reader of global Megatron tensors (key, layer)."""
    for key, hf in global_nonlayer_keys(bb).items():
        yield hf, get_global(key, None)
    for layer in range(bb.num_layers):
        for key in LAYER_KEYS:
            yield from global_layer_to_hf(get_global(DEC + key, layer), bb, layer, key).items()
