"""Shared set-up of the single-GPU tests: one process group per session, tiny HF models whose widths
FP8 GEMMs accept, megatron log-probs of fixed continuations."""
from __future__ import annotations

import json
import os
import socket

import torch

# widths that FP8 GEMMs accept (multiples of 16), 4 layers so that the first/last BF16 layers leave two FP8 ones
FP8_TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                mrope_section=[4, 6, 6])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(recipe=None):
    """runtime.init at world size 1 on this GPU (NCCL); later calls reuse the process group."""
    from megammr import runtime
    from megammr.config import load_recipe
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return runtime.init(recipe or load_recipe(None, []), environ=dict(os.environ))


def backbone(hf_dir: str):
    from megammr.backbones import Backbone
    with open(os.path.join(hf_dir, "config.json")) as f:
        return Backbone.from_hf_config(json.load(f))


def model_from_hf(hf_dir: str, spec="local", precision="bf16", fp8_recipe="tensorwise"):
    from megammr.models.mapping import load_hf_into_model
    from megammr.config import ModelConfig
    from megammr.models.vlm import build_model
    cfg = ModelConfig(layer_spec=spec, precision=precision, fp8_recipe=fp8_recipe)
    m = build_model(backbone(hf_dir), cfg, perform_initialization=False).cuda()
    load_hf_into_model(m, hf_dir)
    return m.eval()


@torch.no_grad()
def continuation_logprobs(model, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0,
                          pixel_values=None, image_grid_thw=None) -> torch.Tensor:
    """log softmax(logits / T)[response token] of the Megatron model (what the trainer computes)."""
    from megammr.models.vlm import mrope_position_ids
    ids = torch.tensor([prompt_ids + response_ids[:-1]], device="cuda")
    pos = mrope_position_ids(ids.cpu(), model.backbone, image_grid_thw).cuda()
    kw = {}
    if pixel_values is not None:
        kw = dict(pixel_values=pixel_values.cuda().to(model.config.params_dtype), image_grid_thw=image_grid_thw)
    logits = model(input_ids=ids, position_ids=pos, **kw).float()[0]
    lp = torch.log_softmax(logits / temperature, dim=-1)
    p = len(prompt_ids)
    tgt = torch.tensor(response_ids, device="cuda")
    return lp[p - 1:p - 1 + len(response_ids)].gather(-1, tgt[:, None])[:, 0]


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean exp(|delta log p|): NVIDIA's rollout/train mismatch metric (<= 1.03-1.05 is fine)."""
    return float(torch.exp((a.double() - b.double()).abs()).mean())

