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
    eng = TransformersEngine.from_pretrained(tiny_dir, max_batch_sequences=16)
    name, p = next(iter(eng.model.named_parameters()))
    eng.update_weights([(name, torch.zeros_like(p))])
    assert float(dict(eng.model.named_parameters())[name].detach().abs().sum()) == 0.0
    with pytest.raises(KeyError, match="no parameter named"):
        eng.update_weights([("not.a.param", torch.zeros(1))])


def _teacher_forced_logits(engine, prompt, response_ids, **image_kwargs):
    """Logits of one unpadded forward pass over prompt + response (the trainer's view)."""
    enc = engine.processor(text=[prompt.text], images=prompt.images or None, return_tensors="pt", **image_kwargs)
    ids = torch.cat([enc["input_ids"], torch.tensor([response_ids])], 1)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = torch.cat(
            [extra["mm_token_type_ids"], torch.zeros(1, len(response_ids), dtype=extra["mm_token_type_ids"].dtype)], 1)
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
    L = enc["input_ids"].shape[1]
    return logits[0, L - 1:-1].float()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.9), (0.0, -1, 1.0)])
def test_logprobs_are_of_the_tempered_full_vocab_distribution(engine, temperature, top_k, top_p):
    """log softmax(logits / T) of a teacher-forced fp32 forward, T = the sampling temperature
    (1 when greedy), top-k/top-p not applied: exactly what the trainer recomputes."""
    ps = prompts()
    out = engine.generate(ps, n=2, sampling=SamplingParams(temperature, top_p, top_k, 8, seed=3))
    T = temperature if temperature > 0 else 1.0
    for r in out:
        logits = _teacher_forced_logits(engine, ps[r.prompt_index], r.token_ids)
        ref = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
        got = torch.tensor(r.logprobs, dtype=torch.float32)
        assert (got - ref).abs().max() <= 1e-5, (r.prompt_index, r.sample_index, (got - ref).abs().max())
        # the temperature-1 log-probs differ: the engine really reports the tempered ones
        if temperature != 1.0 and temperature > 0:
            t1 = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
            assert (got - t1).abs().max() > 1e-3


def test_seed_owns_sampling_and_leaves_global_rng_alone(tiny_dir, engine):
    from megammr.rollout import TransformersEngine
    ps = prompts()
    sp = lambda seed: SamplingParams(1.0, 1.0, -1, 8, seed=seed)  # noqa: E731
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = (engine.generate(ps, 3, sp(s)) for s in (11, 11, 12))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG was neither read nor advanced
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert len({tuple(r.token_ids) for r in a}) > 1  # samples of one call differ from one another
    # a sample is a function of (seed, prompt, sample), not of the batch it ran in
    one = TransformersEngine(engine.model, engine.processor, max_batch_sequences=1)
    assert [r.token_ids for r in one.generate(ps, 3, sp(11))] == [r.token_ids for r in a]
    # without a seed, sampling draws from the global RNG: reproducible under torch.manual_seed
    torch.manual_seed(5)
    u = engine.generate(ps, 2, sp(None))
    torch.manual_seed(5)
    assert [r.token_ids for r in engine.generate(ps, 2, sp(None))] == [r.token_ids for r in u]


def test_pixel_limits_give_the_trainers_prompt_tokens(tiny_dir, engine):
    """With the recipe's min/max pixels the engine's expanded prompt equals encode_prompt's, for
    images the processor's own limits (preprocessor_config.json) would size differently."""
    from megammr.data.prompts import encode_prompt
    from megammr.rollout import TransformersEngine
    big = Image.new("RGB", (448, 392), (30, 160, 40))     # > max_pixels: shrunk
    small = Image.new("RGB", (56, 56), (200, 200, 20))    # < min_pixels: enlarged
    lo, hi = 8 * 28 * 28, 4 * 28 * 28 * 4
    eng = TransformersEngine(engine.model, engine.processor, max_batch_sequences=16, min_pixels=lo, max_pixels=hi)
    pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    sp = SamplingParams(0.0, 1.0, -1, 2)
    for imgs in ([big], [small], [big, small]):
        p = encode_prompt("How many?", style="image", images=imgs, tokenizer=engine.tokenizer,
                          min_pixels=lo, max_pixels=hi)
        (r,) = eng.generate([p], 1, sp)
        assert r.prompt_token_ids == p.input_ids.tolist()
        (d,) = engine.generate([p], 1, sp)  # processor defaults: a different image token count
        assert d.prompt_token_ids.count(pad) != r.prompt_token_ids.count(pad)
    # only one limit given: the other stays the processor's own
    only_max = TransformersEngine(engine.model, engine.processor, max_batch_sequences=16, max_pixels=hi)
    p = encode_prompt("How many?", style="image", images=[big], tokenizer=engine.tokenizer,
                      min_pixels=engine.processor.image_processor.size["shortest_edge"], max_pixels=hi)
    assert only_max.generate([p], 1, sp)[0].prompt_token_ids == p.input_ids.tolist()
