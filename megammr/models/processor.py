"""Loading a Qwen2.5-VL processor (tokenizer + image processor + chat template) from an HF directory.

transformers 5.x's Qwen2_5_VLProcessor always builds its video processor, and that one needs
torchvision, which this project does not depend on (the CPU torch build here has no matching
torchvision). `load_processor` uses AutoProcessor when torchvision imports and otherwise an
image-only subclass: identical tokenisation, image preprocessing and chat template; videos are
refused with a clear error. Prompts, rollout and eval only use images.
"""
from __future__ import annotations

import importlib.util

# lazy in this module: transformers (~0.5 s of imports), when a processor is loaded. The engines,
# the trainer's setup and the warm-up import this module, and the recipe checks run before any
# processor is needed.


def _image_only_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor without the video processor (see the module docstring)."""

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kw):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if videos is not None:
                raise ValueError("video inputs need torchvision (transformers' Qwen2VLVideoProcessor); "
                                 "this processor was loaded without it")
            return super().__call__(images=images, text=text, **kwargs)

    return ImageOnlyQwen2_5_VLProcessor


def load_processor(path: str, **kwargs):
    """The processor of the HF checkpoint at `path` (AutoProcessor when torchvision is installed)."""
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(path, **kwargs)
    from transformers import AutoImageProcessor, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
    return _image_only_class()(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)


__all__ = ["load_processor"]
