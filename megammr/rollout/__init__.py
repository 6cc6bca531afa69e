"""Rollout engines behind one protocol: `generate(prompts, n, sampling) -> list[Rollout]`.

`resolve_engine(name, cuda, vllm_installed)` turns the recipe's rollout.engine into the engine a
run uses: the transformers engine (CPU, or a GPU for debugging;
`TransformersEngine.from_pretrained(hf_dir, max_batch_sequences=...)`) or the vLLM engine (GPU,
colocated with the trainer; `VLLMEngine.from_recipe`, megammr.rollout.vllm_engine). The trainer
builds its engine in megammr.train.setup.build; `megammr eval` and tools/caption.py build their
own. Neither transformers nor vLLM is imported until an engine is used.
"""
from megammr.rollout.base import Rollout, RolloutEngine, RolloutPrompt, SamplingParams

__all__ = ["Rollout", "RolloutEngine", "RolloutPrompt", "SamplingParams", "TransformersEngine", "VLLMEngine",
           "resolve_engine"]


def resolve_engine(name: str, cuda: bool, vllm_installed: bool) -> tuple[str, str]:
    """(engine, note): `auto` is vLLM with CUDA when vLLM is installed, else transformers (the
    note says why, for the log); `vllm` and `transformers` are taken as given (setup.check_recipe
    refuses vllm without CUDA or the package)."""
    if name != "auto":
        return name, ""
    if cuda and vllm_installed:
        return "vllm", ""
    if cuda:
        return "transformers", ('rollout.engine=auto: vLLM is not installed (pip install -e ".[gpu]"), '
                                "using the transformers engine (slow)")
    return "transformers", ""


def __getattr__(name):
    # transformers / vllm are imported only when the engine is actually used
    if name == "TransformersEngine":
        from megammr.rollout.hf_engine import TransformersEngine
        return TransformersEngine
    if name == "VLLMEngine":
        from megammr.rollout.vllm_engine import VLLMEngine
        return VLLMEngine
    raise AttributeError(name)
