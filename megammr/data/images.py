"""Qwen2.5-VL image preprocessing, numerically equal to transformers' Qwen2VLImageProcessorPil.

The vision tower sees 14x14 patches, two consecutive frames per temporal patch (a still image
is repeated), and merges 2x2 patches into one language token. So an image is resized to a
multiple of 28 (patch * merge) with its area between min_pixels and max_pixels, scaled to
[0, 1], normalised with CLIP's mean/std, and cut into rows of 3*2*14*14 = 1176 values in the
order the merger expects (2x2 neighbourhoods contiguous). The arithmetic below follows the
same dtype steps as transformers (float64 rescale, float32 normalise) so the output is equal,
not merely close; tests/unit/test_data_images.py checks it.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageInputs:
    pixel_values: np.ndarray   # [sum of grid_h*grid_w, 3 * temporal * patch * patch] float32
    image_grid_thw: np.ndarray  # [n_images, 3] int64: (t, h, w) in patches

    def num_tokens(self, merge_size: int = MERGE_SIZE) -> list[int]:
        """Language-model placeholder tokens per image (patches / merge^2)."""
        return [int(np.prod(g)) // (merge_size * merge_size) for g in self.image_grid_thw]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept
    (the pixel bounds are the recipe's data.min_pixels / data.max_pixels)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {width}x{height}: aspect ratio over 200 cannot be resized for Qwen2.5-VL")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (what transformers does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def preprocess_image(img: Image.Image, min_pixels: int, max_pixels: int, *, patch_size: int = PATCH_SIZE,
                     merge_size: int = MERGE_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE
                     ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (patches [grid_h*grid_w, 3*t*p*p] float32, (1, grid_h, grid_w))."""
    img = to_rgb(img)
    h, w = smart_resize(img.height, img.width, patch_size * merge_size, min_pixels, max_pixels)
    img = img.resize((w, h), resample=Image.BICUBIC)
    x = np.asarray(img).astype(np.float64) * (1 / 255)  # transformers rescales in float64 ...
    x = x.astype(np.float32)
    mean = np.array(CLIP_MEAN, dtype=np.float32)
    std = np.array(CLIP_STD, dtype=np.float32)
    x = (x - mean) / std                                  # ... and normalises in float32
    x = x.transpose(2, 0, 1)                              # CHW
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(3, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)                  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal_patch_size,) + x.shape[5:])
    patches = np.ascontiguousarray(x).reshape(gh * gw, 3 * temporal_patch_size * patch_size * patch_size)
    return patches, (1, gh, gw)


def preprocess_images(images: list[Image.Image], min_pixels: int, max_pixels: int, **kw) -> ImageInputs:
    if not images:
        return ImageInputs(np.zeros((0, 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE ** 2), np.float32),
                           np.zeros((0, 3), np.int64))
    out = [preprocess_image(im, min_pixels, max_pixels, **kw) for im in images]
    return ImageInputs(np.concatenate([p for p, _ in out]), np.array([g for _, g in out], dtype=np.int64))
