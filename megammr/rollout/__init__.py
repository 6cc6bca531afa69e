"""Rollout engines behind one interface, `RolloutEngine` (megammr.rollout.base): `generate(prompts,
n, sampling) -> list[Rollout]` plus the weight-sync and end-of-rollout hooks the trainer calls.

megammr.rollout.registry names the engines a recipe can pick (`rollout.engine`), resolves `auto`
(`resolve_engine(name, cuda)`), and checks a recipe against the engine (`check_engine`): the
transformers engine (CPU, or a GPU for debugging; `TransformersEngine.from_pretrained(hf_dir,
max_batch_sequences=...)`) and the vLLM engine (GPU, colocated with the trainer; megammr.rollout.vllm_engine).
The trainer builds its engine through the registry in megammr.train.setup.build; `megammr eval`
and tools/caption.py build their own. Neither transformers nor vLLM is imported until an engine is used.
"""
from megammr.rollout.base import Rollout, RolloutEngine, RolloutPrompt, SamplingParams, WeightTarget
from megammr.rollout.registry import ENGINES, check_engine, engine_class, resolve_engine

__all__ = ["ENGINES", "Rollout", "RolloutEngine", "RolloutPrompt", "SamplingParams", "TransformersEngine",
           "VLLMEngine", "WeightTarget", "check_engine", "engine_class", "resolve_engine"]


def __getattr__(name):
    # transformers / vllm are imported only when the engine is actually used
    if name == "TransformersEngine":
        from megammr.rollout.hf_engine import TransformersEngine
        return TransformersEngine
    if name == "VLLMEngine":
        from megammr.rollout.vllm_engine import VLLMEngine
        return VLLMEngine
    raise AttributeError(name)
