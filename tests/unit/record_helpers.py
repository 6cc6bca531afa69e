"""Fixtures shared by the tests/unit/test_data_*.py files (imported by name there)."""
import pytest


@pytest.fixture(scope="session")
def tiny_processor(tmp_path_factory):
    """transformers' Qwen2.5-VL processor over the tiny model's locally built tokenizer."""
    from megammr.models.processor import load_processor
    from megammr.models.tiny import write_processor_files, _write_tokenizer_files, build_tokenizer
    d = str(tmp_path_factory.mktemp("tiny_hf"))
    _write_tokenizer_files(d, build_tokenizer(), model_max_length=4096)
    write_processor_files(d)
    return load_processor(d)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_processor):
    return tiny_processor.tokenizer
