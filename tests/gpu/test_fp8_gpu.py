"""TE FP8 through the recipe: FP8 in the middle decoder layers only, log-probs close to BF16, finite
train steps with padding of odd token counts, BF16 tensors exported to the rollout engine.
Skipped without CUDA, without transformer-engine, or on a GPU without FP8 (sm < 8.9)."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("transformer_engine", reason='needs transformer-engine[pytorch] (pip install -e ".[gpu]")')
if torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs an FP8 GPU (compute capability >= 8.9)", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import gpu_helpers as helpers  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import packing_cases  # noqa: E402  (tests/packing_cases.py)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fp8_enabled() -> bool:
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except ImportError:
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    return bool(FP8GlobalStateManager.is_fp8_enabled())


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from megammr.models.tiny import write_tiny_model
    helpers.init()
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny16")), seed=0, tie_word_embeddings=False,
                            text=helpers.FP8_TEXT)


def _probe(hf):
    from megammr.models.parity import parity_inputs
    inp = parity_inputs(hf)["image"]
    g = torch.Generator().manual_seed(3)
    resp = torch.randint(0, 1024, (24,), generator=g).tolist()
    return inp["input_ids"][0].tolist(), resp, inp["pixel_values"], inp["image_grid_thw"]


def test_fp8_runs_in_the_middle_layers_only(hf):
    m = helpers.model_from_hf(hf, "te", "fp8", "tensorwise")
    seen = {}
    for i, layer in enumerate(m.language_model.decoder.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(f"layer{i}", _fp8_enabled()))
    for i, blk in enumerate(m.vision_model.blocks if hasattr(m.vision_model, "blocks") else []):
        blk.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(f"vit{i}", _fp8_enabled()))
    prompt, resp, px, grid = _probe(hf)
    lp = helpers.continuation_logprobs(m, prompt, resp, pixel_values=px, image_grid_thw=grid)
    assert torch.isfinite(lp).all()
    n = len(m.language_model.decoder.layers)
    assert [seen[f"layer{i}"] for i in range(n)] == [False] + [True] * (n - 2) + [False]
    assert not any(v for k, v in seen.items() if k.startswith("vit"))


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_logprobs_close_to_bf16(hf, recipe):
    prompt, resp, px, grid = _probe(hf)
    ref = helpers.continuation_logprobs(helpers.model_from_hf(hf, "te", "bf16"), prompt, resp,
                                        pixel_values=px, image_grid_thw=grid)
    got = helpers.continuation_logprobs(helpers.model_from_hf(hf, "te", "fp8", recipe), prompt, resp,
                                        pixel_values=px, image_grid_thw=grid)
    assert torch.isfinite(got).all()
    assert helpers.mismatch(got, ref) < 1.05


def test_exported_tensors_are_bf16(hf):
    from megammr.rollout.base import WeightTarget
    from megammr.train.sync import WeightSync

    class Sink(WeightTarget):
        def __init__(self):
            self.kinds = set()

        def update_weights(self, named):
            self.kinds |= {(type(t).__name__, t.dtype) for _, t in named}
            return len(named)
    sink = Sink()
    WeightSync(helpers.model_from_hf(hf, "te", "fp8"), sink, bucket_mb=512).sync()
    assert sink.kinds == {("Tensor", torch.bfloat16)}  # never a TE Float8Tensor (fp8_param=False)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_grpo_steps_are_finite(tmp_path, hf, recipe):
    """`megammr train` with layer_spec=te, precision=fp8 for 6 steps: response lengths vary, so the
    token counts are padded to 16; loss and grad norm stay finite."""
    from megammr.data.synthetic import write_all
    data = write_all(str(tmp_path / "data"), n=64, seed=0, phases=(1,), progress=False)[1]["shards"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megammr", "train", "recipes/tiny/phase1.yaml", f"model.hf_path={hf}",
           "model.layer_spec=te", "model.precision=fp8", f"model.fp8_recipe={recipe}", "rollout.engine=transformers",
           f"data.datasets=[{{path: {json.dumps(data)}}}]", "train.steps=6", "train.export_hf=false",
           f"train.output_dir={out}", "data.num_workers=0", "optim.lr=1e-4"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 6 and not any(r["step_skipped"] for r in rows)
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in rows)


@pytest.mark.parametrize("precision,multiple,bound", [("bf16", 1, 1.02), ("fp8", 16, 1.05)])
def test_te_packed_sequences_equal_padded_rows(hf, precision, multiple, bound):
    """THD packing through TEDotProductAttention (padding_causal over cu_seqlens / cu_seqlens_padded)
    and megatron's THD rotary path: text and image sequences give the padded rows' log-probs
    (different attention kernels, so within bf16 / FP8 tolerance); FP8 with each sequence padded to 16."""
    m = helpers.model_from_hf(hf, "te", precision, "tensorwise")
    pad, pack, _ = packing_cases.packed_vs_padded_logprobs(m, packing_cases.packing_samples(m.backbone),
                                                            multiple=multiple)
    for x, y in zip(pad, pack):
        assert torch.isfinite(y).all()
        assert helpers.mismatch(x, y) < bound, (precision, helpers.mismatch(x, y))
