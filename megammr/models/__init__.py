"""Qwen2.5-VL on megatron-core: backbones table, the VLM, HF<->Megatron mapping, tiny test models.

Importing this package imports neither megatron-core nor transformers; submodules do.
"""
