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
    from megammr.models.backbones import Backbone
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


def packing_samples(bb, seed: int = 0):
    """Text and image (prompt, response) samples of uneven lengths for packed-vs-padded checks."""
    from megammr.train.batching import Sample
    g = torch.Generator().manual_seed(seed)
    img, grid = bb.image_token_id, torch.tensor([[1, 4, 4]])  # 4 merged image tokens
    px = torch.randn(16, bb.vision.in_channels * bb.vision.temporal_patch_size * bb.vision.patch_size ** 2, generator=g)

    def rnd(n):
        return torch.randint(10, min(300, bb.vocab_size), (n,), generator=g).tolist()
    return [Sample(rnd(3) + [img] * 4 + rnd(2), rnd(7), 1.0, [-1.0] * 7, px, grid),
            Sample(rnd(5), rnd(21), -1.0, [-1.0] * 21),
            Sample(rnd(2) + [img] * 4, rnd(3), 0.5, [-1.0] * 3, px * 0.5, grid),
            Sample(rnd(9), rnd(1), 0.0, [-1.0])]


def packed_vs_padded_logprobs(model, samples, multiple: int = 1):
    """The trainer's forward-only log-probs of `samples` through padded rows and through one packed
    (THD) micro-batch: two lists of per-sample response log-prob tensors (float32, CPU)."""
    from megammr.train.batching import make_micro_batches, make_packed_micro_batches
    from megammr.train.step import forward_logprobs
    bb = model.backbone
    padded = make_micro_batches(samples, bb, pad_id=0, micro_batch_size=len(samples))
    packed = make_packed_micro_batches(samples, bb, pad_id=0, micro_batch_size=len(samples), multiple=multiple)
    (lp_pad,), (lp_pack,) = forward_logprobs(model, padded, 1.0), forward_logprobs(model, packed, 1.0)
    a, b = [], []
    for k, i in enumerate(packed[0].rows):
        start, r = int(packed[0].cu_seqlens_padded[k]), padded[0].rows.index(i)
        n = samples[i].length
        m = padded[0].loss_mask[r, :n].bool().to(lp_pad.device)
        a.append(lp_pad[r, :n][m].float().cpu())
        b.append(lp_pack[0, start:start + n][m].float().cpu())
    return a, b
