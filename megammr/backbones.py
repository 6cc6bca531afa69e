"""Backbones table: the architecture numbers of each supported Qwen2.5-VL size.

Every number of the qwen2.5-vl-* entries is copied from the published config.json of the
corresponding Hugging Face repository (Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct, -32B-Instruct,
-72B-Instruct; keys named in `Backbone`'s field comments). All four share one vision tower
(depth 32, width 1280, MLP 3420, 16 heads, window 112, full attention at blocks 7/15/23/31); only
its output width `out_hidden_size` follows the language model. `tiny` is this project's test and
default-recipe model (megammr.models.tiny writes it in HF format).

`Backbone.from_hf_config` reads any HF config (the flat hub format with `rope_scaling`, or the
transformers-5 nested `text_config` format), and `Backbone.from_hf_dir` a checkpoint directory's
config.json (every reader of one goes through it), so a checkpoint directory is the source of truth
once it exists; the table is for building models without one (meta-device sizing, random init).

Pure data and arithmetic that imports nothing of megammr's (no torch, no megatron): it sits below
megammr.config, whose rules read it, and below megammr.models, which builds on it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class VisionSpec:
    depth: int                      # vision_config.depth
    hidden_size: int                # vision_config.hidden_size
    intermediate_size: int          # vision_config.intermediate_size
    num_heads: int                  # vision_config.num_heads
    out_hidden_size: int            # vision_config.out_hidden_size (= language hidden_size)
    fullatt_block_indexes: tuple[int, ...]  # vision_config.fullatt_block_indexes
    window_size: int = 112          # vision_config.window_size (pixels)
    patch_size: int = 14            # vision_config.patch_size
    temporal_patch_size: int = 2    # vision_config.temporal_patch_size
    spatial_merge_size: int = 2     # vision_config.spatial_merge_size
    in_channels: int = 3            # vision_config.in_chans
    tokens_per_second: int = 2      # vision_config.tokens_per_second (video M-RoPE only)
    rope_theta: float = 10000.0     # fixed in Qwen2.5-VL's vision rotary embedding
    norm_eps: float = 1e-6          # fixed in Qwen2.5-VL's vision RMSNorms


@dataclass(frozen=True)
class Backbone:
    name: str
    vocab_size: int                 # vocab_size
    hidden_size: int                # hidden_size
    intermediate_size: int          # intermediate_size
    num_layers: int                 # num_hidden_layers
    num_heads: int                  # num_attention_heads
    num_kv_heads: int               # num_key_value_heads
    tie_word_embeddings: bool       # tie_word_embeddings
    vision: VisionSpec
    rms_norm_eps: float = 1e-6      # rms_norm_eps
    rope_theta: float = 1000000.0   # rope_theta
    mrope_section: tuple[int, ...] = (16, 24, 24)  # rope_scaling.mrope_section
    max_position_embeddings: int = 128000          # max_position_embeddings
    hf_repo: Optional[str] = None   # where the numbers come from
    # Token ids (identical in every Qwen2.5-VL vocabulary; tiny has its own).
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **kw) -> "Backbone":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF configs
    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "hf") -> "Backbone":
        """Parse a Qwen2.5-VL config.json (hub flat format or transformers-5 nested format)."""
        arch = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if arch != "qwen2_5_vl" and "Qwen2_5_VLForConditionalGeneration" not in archs:
            raise ValueError(f"unknown architecture model_type={arch!r} architectures={archs}: "
                             "only Qwen2.5-VL (model_type 'qwen2_5_vl') is supported")
        t = dict(cfg.get("text_config") or {})
        top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
        for k, v in top.items():  # flat hub format: text fields at the top level
            t.setdefault(k, v)
        rope = t.get("rope_scaling") or t.get("rope_parameters") or {}
        v = cfg["vision_config"]
        theta = t.get("rope_theta", rope.get("rope_theta", 1000000.0))
        vision = VisionSpec(
            depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
            num_heads=v["num_heads"], out_hidden_size=v["out_hidden_size"],
            fullatt_block_indexes=tuple(v["fullatt_block_indexes"]), window_size=v["window_size"],
            patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
            spatial_merge_size=v["spatial_merge_size"], in_channels=v.get("in_chans", v.get("in_channels", 3)),
            tokens_per_second=v.get("tokens_per_second", 2),
        )
        tied = bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
        return cls(
            name=name, vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"], num_layers=t["num_hidden_layers"],
            num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"],
            tie_word_embeddings=tied, vision=vision, rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=theta, mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            max_position_embeddings=t.get("max_position_embeddings", 128000),
            image_token_id=cfg.get("image_token_id", 151655), video_token_id=cfg.get("video_token_id", 151656),
            vision_start_token_id=cfg.get("vision_start_token_id", 151652),
            vision_end_token_id=cfg.get("vision_end_token_id", 151653),
            bos_token_id=t.get("bos_token_id", 151643) if t.get("bos_token_id") is not None else 151643,
            eos_token_id=t.get("eos_token_id", 151645) if isinstance(t.get("eos_token_id"), int) else 151645,
        )

    @classmethod
    def from_hf_dir(cls, path: str, name: str = "hf") -> "Backbone":
        """The backbone of an HF checkpoint directory: its config.json through `from_hf_config`.
        OSError when the file cannot be read; ValueError, KeyError or TypeError when it is not a
        Qwen2.5-VL config (json.JSONDecodeError is a ValueError)."""
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return cls.from_hf_config(json.load(f), name=name)

    def to_hf_config(self) -> dict:
        """config.json in the published (flat) layout; transformers 4.57+ and 5.x load it."""
        v = self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "attention_dropout": 0.0, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_start_token_id + 2, "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id, "hidden_act": "silu", "hidden_size": self.hidden_size,
            "initializer_range": 0.02, "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings, "max_window_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
            "sliding_window": self.max_position_embeddings, "use_sliding_window": False,
            "tie_word_embeddings": self.tie_word_embeddings, "use_cache": True, "vocab_size": self.vocab_size,
            "vision_config": {
                "model_type": "qwen2_5_vl", "depth": v.depth, "hidden_act": "silu", "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_chans": v.in_channels,
                "out_hidden_size": v.out_hidden_size, "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
            },
        }


def _qwen_vision(out_hidden_size: int) -> VisionSpec:
    # vision_config of all four published Qwen2.5-VL configs.
    return VisionSpec(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      out_hidden_size=out_hidden_size, fullatt_block_indexes=(7, 15, 23, 31),
                      window_size=112, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                      in_channels=3, tokens_per_second=2)


BACKBONES: dict[str, Backbone] = {
    # megammr.models.tiny: TINY_TEXT / TINY_VISION; token ids of the tiny tokenizer (380 BPE entries, then
    # Qwen's 22 added tokens in Qwen's order).
    "tiny": Backbone(
        name="tiny", vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
        num_kv_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
        mrope_section=(2, 3, 3), max_position_embeddings=4096, hf_repo=None,
        vision=VisionSpec(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=(1, 3), window_size=56, tokens_per_second=2),
        image_token_id=392, video_token_id=393, vision_start_token_id=389, vision_end_token_id=390,
        bos_token_id=380, eos_token_id=382,
    ),
    # Qwen/Qwen2.5-VL-3B-Instruct config.json
    "qwen2.5-vl-3b": Backbone(
        name="qwen2.5-vl-3b", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
        num_heads=16, num_kv_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
        mrope_section=(16, 24, 24), max_position_embeddings=128000, hf_repo="Qwen/Qwen2.5-VL-3B-Instruct",
        vision=_qwen_vision(2048)),
    # Qwen/Qwen2.5-VL-7B-Instruct config.json
    "qwen2.5-vl-7b": Backbone(
        name="qwen2.5-vl-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
        mrope_section=(16, 24, 24), max_position_embeddings=128000, hf_repo="Qwen/Qwen2.5-VL-7B-Instruct",
        vision=_qwen_vision(3584)),
    # Qwen/Qwen2.5-VL-32B-Instruct config.json
    "qwen2.5-vl-32b": Backbone(
        name="qwen2.5-vl-32b", vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
        num_heads=40, num_kv_heads=8, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
        mrope_section=(16, 24, 24), max_position_embeddings=128000, hf_repo="Qwen/Qwen2.5-VL-32B-Instruct",
        vision=_qwen_vision(5120)),
    # Qwen/Qwen2.5-VL-72B-Instruct config.json
    "qwen2.5-vl-72b": Backbone(
        name="qwen2.5-vl-72b", vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
        num_heads=64, num_kv_heads=8, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0,
        mrope_section=(16, 24, 24), max_position_embeddings=128000, hf_repo="Qwen/Qwen2.5-VL-72B-Instruct",
        vision=_qwen_vision(8192)),
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def check_parallel_layout(bb: Backbone, tp: int, pp: int) -> None:
    """ValueError unless TP x PP can split `bb`. Pure arithmetic (no torch, no megatron): recipe
    loading runs it (megammr.config.rules), and so does the model builder."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor- and pipeline-parallel sizes must be >= 1, got tp={tp} pp={pp}")
    if bb.num_heads % tp or bb.num_kv_heads % tp:
        raise ValueError(f"{bb.name}: tensor-parallel size {tp} must divide num_heads={bb.num_heads} "
                         f"and num_kv_heads={bb.num_kv_heads}")
    if bb.intermediate_size % tp:
        raise ValueError(f"{bb.name}: tensor-parallel size {tp} must divide intermediate_size={bb.intermediate_size}")
    if bb.vocab_size % tp:
        raise ValueError(f"{bb.name}: tensor-parallel size {tp} must divide vocab_size={bb.vocab_size}")
    if bb.num_layers % pp:
        raise ValueError(f"{bb.name}: pipeline-parallel size {pp} must divide num_layers={bb.num_layers}")


__all__ = ["BACKBONES", "Backbone", "VisionSpec", "check_parallel_layout", "get_backbone"]
