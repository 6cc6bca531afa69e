"""The colocated vLLM engine on one GPU against Megatron (reference/gpu-paths.md C.3, vLLM path).

One process, world size 1 (rollout.tp = parallel.tp = 1). vLLM is built first (dummy weights,
asleep), then the Megatron model from the HF checkpoint; every check goes through the trainer's
own WeightSync. Skipped without CUDA or without vllm."""
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("vllm", reason='needs vllm (pip install -e ".[gpu]")')

sys.path.insert(0, os.path.dirname(__file__))
import gpu_helpers as helpers  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megammr.config import load_recipe
    from megammr.models.tiny import write_tiny_model
    from megammr.rollout.vllm_engine import VLLMEngine
    from megammr.train.sync import WeightSync

    hf = write_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=0, tie_word_embeddings=True, dtype=torch.bfloat16)
    r = load_recipe("recipes/tiny/phase1.yaml", [f"model.hf_path={hf}", "model.precision=bf16", "rollout.engine=vllm",
                                                 "rollout.gpu_memory_utilization=0.3", "data.max_prompt_tokens=1024",
                                                 "rollout.max_new_tokens=32"])
    rt = helpers.init(r)
    free0 = torch.cuda.mem_get_info()[0]
    eng = VLLMEngine.build(r, rt, group=None, leader=0, is_leader=True)
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    free_asleep = torch.cuda.mem_get_info()[0]
    model = helpers.model_from_hf(hf, "local", "bf16")
    sync = WeightSync(model, eng, bucket_mb=1)  # several buckets even for the tiny model
    return dict(r=r, hf=hf, eng=eng, model=model, sync=sync, free0=free0, free_asleep=free_asleep)


def _prompts(hf, with_image=True):
    from PIL import Image

    from megammr.data.prompts import encode_prompt
    from megammr.models.processor import load_processor
    tok = load_processor(hf).tokenizer
    out = [encode_prompt("What is 2 + 3?", style="text", tokenizer=tok)]
    if with_image:
        img = Image.new("RGB", (112, 84), (30, 140, 220))
        out.append(encode_prompt("What colour is this?", style="image", images=[img], tokenizer=tok))
    return out


def _sp(**kw):
    from megammr.rollout import SamplingParams
    return SamplingParams(**{**dict(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=16, seed=7), **kw})


def _step(s, prompts, n=2, **kw):
    """One trainer-shaped cycle: sync, generate, finish (sleep)."""
    s["sync"].sync()
    try:
        return s["eng"].generate(prompts, n, _sp(**kw))
    finally:
        s["eng"].finish_rollouts()


def test_memory_is_given_back_while_asleep(setup):
    # vLLM claims gpu_memory_utilization at start and releases it at the level-2 sleep right after
    total = torch.cuda.get_device_properties(0).total_memory
    assert setup["free0"] - setup["free_asleep"] < 0.1 * setup["r"].rollout.gpu_memory_utilization * total


def test_prompt_ids_logprobs_and_parity_with_megatron(setup):
    prompts = _prompts(setup["hf"])
    ros = _step(setup, prompts, n=2)
    assert len(ros) == 4
    for ro in ros:
        p = prompts[ro.prompt_index]
        assert ro.prompt_token_ids == p.input_ids.tolist()            # vLLM expanded the image pads like the trainer
        assert len(ro.logprobs) == len(ro.token_ids) and all(lp <= 0 for lp in ro.logprobs)
        ref = helpers.continuation_logprobs(setup["model"], ro.prompt_token_ids, ro.token_ids,
                                            pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
        assert helpers.mismatch(torch.tensor(ro.logprobs, device="cuda"), ref) < 1.03


def test_same_seed_same_rollouts_and_temperature(setup):
    prompts = _prompts(setup["hf"], with_image=False)
    a, b = _step(setup, prompts), _step(setup, prompts)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    cold = _step(setup, prompts, temperature=0.6)
    p = prompts[0]
    ref = helpers.continuation_logprobs(setup["model"], p.input_ids.tolist(), cold[0].token_ids, temperature=0.6)
    assert helpers.mismatch(torch.tensor(cold[0].logprobs, device="cuda"), ref) < 1.03   # processed log-probs at T


def _perturbed(setup, prompts, weight, fn):
    saved = weight.detach().clone()
    with torch.no_grad():
        fn(weight)
    try:
        return _step(setup, prompts, temperature=0.0)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_updates_take_effect_and_caches_are_reset(setup):
    prompts = _prompts(setup["hf"])  # [text, image]
    base = _step(setup, prompts, temperature=0.0)
    m = setup["model"]
    lm = _perturbed(setup, prompts, m.language_model.decoder.layers[0].mlp.linear_fc2.weight, torch.Tensor.zero_)
    assert lm[0].logprobs != pytest.approx(base[0].logprobs, abs=1e-3)
    # only the vision tower changes: the image prompt's output must change (a stale encoder cache
    # would serve the old image embeddings), the text prompt's must not
    vit = _perturbed(setup, prompts, m.vision_model.blocks[0].mlp.down_proj.weight, lambda w: w.mul_(3.0))
    assert vit[0].token_ids == base[0].token_ids and vit[0].logprobs == pytest.approx(base[0].logprobs, abs=1e-3)
    assert vit[2].logprobs != pytest.approx(base[2].logprobs, abs=1e-3)
    back = _step(setup, prompts, temperature=0.0)
    assert [r.token_ids for r in back] == [r.token_ids for r in base]      # restored weights, fresh caches
    assert [r.logprobs for r in back] == pytest.approx([r.logprobs for r in base], abs=1e-3)


def test_sleep_level_one_and_two_give_the_same_greedy_tokens(setup):
    prompts = _prompts(setup["hf"])
    eng = setup["eng"]
    out = {}
    try:
        for level in (1, 2, 1):
            eng.sleep_level = level
            out.setdefault(level, []).append([r.token_ids for r in _step(setup, prompts, temperature=0.0)])
    finally:
        eng.sleep_level = setup["r"].rollout.sleep_level
    assert out[1][0] == out[2][0] == out[1][1]


def test_sync_timings_are_reported(setup):
    t = setup["sync"].sync()
    setup["eng"].finish_rollouts()
    assert t.tensors_loaded > 0 and min(t.gather_s, t.convert_s, t.load_s) >= 0 and t.total_s > 0
