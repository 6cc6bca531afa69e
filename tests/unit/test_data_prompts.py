"""Prompt token layout and image preprocessing equal to transformers' Qwen2.5-VL processor."""
import numpy as np
import pytest
import torch
from PIL import Image

from record_helpers import tiny_processor, tiny_tokenizer  # noqa: F401 (fixtures)
from megammr.data.images import preprocess_images, smart_resize
from megammr.data.prompts import SYSTEM_PROMPT, PromptError, encode_prompt, render_chat


def _img(seed, h, w, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if len(mode) == 1 else arr, mode)


CASES = [  # (style, image sizes, caption, choices)
    ("text", [], None, None),
    ("text", [], None, ["12", "16", "18"]),
    ("caption", [(50, 70)], "A bar chart with bars A = 3 and B = 5.", None),
    ("image", [(300, 200)], None, ["bar A", "bar B"]),
    ("image", [(33, 900), (120, 120)], None, None),  # two images, extreme aspect
    ("caption", [(1000, 1400)], "A big picture.", None),  # resized down to max_pixels
]


@pytest.mark.parametrize("style,sizes,caption,choices", CASES)
def test_prompt_equals_transformers_processor(tiny_processor, style, sizes, caption, choices):
    proc = tiny_processor
    images = [_img(i, h, w) for i, (h, w) in enumerate(sizes)]
    max_pixels = 200_000
    p = encode_prompt("What is the answer, café?", style=style, images=images, caption=caption, choices=choices,
                      tokenizer=proc.tokenizer, min_pixels=3136, max_pixels=max_pixels)
    # transformers renders the same messages with the checkpoint's chat template and expands pads itself.
    kw = {"images_kwargs": {"size": {"shortest_edge": 3136, "longest_edge": max_pixels}}} if images else {}
    ref = proc.apply_chat_template([p.messages], tokenize=True, add_generation_prompt=True, return_dict=True,
                                   return_tensors="pt", **kw)
    assert proc.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) == p.text
    assert render_chat(p.messages) == p.text and p.text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
    assert torch.equal(ref["input_ids"][0], p.input_ids)
    if images:
        assert torch.equal(ref["image_grid_thw"], p.image_grid_thw)
        assert torch.equal(ref["pixel_values"], p.pixel_values)
        assert p.text.count("<|image_pad|>") == len(images)
    else:
        assert p.pixel_values is None and "<|vision_start|>" not in p.text
    if caption:
        assert caption in p.text
    if choices:
        assert "A. " + choices[0] in p.text


def test_prompt_errors():
    with pytest.raises(PromptError, match="needs a caption"):
        encode_prompt("q", style="caption", images=[_img(0, 30, 30)])
    with pytest.raises(PromptError, match="needs at least one image"):
        encode_prompt("q", style="image")
    with pytest.raises(PromptError, match="unknown prompt style"):
        encode_prompt("q", style="captions")
    # Style text is text-only: an image passed anyway is dropped, not half-used.
    p = encode_prompt("q", style="text", images=[_img(0, 30, 30)])
    assert p.images == [] and p.pixel_values is None


def test_image_preprocessing_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    images = [_img(1, 50, 70), _img(2, 300, 200), _img(3, 17, 901), _img(4, 40, 40, "RGBA"), _img(5, 40, 60, "L"),
              _img(6, 224, 224), _img(7, 1001, 333)]
    pal = _img(8, 64, 48).convert("P")
    pal.info["transparency"] = 3
    images.append(pal)
    for lo, hi in [(3136, 1003520), (3136, 20_000), (100_000, 200_000)]:
        ref = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)(images=images, return_tensors="np")
        got = preprocess_images(images, lo, hi)
        assert np.array_equal(ref["image_grid_thw"], got.image_grid_thw)
        assert ref["pixel_values"].dtype == got.pixel_values.dtype == np.float32
        assert np.array_equal(ref["pixel_values"], got.pixel_values)  # bit-equal, not just close


def test_smart_resize_matches_and_bounds():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(x) for x in rng.integers(1, 5000, 2))
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(h, w, 28, 3136, 1003520)
            continue
        lo, hi = 3136, int(rng.integers(3136, 2_000_000))
        got = smart_resize(h, w, 28, lo, hi)
        assert got == ref(h, w, 28, lo, hi)
        assert got[0] % 28 == 0 and got[1] % 28 == 0
