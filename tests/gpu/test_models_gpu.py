"""GPU-only: the TransformerEngine layer spec in bf16 matches the local spec within bf16 tolerance, and
an FP8 forward runs. Skipped without CUDA or without transformer-engine (not importable on CPU).

Run single-process: python -m pytest -q tests/gpu/test_models_gpu.py (TP=1, PP=1)."""
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("transformer_engine")


def _init():
    from megammr import runtime
    from megammr.config import load_recipe
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return runtime.init(load_recipe(None, []), environ=dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                                           MASTER_PORT=str(port)))


def test_te_spec_bf16_matches_local_and_fp8_runs(tmp_path):
    from megammr.backbones import Backbone
    from megammr.models.mapping import load_hf_into_model
    from megammr.models.parity import parity_inputs
    from megammr.models.tiny import write_tiny_model
    from megammr.config import ModelConfig
    from megammr.models.vlm import build_model, mrope_position_ids

    _init()
    # widths that FP8 GEMMs accept (multiples of 16)
    hf = write_tiny_model(str(tmp_path / "hf"), seed=0, tie_word_embeddings=False,
                          text=dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                    num_key_value_heads=2, mrope_section=[4, 6, 6]))
    import json
    bb = Backbone.from_hf_config(json.load(open(os.path.join(hf, "config.json"))))
    inp = parity_inputs(hf)["image"]
    ids = inp["input_ids"].cuda()
    pos = mrope_position_ids(inp["input_ids"], bb, inp["image_grid_thw"]).cuda()
    kw = dict(input_ids=ids, position_ids=pos, pixel_values=inp["pixel_values"].cuda().bfloat16(),
              image_grid_thw=inp["image_grid_thw"])
    out = {}
    for spec, prec in (("local", "bf16"), ("te", "bf16"), ("te", "fp8")):
        m = build_model(bb, ModelConfig(layer_spec=spec, precision=prec), perform_initialization=False).cuda()
        load_hf_into_model(m, hf)
        m.eval()
        with torch.no_grad():
            if prec == "fp8":
                from transformer_engine.pytorch import fp8_autocast
                with fp8_autocast(enabled=True):
                    out[(spec, prec)] = m(**kw).float()
            else:
                out[(spec, prec)] = m(**kw).float()
    a, b = out[("local", "bf16")], out[("te", "bf16")]
    rel = float((a - b).norm() / a.norm())
    assert rel < 2e-2, rel
    assert torch.isfinite(out[("te", "fp8")]).all()
