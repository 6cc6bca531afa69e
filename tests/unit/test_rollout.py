"""Transformers rollout engine on a tiny random Qwen2.5-VL: order, batching, images, log-probs."""
import pytest
import torch
from PIL import Image

from megammr.config import RolloutConfig
from megammr.data.prompts import build_messages, render_chat
from megammr.rollout import RolloutEngine, RolloutPrompt, SamplingParams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from megammr.models.tiny import write_tiny_model
    return write_tiny_model(str(tmp_path_factory.mktemp("tinyvl")), seed=0)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from megammr.rollout import TransformersEngine
    return TransformersEngine.from_pretrained(tiny_dir, max_batch_sequences=16)


def prompts():
    red = Image.new("RGB", (56, 84), (200, 10, 10))
    blue = Image.new("RGB", (84, 56), (10, 10, 200))
    return [
        RolloutPrompt(render_chat(build_messages("What is 1+1?", style="text"))),
        RolloutPrompt(render_chat(build_messages("What colour is it?", style="image", num_images=1)), [red]),
        RolloutPrompt(render_chat(build_messages("Compare the two, then answer briefly.", style="image",
                                                 num_images=2)), [red, blue]),
    ]


def test_engine_protocol_and_order(engine):
    assert isinstance(engine, RolloutEngine)
    sp = SamplingParams.from_config(RolloutConfig(), seed=0, max_new_tokens=10)
    out = engine.generate(prompts(), n=3, sampling=sp)
    assert [(r.prompt_index, r.sample_index) for r in out] == [(i, j) for i in range(3) for j in range(3)]
    for r in out:
        assert 1 <= len(r.token_ids) <= 10 and len(r.logprobs) == len(r.token_ids)
        assert all(lp <= 1e-6 for lp in r.logprobs)
        assert r.finish_reason in ("stop", "length")
        assert (r.finish_reason == "stop") == (r.token_ids[-1] in engine.stop_ids)
        assert isinstance(r.text, str) and r.prompt_token_ids
    # image prompts carry their expanded image pads in the prompt ids
    pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert out[0].prompt_token_ids.count(pad) == 0 and out[3].prompt_token_ids.count(pad) > 1
    assert out[6].prompt_token_ids.count(pad) > out[3].prompt_token_ids.count(pad)


def test_logprobs_match_a_teacher_forced_forward(engine):
    """Per-token log-probs from the batched, left-padded generate equal a fresh forward pass of
    prompt + response, one sequence at a time (text and image prompts)."""
    ps = prompts()
    out = engine.generate(ps, n=2, sampling=SamplingParams(1.0, 1.0, -1, 8, seed=1))
    for r in out[::2]:
        p = ps[r.prompt_index]
        enc = engine.processor(text=[p.text], images=p.images or None, return_tensors="pt")
        ids = torch.cat([enc["input_ids"], torch.tensor([r.token_ids])], 1)
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = torch.cat(
                [extra["mm_token_type_ids"], torch.zeros(1, len(r.token_ids), dtype=extra["mm_token_type_ids"].dtype)], 1)
        with torch.no_grad():
            logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
        L = enc["input_ids"].shape[1]
        ref = torch.log_softmax(logits[0, L - 1:-1].double(), -1).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
        got = torch.tensor(r.logprobs, dtype=torch.float64)
        assert r.prompt_token_ids == enc["input_ids"][0].tolist()
        rel = (got - ref).norm() / ref.norm()
        assert rel < 1e-4, (r.prompt_index, rel)


def test_seeded_and_greedy_are_reproducible(engine):
    ps = prompts()
    a = engine.generate(ps, n=2, sampling=SamplingParams(1.0, 0.9, 20, 8, seed=7))
    b = engine.generate(ps, n=2, sampling=SamplingParams(1.0, 0.9, 20, 8, seed=7))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    g = engine.generate(ps, n=2, sampling=SamplingParams(0.0, 1.0, -1, 8))
    assert all(x.token_ids == y.token_ids for x, y in zip(g[0::2], g[1::2]))


def test_batching_does_not_change_greedy_output(tiny_dir, engine):
    from megammr.rollout import TransformersEngine
    one = TransformersEngine(engine.model, engine.processor, max_batch_sequences=1)
    sp = SamplingParams(0.0, 1.0, -1, 8)
    assert [r.token_ids for r in one.generate(prompts(), 1, sp)] == [r.token_ids for r in engine.generate(prompts(), 1, sp)]


def test_update_weights(tiny_dir):
    from megammr.rollout import TransformersEngine
    eng = TransformersEngine.from_pretrained(tiny_dir)
    name, p = next(iter(eng.model.named_parameters()))
    eng.update_weights([(name, torch.zeros_like(p))])
    assert float(dict(eng.model.named_parameters())[name].detach().abs().sum()) == 0.0
    with pytest.raises(KeyError, match="no parameter named"):
        eng.update_weights([("not.a.param", torch.zeros(1))])
