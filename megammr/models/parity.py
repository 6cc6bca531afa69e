"""Logit parity of the Megatron Qwen2.5-VL against transformers, under any TP/PP layout (torchrun worker).

    torchrun --nproc-per-node=TP*PP -m megammr.models.parity --hf DIR [--hf DIR2 ...] [--ckpt CKPT]
             [--tp N] [--pp M] [--out result.json]

For each HF directory the Megatron model is built at this layout and filled either from the HF
weights directly (megammr.models.mapping.load_hf_into_model) or, with --ckpt, from a torch_dist
checkpoint (megammr.models.checkpoint_io.load_mcore_checkpoint, as every phase starts); both models run a text-only prompt and a prompt with two images of different sizes
(float32); the last pipeline stage gathers the tensor-parallel logits and reports the max absolute
difference per case as `RESULT {json}` (and into --out). Used by tests/dist/test_model_parity.py
and `tools/convert_checkpoint.py check`.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from megammr import runtime
from megammr.backbones import Backbone
from megammr.config import load_recipe
from megammr.models.checkpoint_io import load_mcore_checkpoint
from megammr.models.mapping import load_hf_into_model
from megammr.models.processor import load_processor
from megammr.models.vlm import build_model, mrope_position_ids


def parity_inputs(hf_dir: str, seed: int = 0) -> dict[str, dict]:
    """Processor outputs for a text-only and a two-image prompt (images of different sizes)."""
    proc = load_processor(hf_dir)
    rng = np.random.default_rng(seed)
    q = "Solve 2x + 3 = 11 and explain the steps. <think>"
    text = proc.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                         {"type": "text", "text": "Which figure has the larger area?"}]}]
    mm = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((112, 140), (84, 168))]
    return {"text": dict(proc(text=[text], return_tensors="pt")),
            "image": dict(proc(text=[mm], images=imgs, return_tensors="pt"))}


def hf_logits(hf_dir: str, inputs: dict) -> torch.Tensor:
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def megatron_logits(model, inputs: dict):
    """Logits [b, s, vocab] on the last stage (TP gathered), None elsewhere."""
    ids = inputs["input_ids"]
    pos = mrope_position_ids(ids, model.backbone, inputs.get("image_grid_thw"))
    batch = dict(input_ids=ids, position_ids=pos, pixel_values=inputs.get("pixel_values"),
                 image_grid_thw=inputs.get("image_grid_thw"))

    def step(it, m):
        out = m(**next(it))
        return out, lambda o, non_loss_data=True: {"logits": gather_from_tensor_model_parallel_region(o).detach()}

    with torch.no_grad():
        res = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([batch]), model=[model],
                                          num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                                          forward_only=True, collect_non_loss_data=True)
    return res[0]["logits"].float() if ps.is_pipeline_last_stage() else None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", action="append", required=True, help="HF directory (repeatable)")
    ap.add_argument("--ckpt", action="append", default=[], help="torch_dist checkpoint per --hf (optional)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    # model.hf_path: the layout is checked against the model under test, not the default backbone
    recipe = load_recipe(None, [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", "model.precision=fp32",
                                f"model.hf_path={args.hf[0]}"])
    runtime.init(recipe)
    torch.set_num_threads(1)
    results = {}
    for i, hf_dir in enumerate(args.hf):
        bb = Backbone.from_hf_dir(hf_dir)
        model = build_model(bb, recipe.model, perform_initialization=False)
        if i < len(args.ckpt):
            load_mcore_checkpoint(model, args.ckpt[i])
        else:
            load_hf_into_model(model, hf_dir)
        model.eval()
        inputs = parity_inputs(hf_dir)
        tag = "tied" if bb.tie_word_embeddings else "untied"
        for name, inp in inputs.items():
            got = megatron_logits(model, inp)
            if got is not None and ps.get_tensor_model_parallel_rank() == 0:
                ref = hf_logits(hf_dir, inp)
                assert got.shape == ref.shape, (got.shape, ref.shape)
                results[f"{tag}/{name}"] = dict(max_abs_diff=float((got - ref).abs().max()),
                                                ref_std=float(ref.std()), seq=int(ref.shape[1]),
                                                n_images=int(inp["image_grid_thw"].shape[0]) if "image_grid_thw" in inp else 0)
    if results:
        line = json.dumps(dict(tp=args.tp, pp=args.pp, cases=results))
        print("RESULT " + line, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(line)
    runtime.shutdown()


if __name__ == "__main__":
    main()
