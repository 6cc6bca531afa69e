"""The tiny HF checkpoint writer: deterministic, loads in transformers, token ids consistent."""
import hashlib
import json
import os

import pytest
import torch

from megammr.models.tiny import QWEN_SPECIAL_TOKENS, write_tiny_model


def _digest(d):
    h = hashlib.sha256()
    for f in sorted(os.listdir(d)):
        h.update(f.encode())
        h.update(open(os.path.join(d, f), "rb").read())
    return h.hexdigest()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny"))
    return write_tiny_model(d, seed=3, tie_word_embeddings=request.param), request.param


def test_deterministic_by_seed(tiny, tmp_path):
    d, tied = tiny
    assert _digest(write_tiny_model(str(tmp_path / "a"), seed=3, tie_word_embeddings=tied)) == _digest(d)
    assert _digest(write_tiny_model(str(tmp_path / "b"), seed=4, tie_word_embeddings=tied)) != _digest(d)


def test_loads_in_transformers_with_processor(tiny):
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration
    from megammr.models.processor import load_processor

    d, tied = tiny
    proc = load_processor(d)
    tok = proc.tokenizer
    cfg = json.load(open(os.path.join(d, "config.json")))
    ids = tok.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + len(QWEN_SPECIAL_TOKENS)))  # Qwen's order, contiguous
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x. <think>"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|>Find x.")
    assert text.endswith("<|im_start|>assistant\n")
    img = Image.new("RGB", (90, 60), (120, 30, 200))
    batch = proc(text=[text], images=[img], return_tensors="pt")
    n_pad = int((batch["input_ids"] == cfg["image_token_id"]).sum())
    assert n_pad == int(batch["image_grid_thw"].prod()) // 4 > 1
    assert tok.decode(tok("The answer is 24.")["input_ids"]) == "The answer is 24."

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d).eval()
    assert model.config.tie_word_embeddings == tied
    shared = model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert shared == tied
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all() and 0.3 < float(logits.std()) < 10  # O(1), not near zero


def test_rewrite_without_shards_drops_the_old_index(tmp_path):
    import os
    from megammr.models.tiny import write_tiny_model
    write_tiny_model(str(tmp_path), max_shard_bytes=200_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    write_tiny_model(str(tmp_path))
    weights = sorted(f for f in os.listdir(tmp_path) if "safetensors" in f)
    assert weights == ["model.safetensors"]
