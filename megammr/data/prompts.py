"""Prompt styles of the three phases, in Qwen2.5-VL's chat format.

    text     phase 1: the question alone (no image)
    caption  phase 2: the image(s), the caption, then the question (caption-augmented)
    image    phase 3: the image(s) and the question (caption-free)

A prompt is built once as chat messages (what HF processors and vLLM's chat API take), rendered
with Qwen2.5-VL's chat template (one <|image_pad|> per image: the form vLLM expands itself), and,
for the training forward pass, expanded to one <|image_pad|> per merged 2x2 patch and tokenised.
The expanded token layout equals transformers' Qwen2_5_VLProcessor on the same conversation
(tests/unit/test_data_prompts.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from megammr.config import DataConfig  # pixel limits: defaults live in the recipe schema only
from megammr.data.images import MERGE_SIZE, preprocess_images
from megammr.data.schema import choice_letter

STYLES = ("text", "caption", "image")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
DEFAULT_QWEN_SYSTEM = "You are a helpful assistant."

# The rule-based format reward checks exactly this shape (megammr.rewards.extract.format_ok;
# docs/ARCHITECTURE.md: strict <think>/<answer>).
SYSTEM_PROMPT = (
    "You are a helpful assistant. Solve the user's problem step by step. First reason about it "
    "inside <think> </think> tags, then give only the final answer inside <answer> </answer> tags, "
    "i.e. <think> reasoning process here </think><answer> final answer here </answer>."
)

class PromptError(ValueError):
    pass


def user_text(question: str, *, style: str, caption: Optional[str] = None,
              choices: Optional[Sequence[str]] = None) -> str:
    """The text part of the user turn."""
    parts = []
    if style == "caption":
        if not caption:
            raise PromptError("prompt style 'caption' needs a caption (phase 2 data)")
        parts.append(f"Image description: {caption.strip()}")
    parts.append(question.strip())
    if choices:
        opts = "\n".join(f"{choice_letter(i)}. {c.strip()}" for i, c in enumerate(choices))
        parts.append(f"Choices:\n{opts}\nAnswer with the letter of the correct choice.")
    return "\n\n".join(parts)


def build_messages(question: str, *, style: str, num_images: int = 0, caption: Optional[str] = None,
                   choices: Optional[Sequence[str]] = None, system_prompt: Optional[str] = None,
                   images: Optional[Sequence[Image.Image]] = None) -> list[dict]:
    """Chat messages: system, then the user turn with image entries first (Qwen's own examples
    put images before the text). `images`, when given, are attached to the entries for HF tools."""
    if style not in STYLES:
        raise PromptError(f"unknown prompt style {style!r}; expected one of {', '.join(STYLES)}")
    text = user_text(question, style=style, caption=caption, choices=choices)
    system = SYSTEM_PROMPT if system_prompt is None else system_prompt
    if style == "text":
        content: list[dict] = []
    else:
        n = len(images) if images is not None else num_images
        if n == 0:
            raise PromptError(f"prompt style {style!r} needs at least one image")
        content = [{"type": "image", **({"image": images[i]} if images is not None else {})} for i in range(n)]
    content.append({"type": "text", "text": text})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Qwen2.5-VL's chat template (megammr.models.tiny.QWEN2_5_VL_CHAT_TEMPLATE, images and text)
    in Python, so prompts need no tokenizer: one image placeholder per image."""
    out = []
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out.append(f"{IM_START}system\n{DEFAULT_QWEN_SYSTEM}{IM_END}\n")
        out.append(f"{IM_START}{m['role']}\n")
        c = m["content"]
        if isinstance(c, str):
            out.append(c)
        else:
            for item in c:
                if item.get("type") == "image" or "image" in item or "image_url" in item:
                    out.append(IMAGE_PLACEHOLDER)
                elif "text" in item:
                    out.append(item["text"])
        out.append(f"{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def expand_image_pads(text: str, tokens_per_image: Sequence[int]) -> str:
    """Replace the k-th <|image_pad|> by tokens_per_image[k] copies (what the model embeds)."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(tokens_per_image):
        raise PromptError(f"prompt has {len(pieces) - 1} image placeholders but {len(tokens_per_image)} images")
    out = [pieces[0]]
    for n, rest in zip(tokens_per_image, pieces[1:]):
        out.append(IMAGE_PAD * n)
        out.append(rest)
    return "".join(out)


@dataclass
class Prompt:
    """One encoded prompt, ready for a rollout engine (messages/text + images) and the trainer
    (input_ids + pixel_values + image_grid_thw)."""
    messages: list[dict]
    text: str                                   # rendered chat, one <|image_pad|> per image
    images: list[Image.Image] = field(default_factory=list)
    pixel_values: Optional[torch.Tensor] = None  # [patches, 1176] float32, None for text prompts
    image_grid_thw: Optional[torch.Tensor] = None  # [n_images, 3] int64
    input_ids: Optional[torch.Tensor] = None     # [tokens] int64, image pads expanded; None without tokenizer

    @property
    def num_tokens(self) -> Optional[int]:
        return None if self.input_ids is None else int(self.input_ids.numel())


def encode_prompt(question: str, *, style: str, images: Sequence[Image.Image] = (), caption: Optional[str] = None,
                  choices: Optional[Sequence[str]] = None, system_prompt: Optional[str] = None, tokenizer=None,
                  min_pixels: int = DataConfig.min_pixels, max_pixels: int = DataConfig.max_pixels,
                  merge_size: int = MERGE_SIZE) -> Prompt:
    """Build, render, preprocess images and (with a tokenizer) tokenise one prompt.

    Style 'text' drops any image: phase 1 is text-only by definition.
    """
    imgs = list(images) if style != "text" else []
    messages = build_messages(question, style=style, caption=caption, choices=choices,
                              system_prompt=system_prompt, images=imgs if imgs else None)
    text = render_chat(messages)
    p = Prompt(messages=messages, text=text, images=imgs)
    n_tokens: list[int] = []
    if imgs:
        ii = preprocess_images(imgs, min_pixels, max_pixels)
        p.pixel_values = torch.from_numpy(ii.pixel_values)
        p.image_grid_thw = torch.from_numpy(ii.image_grid_thw)
        n_tokens = ii.num_tokens(merge_size)
    if tokenizer is not None:
        ids = tokenizer(expand_image_pads(text, n_tokens), add_special_tokens=False)["input_ids"]
        p.input_ids = torch.tensor(np.asarray(ids, dtype=np.int64))
    return p
