"""Phase data: record schema and validation (schema), shards (shards), prompts (prompts), Qwen2.5-VL
image preprocessing (images), the energon loader (loader), synthetic data (synthetic).

Submodules are imported directly (`from megammr.data.loader import PhaseDataLoader`): the loader
pulls in megatron-energon, which the schema, prompts and tools do not need.
"""
