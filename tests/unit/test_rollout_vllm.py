"""The vLLM engine's CPU-testable parts: feature checks, version gate, recipe checks, request
building, log-prob extraction, the sleep/wake/load lifecycle and the weight-sync hooks, against
stand-ins of vLLM's documented objects (tests/unit/vllm_fakes.py). Real vLLM: tests/gpu/test_vllm_gpu.py."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from megammr.config import RecipeError, load_recipe
from megammr.rollout import RolloutPrompt, SamplingParams, resolve_engine
from megammr.rollout import vllm_engine as ve
from megammr.train.setup import check_recipe

sys.path.insert(0, os.path.dirname(__file__))
from vllm_fakes import FakeLLM, sampling_cls  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_modules_import_nothing_gpu_only():
    code = ("import sys; import megammr.rollout.vllm_engine, megammr.models.te, megammr.train.setup, "
            "megammr.rollout; print(sorted(m for m in ('vllm', 'transformer_engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_require_vllm_absent_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ve.EngineUnavailable) as e:
        ve.require_vllm()
    msg = str(e.value)
    assert "\n" not in msg and 'pip install -e ".[gpu]"' in msg and "rollout.engine=transformers" in msg


def test_build_without_cuda_is_a_clear_error():
    r = load_recipe("recipes/qwen2_5_vl_3b/phase1.yaml")
    with pytest.raises(ve.EngineUnavailable, match="needs CUDA"):
        ve.VLLMEngine.build(r, rt=None, group=None, leader=0, is_leader=True)


@pytest.mark.parametrize("version,errors,warnings", [
    (None, 1, 0), ("0.9.2", 1, 0), ("0.15.1", 1, 0), ("0.16.0", 0, 0), ("0.20.2", 0, 0), ("0.33.0", 0, 0),
    ("0.34.0", 0, 1), ("1.0.0rc1", 0, 1),
])
def test_version_gate(version, errors, warnings):
    e, w = ve.version_problems(version)
    assert (len(e), len(w)) == (errors, warnings)


def test_feature_table():
    old, new = ve.features_for("0.10.1"), ve.features_for("0.17.0")
    assert not old.processed_logprobs and not old.encoder_cache_reset and not old.native_weight_transfer
    assert new.processed_logprobs and new.encoder_cache_reset and new.native_weight_transfer
    assert new.weight_path == old.weight_path == "load_weights"  # in process at every version (external_launcher)


# ----------------------------------------------------------------------------- engine selection
def test_resolve_engine(monkeypatch):
    monkeypatch.setattr(ve, "vllm_version", lambda: "0.20.0")  # installed
    assert resolve_engine("auto", cuda=False) == ("transformers", "")
    assert resolve_engine("auto", cuda=True) == ("vllm", "")
    monkeypatch.setattr(ve, "vllm_version", lambda: None)       # not installed
    name, note = resolve_engine("auto", cuda=True)
    assert name == "transformers" and 'pip install -e ".[gpu]"' in note
    assert note == ('rollout.engine=auto: vLLM is not installed (pip install -e ".[gpu]"), '
                    "using the transformers engine (slow)")
    assert resolve_engine("vllm", cuda=False)[0] == "vllm"


def _recipe(tmp_path, *overrides):
    (tmp_path / "config.json").write_text("{}")
    return load_recipe("recipes/tiny/phase1.yaml", [f"model.hf_path={tmp_path}", *overrides])


@pytest.mark.parametrize("cuda,version,overrides,needle", [
    (False, "0.20.0", ["rollout.engine=vllm"], "rollout.engine=vllm needs CUDA"),
    (True, None, ["rollout.engine=vllm"], 'vLLM is not installed (pip install -e ".[gpu]")'),
    (True, "0.12.0", ["rollout.engine=vllm"], "older than 0.16"),
    (True, "0.20.0", ["rollout.engine=vllm", "parallel.pp=2"], "parallel.pp > 1"),
    (True, "0.20.0", ["rollout.engine=vllm", "rollout.tp=2"], "rollout.tp=2 with parallel.tp=1"),
    (True, "0.20.0", ["rollout.engine=vllm", "rollout.top_p=0.9"], "truncated distribution"),
    (True, None, ["rollout.sleep_level=1"], "rollout.sleep_level is a vLLM setting"),  # auto -> transformers
    (False, None, ["model.layer_spec=te"], "model.layer_spec=te needs CUDA"),
])
def test_engine_checks(monkeypatch, tmp_path, cuda, version, overrides, needle):
    monkeypatch.setattr(ve, "vllm_version", lambda: version)
    r = _recipe(tmp_path, *overrides)
    with pytest.raises(RecipeError) as e:
        check_recipe(r, world_size=2 if "parallel.pp=2" in overrides else 1, cuda=cuda)
    assert needle in str(e.value)


def test_vllm_is_chosen_when_it_can_be_honoured(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ve, "vllm_version", lambda: "0.20.0")
    assert check_recipe(_recipe(tmp_path, "rollout.engine=vllm", "rollout.sleep_level=1"), 1, cuda=True) == "vllm"
    assert check_recipe(_recipe(tmp_path), 1, cuda=True) == "vllm"        # auto with CUDA and vLLM
    monkeypatch.setattr(ve, "vllm_version", lambda: None)
    assert check_recipe(_recipe(tmp_path), 1, cuda=True) == "transformers"
    assert "vLLM is not installed" in capsys.readouterr().out             # said, not silent
    assert check_recipe(_recipe(tmp_path), 1, cuda=False) == "transformers"


def test_config_validates_vllm_fields():
    for bad, needle in (("rollout.sleep_level=3", "sleep_level must be 1 or 2"),
                        ("rollout.gpu_memory_utilization=1.5", "gpu_memory_utilization must be in (0, 1)"),
                        ("rollout.max_images=-1", "max_images must be >= 0")):
        with pytest.raises(RecipeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            load_recipe(None, [bad])


# ----------------------------------------------------------------------------- pure parts
def test_llm_kwargs_follow_the_recipe():
    r = load_recipe("recipes/qwen2_5_vl_3b/phase1.yaml", ["parallel.tp=2", "data.max_pixels=200704"])
    kw = ve.llm_kwargs(r, rank=5, tp=2)
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["tensor_parallel_size"] == 2
    assert kw["seed"] == 2 and kw["load_format"] == "dummy" and kw["enable_sleep_mode"] is True
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["generation_config"] == "vllm"
    assert kw["max_model_len"] == r.data.max_prompt_tokens + r.rollout.max_new_tokens
    assert kw["mm_processor_kwargs"] == {"min_pixels": r.data.min_pixels, "max_pixels": 200704}
    assert kw["limit_mm_per_prompt"] == {"image": r.rollout.max_images, "video": 0}
    assert kw["gpu_memory_utilization"] == r.rollout.gpu_memory_utilization and kw["dtype"] == "bfloat16"
    env = ve.launcher_env(5, 1, 8, "10.0.0.1", 29400)
    assert env == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1",
                   "MASTER_PORT": "29400", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _img(c=0):
    return Image.new("RGB", (56, 56), (c, 10, 20))


PAD = "<|vision_start|><|image_pad|><|vision_end|>"


def test_build_requests():
    a, b = _img(1), _img(2)
    reqs = ve.build_requests([RolloutPrompt("text only"), RolloutPrompt(f"{PAD} one", [a]),
                              RolloutPrompt(f"{PAD}{PAD} two", [a, b])], max_images=2)
    assert reqs[0] == {"prompt": "text only"}
    assert reqs[1] == {"prompt": f"{PAD} one", "multi_modal_data": {"image": a}}
    assert reqs[2]["multi_modal_data"]["image"] == [a, b]
    with pytest.raises(ValueError, match="rollout.max_images=1"):
        ve.build_requests([RolloutPrompt(f"{PAD}{PAD}", [a, b])], max_images=1)
    with pytest.raises(ValueError, match="1 <|image_pad|> placeholders for 2 images".replace("|", r"\|")):
        ve.build_requests([RolloutPrompt(f"{PAD}", [a, b])], max_images=4)


def test_sampling_kwargs():
    sp = SamplingParams(temperature=0.7, top_p=1.0, top_k=-1, max_new_tokens=9)
    kw = ve.sampling_kwargs(sp, 4, 123, [7, 8])
    assert kw == dict(n=4, temperature=0.7, max_tokens=9, logprobs=0, stop_token_ids=[7, 8],
                      repetition_penalty=1.0, skip_special_tokens=True, seed=123)
    for bad in (dict(top_k=5), dict(top_p=0.9)):
        with pytest.raises(ValueError, match="full distribution"):
            ve.sampling_kwargs(SamplingParams(**{**vars(sp), **bad}), 1, None, [7])
    seeds = {ve.request_seed(1, i) for i in range(100)}
    assert len(seeds) == 100 and ve.request_seed(1, 3) == ve.request_seed(1, 3)


def test_extraction_prompt_major_with_logprobs():
    llm = FakeLLM()
    outs = llm.generate([{"prompt": "a"}, {"prompt": "b"}],
                        [dict(n=2, max_tokens=4, seed=s, stop_token_ids=[77]) for s in (1, 2)])
    ros = ve.extract_rollouts(outs, n=2)
    assert [(r.prompt_index, r.sample_index) for r in ros] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r.finish_reason for r in ros] == ["length", "stop"] * 2
    assert ros[1].token_ids[-1] == 77 and len(ros[0].token_ids) == 4
    assert ros[0].logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])  # the sampled token's, not the other entry
    assert ros[0].prompt_token_ids == [1, 2]
    with pytest.raises(RuntimeError, match="expected n=3"):
        ve.extract_rollouts(outs, n=3)
    bad = outs[0].outputs[0]
    bad.logprobs = bad.logprobs[:-1]
    with pytest.raises(RuntimeError, match="log-prob positions"):
        ve.extract_rollouts(outs, n=2)
    with pytest.raises(RuntimeError, match="no log-probs"):
        ve.token_logprobs(None, [1])
    with pytest.raises(RuntimeError, match="do not hold the sampled token 5"):
        ve.token_logprobs([{6: -1.0}], [5])
    assert ve.token_logprobs([{5: -1.5}], [5]) == [-1.5]  # plain floats are accepted too


# ----------------------------------------------------------------------------- lifecycle
HF = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
      "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.gate_proj.weight",
      "model.layers.0.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.weight", "lm_head.weight"]


def _engine(level=2):
    llm = FakeLLM(HF)
    eng = ve.VLLMEngine(llm, sampling_cls, stop_ids=[77], max_images=2, sleep_level=level)
    eng.sleep(level=2)  # as build does after building
    return eng, llm


def _sync(eng, names=HF):
    eng.begin_weight_update()
    half = len(names) // 2
    eng.update_weights([(n, None) for n in names[:half]])
    eng.update_weights([(n, None) for n in names[half:]])
    eng.finish_weight_update()


SP = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=5, seed=11)


def test_lifecycle_sleep_wake_load_reset_generate():
    eng, llm = _engine()
    with pytest.raises(RuntimeError, match="no weights"):
        eng.generate([RolloutPrompt("x")], 2, SP)
    llm.calls.clear()
    _sync(eng)
    assert llm.calls[0] == ("wake_up", ("weights",))                     # the KV cache stays asleep
    assert [c[0] for c in llm.calls[1:]] == ["reset_prefix_cache", "reset_encoder_cache", "reset_mm_cache"]
    assert llm.model.loads == [HF[:4], HF[4:]]                           # bucket by bucket, HF names
    llm.calls.clear()
    a = eng.generate([RolloutPrompt("x"), RolloutPrompt(f"{PAD} y", [_img()])], 2, SP)
    assert llm.calls == [("wake_up", ("kv_cache",)), ("generate", 2)]
    assert len(a) == 4 and a[2].prompt_token_ids == [1, 2, 9, 9, 9, 9]
    b = eng.generate([RolloutPrompt("x"), RolloutPrompt(f"{PAD} y", [_img()])], 2, SP)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]          # same seed, same rollouts
    assert a[0].token_ids != a[2].token_ids                              # per-request seeds differ
    eng.finish_rollouts()
    assert llm.calls[-1] == ("sleep", 2) and eng.asleep == {"weights", "kv_cache"}
    with pytest.raises(RuntimeError, match="no weights"):               # level 2 discarded them
        eng.generate([RolloutPrompt("x")], 1, SP)


def test_level_one_keeps_the_weights_and_sleep_needs_an_awake_engine():
    eng, llm = _engine(level=1)
    _sync(eng)
    eng.finish_rollouts()  # synced but nothing generated: the KV cache is woken so that sleep() is honoured
    assert llm.calls[-2:] == [("wake_up", ("kv_cache",)), ("sleep", 1)]
    assert eng.synced
    eng.finish_rollouts()
    assert llm.calls[-1] == ("sleep", 1) and llm.calls.count(("sleep", 1)) == 1  # already asleep: no call


def test_a_sync_that_misses_a_parameter_is_an_error():
    eng, _ = _engine()
    with pytest.raises(RuntimeError, match="1 vLLM parameters unwritten.*language_model.model.embed_tokens"):
        _sync(eng, HF[1:])


def test_stale_image_embeddings_are_refused_without_an_encoder_reset():
    class OldLLM(FakeLLM):
        reset_encoder_cache = None  # an old vLLM: no reset_encoder_cache anywhere

    eng = ve.VLLMEngine(OldLLM(HF), sampling_cls, stop_ids=[77], max_images=4, sleep_level=2)
    eng.sleep(2)
    _sync(eng)
    eng.generate([RolloutPrompt("text is fine")], 1, SP)
    with pytest.raises(ve.EngineUnavailable, match="freeze_vision"):
        eng.generate([RolloutPrompt(f"{PAD}", [_img()])], 1, SP)
    eng.vision_trainable = False
    assert len(eng.generate([RolloutPrompt(f"{PAD}", [_img()])], 1, SP)) == 1


def test_unseeded_sampling_draws_one_seed_for_the_group():
    import torch
    eng, llm = _engine()
    _sync(eng)
    torch.manual_seed(0)
    a = eng.generate([RolloutPrompt("x")], 2, SamplingParams(1.0, 1.0, -1, 4, seed=None))
    torch.manual_seed(0)
    b = eng.generate([RolloutPrompt("x")], 2, SamplingParams(1.0, 1.0, -1, 4, seed=None))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_stop_ids_from_generation_config(tmp_path):
    class Tok:
        eos_token_id = 3

        def convert_tokens_to_ids(self, t):
            return 151645 if t == "<|im_end|>" else None
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151645]}))
    assert ve.stop_token_ids(str(tmp_path), Tok()) == [151643, 151645]
