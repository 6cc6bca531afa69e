"""Rollout engines behind one protocol: `generate(prompts, n, sampling) -> list[Rollout]`.

`make_engine(recipe_rollout_cfg, model_path)` picks the engine; the transformers engine runs on
CPU (and on a GPU for debugging). The vLLM engine arrives with the trainer.
"""
from megammr.rollout.base import Rollout, RolloutEngine, RolloutPrompt, SamplingParams

__all__ = ["Rollout", "RolloutEngine", "RolloutPrompt", "SamplingParams", "TransformersEngine"]


def __getattr__(name):
    # transformers is imported only when the engine is actually used
    if name == "TransformersEngine":
        from megammr.rollout.hf_engine import TransformersEngine
        return TransformersEngine
    raise AttributeError(name)
