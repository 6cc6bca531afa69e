"""Stand-ins for vllm.LLM / SamplingParams / RequestOutput, shaped as vLLM documents them.

They record every call, so tests can check the engine's lifecycle (sleep, wake tags, loads,
cache resets) and its request/response plumbing on CPU. The fake model's `load_weights` maps HF
checkpoint names to vLLM's fused parameter names the way vLLM's Qwen2.5-VL loader documents it
(q/k/v_proj -> qkv_proj, gate/up_proj -> gate_up_proj, `model.` -> `language_model.model.`,
`lm_head.` -> `language_model.lm_head.`; a tied lm_head is not a parameter of its own).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

FUSED = (("self_attn.q_proj.", "self_attn.qkv_proj."), ("self_attn.k_proj.", "self_attn.qkv_proj."),
         ("self_attn.v_proj.", "self_attn.qkv_proj."), ("mlp.gate_proj.", "mlp.gate_up_proj."),
         ("mlp.up_proj.", "mlp.gate_up_proj."))


def vllm_name(hf: str) -> str:
    for a, b in FUSED:
        hf = hf.replace(a, b)
    if hf.startswith("model."):
        return "language_model." + hf
    if hf.startswith("lm_head."):
        return "language_model." + hf
    return hf


class FakeModel(torch.nn.Module):
    def __init__(self, hf_names):
        super().__init__()
        self.names = sorted({vllm_name(n) for n in hf_names})
        for i, n in enumerate(self.names):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(1)))
        self.loads: list[list[str]] = []

    def named_parameters(self, *a, **k):  # vLLM's names, as the real model reports them
        for i, n in enumerate(self.names):
            yield n, getattr(self, f"p{i}")

    def load_weights(self, weights):
        names = [n for n, _ in weights]
        self.loads.append(names)
        return {vllm_name(n) for n in names}


class Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


def _tokens(seed, j, length):
    return [(seed * 31 + j * 7 + k * 3) % 50 + 1 for k in range(length)]


class FakeLLM:
    """Generates deterministically from each request's seed; lengths alternate max_tokens/stop."""

    def __init__(self, hf_names=("model.embed_tokens.weight",)):
        self.model = FakeModel(hf_names)
        self.calls: list[tuple] = []
        self.sleeping: set[str] = set()
        self.llm_engine = SimpleNamespace(reset_mm_cache=lambda: self.calls.append(("reset_mm_cache",)))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))
        self.sleeping = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))
        self.sleeping -= set(tags or ("weights", "kv_cache"))

    def apply_model(self, fn):
        return [fn(self.model)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True

    def reset_encoder_cache(self):
        self.calls.append(("reset_encoder_cache",))

    def generate(self, reqs, params, use_tqdm=True):
        assert not self.sleeping, f"generate while {self.sleeping} asleep"
        self.calls.append(("generate", len(reqs)))
        outs = []
        for r, p in zip(reqs, params):
            samples = []
            for j in range(p["n"]):
                stop = j % 2 == 1
                ids = _tokens(p.get("seed", 0), j, 3 if stop else p["max_tokens"])
                if stop:
                    ids[-1] = p["stop_token_ids"][0]
                lps = [{t: Logprob(-0.1 * (k + 1)), 999: Logprob(-9.0)} for k, t in enumerate(ids)]
                samples.append(SimpleNamespace(index=j, token_ids=ids, logprobs=lps, text=f"t{ids}",
                                               finish_reason="stop" if stop else "length"))
            n_img = 0 if "multi_modal_data" not in r else (
                len(r["multi_modal_data"]["image"]) if isinstance(r["multi_modal_data"]["image"], list) else 1)
            outs.append(SimpleNamespace(prompt_token_ids=[1, 2] + [9] * 4 * n_img, outputs=samples[::-1]))
        return outs


def sampling_cls(**kw):
    assert math.isfinite(kw["temperature"])
    return kw
