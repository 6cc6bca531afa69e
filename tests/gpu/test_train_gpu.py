"""The tiny model and a GRPO train step on one GPU with megatron-core's local spec (no TE, no vLLM):
the checks tools/gpu_check.sh can always run. Skipped without CUDA."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import gpu_helpers as helpers  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import packing_cases  # noqa: E402  (tests/packing_cases.py)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from megammr.models.tiny import write_tiny_model
    helpers.init()
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=0, tie_word_embeddings=False)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_megatron_on_gpu_matches_transformers(hf, precision, tol):
    from megammr.models.parity import hf_logits, megatron_logits, parity_inputs
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m = helpers.model_from_hf(hf, "local", precision)
        for name, inp in parity_inputs(hf).items():
            ref = hf_logits(hf, inp)  # float32 on CPU
            gpu = {k: (v.cuda() if torch.is_tensor(v) and k != "image_grid_thw" else v) for k, v in inp.items()}
            if "pixel_values" in gpu:
                gpu["pixel_values"] = gpu["pixel_values"].to(m.config.params_dtype)
            got = megatron_logits(m, gpu).float().cpu()
            rel = float((got - ref).norm() / ref.norm())
            assert rel < tol, (name, rel)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_backward_on_gpu_matches_transformers_float64(hf):
    """One backward of a log-prob loss on GPU (fp32, TF32 off) against transformers' model in float64
    on the CPU: gradients of the tensors both name alike (embedding, final norm, output layer)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megammr.models.vlm import mrope_position_ids
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m = helpers.model_from_hf(hf, "local", "fp32").train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, m.backbone.vocab_size, (2, 33), generator=g)

        def loss_of(logits, ids):
            return torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).mean()
        logits = m(input_ids=ids.cuda(), position_ids=mrope_position_ids(ids, m.backbone).cuda())
        loss_of(logits, ids.cuda()).backward()  # GPTModel returns [b, s, vocab]
        ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float64).train()
        loss_of(ref(input_ids=ids).logits, ids).backward()
        pairs = {"language_model.embedding.word_embeddings.weight": ref.model.language_model.embed_tokens.weight,
                 "language_model.decoder.final_layernorm.weight": ref.model.language_model.norm.weight,
                 "language_model.output_layer.weight": ref.lm_head.weight}
        mine = dict(m.named_parameters())
        for name, rp in pairs.items():
            got = mine[name].grad.detach().double().cpu()
            rel = float((got - rp.grad).norm() / rp.grad.norm())
            assert torch.isfinite(got).all() and rel < 1e-4, (name, rel)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("options", [[], ["train.offload_during_rollout=true", "train.pack_sequences=true"]],
                         ids=["plain", "offload+packed"])
def test_grpo_steps_on_gpu(tmp_path, hf, options):
    """`megammr train` for 3 steps on the GPU (transformers engine, bf16): finite loss and grad norm;
    and with the memory options (optimizer state and grad buffers released during the rollout,
    THD-packed micro-batches): the same, with the released memory reported."""
    from megammr.data.synthetic import write_all
    data = write_all(str(tmp_path / "data"), n=64, seed=0, phases=(1,), progress=False)[1]["shards"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megammr", "train", "recipes/tiny/phase1.yaml", f"model.hf_path={hf}",
           "model.precision=bf16", "rollout.engine=transformers", f"data.datasets=[{{path: {json.dumps(data)}}}]",
           "train.steps=3", "train.export_hf=false", f"train.output_dir={out}", "data.num_workers=0", *options]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 3
    for r in rows:
        assert r["loss"] is not None and r["grad_norm"] is not None and r["logp_diff/rollout_vs_train"] < 0.1
        if options:  # bf16: fp32 main params + two Adam moments + fp32 grads are all on the GPU
            assert r["memory/offloaded_mb"] > 0 and r["batch/pad_frac"] == 0, r


def test_packed_sequences_equal_padded_rows_on_gpu(hf):
    """THD packing with the local spec on the GPU (megammr's packed SDPA path, unfused THD rotary):
    the log-probs of text and image sequences equal the padded rows' (fp32, TF32 off)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m = helpers.model_from_hf(hf, "local", "fp32")
        pad, pack, _ = packing_cases.packed_vs_padded_logprobs(m, packing_cases.packing_samples(m.backbone))
        worst = max(float((x - y).abs().max()) for x, y in zip(pad, pack))
        assert worst < 1e-4, worst
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
