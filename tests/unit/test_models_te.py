"""TE / FP8 parts that need no GPU: the recipe -> TransformerConfig fields (megatron-core 0.16's own
validation runs on them), the feature checks, the shape rules and the FP8 token padding.
The FP8 forward/step itself: tests/gpu/test_fp8_gpu.py."""
import sys

import pytest
import torch

from megammr.models import te
from megammr.backbones import get_backbone
from megammr.versions import version_at_least


def _config(**fp8):
    # megatron's TransformerConfig.__post_init__ validates fp8 combinations without importing TE
    from megatron.core.transformer.transformer_config import TransformerConfig
    return TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                             bf16=True, params_dtype=torch.bfloat16, **fp8)


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise", "mxfp8"])
def test_current_scaling_recipes_keep_first_and_last_layers_bf16(recipe):
    kw = te.fp8_config_fields("fp8", recipe, num_layers=36, pp=1)
    assert kw == dict(fp8="e4m3", fp8_recipe=recipe, fp8_param=False, first_last_layers_bf16=True,
                      num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)
    cfg = _config(**te.fp8_config_fields("fp8", recipe, num_layers=4, pp=1))
    assert cfg.fp8 == "e4m3" and cfg.first_last_layers_bf16


def test_delayed_scaling_uses_an_amax_history_and_no_bf16_layers():
    kw = te.fp8_config_fields("fp8", "delayed", num_layers=36, pp=1)
    assert kw == dict(fp8="hybrid", fp8_recipe="delayed", fp8_param=False, fp8_amax_history_len=1024,
                      fp8_amax_compute_algo="max")
    _config(**kw)
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer in BF16"):
        _config(**kw, first_last_layers_bf16=True)  # why the fields differ per recipe


def test_fields_per_pipeline_stage_and_precision():
    assert te.fp8_config_fields("bf16", "tensorwise", 36, 1) == {}
    assert "first_last_layers_bf16" not in te.fp8_config_fields("fp8", "tensorwise", num_layers=4, pp=2)
    with pytest.raises(ValueError, match="fp8_recipe"):
        te.fp8_config_fields("fp8", "custom", 4, 1)


def test_transformer_config_of_a_recipe_carries_fp8_to_the_decoder_only():
    from megammr.config import ModelConfig
    from megammr.models.vlm import transformer_config
    bb = get_backbone("qwen2.5-vl-3b")
    cfg = transformer_config(bb, 1, 1, ModelConfig(layer_spec="te", precision="fp8", fp8_recipe="tensorwise"),
                             perform_initialization=False)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.fp8_param, cfg.first_last_layers_bf16) == ("e4m3", "tensorwise", False, True)
    assert cfg.params_dtype == torch.bfloat16 and cfg.bf16
    assert transformer_config(bb, 1, 1, ModelConfig(precision="bf16"), perform_initialization=False).fp8 is None


@pytest.mark.parametrize("recipe,ver,cap,cuda,needles", [
    ("tensorwise", "2.8.0", (9, 0), "12.8", []),
    ("tensorwise", "2.1.0", (9, 0), "12.8", ["tensorwise needs transformer-engine >= 2.2"]),
    ("blockwise", "2.8.0", (9, 0), "12.8", ["CUDA >= 12.9"]),
    ("blockwise", "2.8.0", (9, 0), "12.9", []),
    ("blockwise", "2.8.0", (10, 0), "12.9", ["Hopper (sm90) only"]),
    ("mxfp8", "2.8.0", (9, 0), "12.8", ["Blackwell"]),
    ("mxfp8", "2.8.0", (10, 0), "12.8", []),
    ("delayed", "1.13.0", (8, 9), "12.1", []),
    ("delayed", "2.8.0", (8, 0), "12.1", ["compute capability >= 8.9"]),
    ("tensorwise", None, None, None, ["needs transformer-engine", "needs a CUDA GPU"]),
])
def test_fp8_feature_checks(recipe, ver, cap, cuda, needles):
    got = te.fp8_problems(recipe, ver, cap, cuda)
    assert len(got) == len(needles), got
    for g, n in zip(got, needles):
        assert n in g


def test_fp8_shape_rules_of_the_backbones():
    assert te.fp8_shape_problems(get_backbone("qwen2.5-vl-3b"), tp=1) == []
    assert te.fp8_shape_problems(get_backbone("qwen2.5-vl-7b"), tp=4) == []
    tiny = get_backbone("tiny")
    probs = te.fp8_shape_problems(tiny.replace(hidden_size=72, num_heads=4, num_kv_heads=2), tp=1)
    assert any("hidden_size = 72" in p for p in probs)
    assert te.fp8_pad_multiple("mxfp8") == 32 and te.fp8_pad_multiple("tensorwise") == 16


def test_version_compare():
    assert version_at_least("2.3.0.dev0+5fdd7bb", "2.3") and version_at_least("2.10.1", "2.3")
    assert not version_at_least("2.2.9", "2.3") and not version_at_least(None, "1.0")


def test_require_te_absent_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    with pytest.raises(RuntimeError) as e:
        te.require_te()
    assert "\n" not in str(e.value) and 'pip install -e ".[gpu]"' in str(e.value)
    assert "model.layer_spec=local" in str(e.value)


def test_blockwise_sets_fp32_scales_without_overriding():
    env = {}
    te.prepare_fp8_env("blockwise", env)
    assert env == {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "1"}
    env = {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "0"}
    te.prepare_fp8_env("blockwise", env)
    assert env["NVTE_FP8_BLOCK_SCALING_FP32_SCALES"] == "0"
    env = {}
    te.prepare_fp8_env("tensorwise", env)
    assert env == {}


def test_fp8_padding_keeps_every_real_position():
    from megammr.train.batching import IGNORE, Sample, make_micro_batches, pad_to_multiple
    bb = get_backbone("tiny")
    samples = [Sample([1, 2, 3], [4, 5], 0.5, [-0.1, -0.2]), Sample([1, 2], [6, 7, 8, 9], -0.5, [-0.3] * 4)]
    (mb,) = make_micro_batches(samples, bb, pad_id=0, micro_batch_size=2)
    before = {k: getattr(mb, k).clone() for k in ("input_ids", "position_ids", "labels", "loss_mask", "rollout_logp")}
    mb.old_logp = torch.randn(mb.shape)
    old = mb.old_logp.clone()
    s = mb.shape[1]
    pad_to_multiple(mb, 16)
    assert mb.shape == (2, 16) and mb.position_ids.shape == (3, 2, 16) and mb.old_logp.shape == (2, 16)
    for k, t in before.items():
        assert torch.equal(getattr(mb, k)[..., :s], t), k           # real positions unchanged
    assert (mb.labels[:, s:] == IGNORE).all() and (mb.loss_mask[:, s:] == 0).all()
    assert (mb.position_ids[..., s:] == 0).all() and torch.equal(mb.old_logp[:, :s], old)
    pad_to_multiple(mb, 16)
    assert mb.shape == (2, 16)                                       # idempotent
