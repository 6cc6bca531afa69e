"""Random tiny Qwen2.5-VL checkpoints in the published HF layout, deterministic by seed.

`write_tiny_model(out_dir, seed=0, tie_word_embeddings=True)` writes what a Qwen/Qwen2.5-VL-*-Instruct
repository holds, at toy size: config.json (the flat hub format: text fields at the top level,
`rope_scaling.mrope_section`, nested `vision_config`), model.safetensors (checkpoint key names
`model.layers.*`, `visual.*`, `lm_head.weight`), a byte-level BPE tokenizer built here with the
`tokenizers` library (Qwen's pre-tokenizer regex, Qwen's 22 special tokens in Qwen's order right
after the learned vocabulary), the Qwen2.5-VL chat template, preprocessor_config.json and
generation_config.json. transformers' AutoProcessor / Qwen2_5_VLProcessor and
Qwen2_5_VLForConditionalGeneration.from_pretrained load the directory.

Why weights are drawn per tensor here instead of by the HF model's own initialiser: the result must
not change with the transformers version, and the same writer streams a ~1 GB model (benchmarks)
without ever holding it whole. Scales are chosen so logits are O(1): parity tests on near-zero
activations would prove nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from typing import Iterator, Optional

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from megammr.models.mapping import hf_param_shapes

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/2.5 model).
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5-VL's added tokens in published order (151643..151664 in the real vocabulary).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# Only these are "special" (skipped on decode) in Qwen's tokenizer_config; the rest are plain added tokens.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}

# The chat template of Qwen2.5-VL-*-Instruct (chat_template.json): a default system turn, images and
# videos as <|vision_start|><|image_pad|><|vision_end|>, optional "Picture N:" labels.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tiny BPE learns its merges from: the words prompts and answers of this project use.
_CORPUS = """
You are a helpful assistant. A conversation between User and Assistant. The user asks a question,
and the Assistant solves it. The assistant first thinks about the reasoning process in the mind and
then provides the user with the answer. The reasoning process and answer are enclosed within
<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here
</think> <answer> answer here </answer>. Please reason step by step, and put your final answer
within \\boxed{}. Question: What is the value of x in the figure? Find the area of the triangle.
The image shows a circle with radius 3 and a square with side length 4. Choices: (A) 12 (B) 16
(C) 18 (D) 24. Let the length of the side be a, then the perimeter is 4a and the area is a^2.
Therefore the answer is \\frac{1}{2} \\times 6 \\times 8 = 24. Solve the equation 2x + 3 = 11,
so x = 4. The angle ABC is 60 degrees; the sum of the angles of a triangle is 180 degrees.
Hint: Please answer the question and provide the correct option letter at the end.
The function f(x) = x^2 - 5x + 6 has roots 2 and 3. The probability that the number is even is 1/2.
"""

# Architecture of the `tiny` backbone (mirrors megammr.backbones "tiny"). Sizes divide by
# TP=2 (heads, query groups, vocabulary, FFN) and the 4 decoder layers split over PP=2.
TINY_TEXT = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, mrope_section=[2, 3, 3])
TINY_VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3,
                   patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                   fullatt_block_indexes=[1, 3], tokens_per_second=2, hidden_act="silu")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/Qwen byte-level alphabet: every byte maps to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_bpe(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on byte-level words; ties broken by the pair itself so the result is deterministic."""
    counts = Counter(words)
    seqs = {w: list(w) for w in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, c in counts.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best[1] < 2:
            break
        a, b = best[0]
        merges.append((a, b))
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def build_tokenizer(n_merges: int = 400):
    """A byte-level BPE `tokenizers.Tokenizer` with Qwen2's normaliser, pre-tokenizer and decoder."""
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    words = [w for w, _ in pre.pre_tokenize_str(_CORPUS)]
    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    merges = _learn_bpe(words, n_merges)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=t not in _NOT_SPECIAL, normalized=False)
                            for t in QWEN_SPECIAL_TOKENS])
    return tok


def hub_config(tok_ids: dict[str, int], tie_word_embeddings: bool, text: Optional[dict] = None,
               vision: Optional[dict] = None) -> dict:
    """config.json in the layout of the published Qwen2.5-VL repositories (flat text fields)."""
    t = dict(TINY_TEXT, **(text or {}))
    v = dict(TINY_VISION, **(vision or {}))
    v["out_hidden_size"] = t["hidden_size"]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": tok_ids["<|endoftext|>"],
        "eos_token_id": tok_ids["<|im_end|>"],
        "pad_token_id": tok_ids["<|endoftext|>"],
        "vision_start_token_id": tok_ids["<|vision_start|>"],
        "vision_end_token_id": tok_ids["<|vision_end|>"],
        "vision_token_id": tok_ids["<|vision_pad|>"],
        "image_token_id": tok_ids["<|image_pad|>"],
        "video_token_id": tok_ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": t["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": t["intermediate_size"],
        "max_position_embeddings": t["max_position_embeddings"],
        "max_window_layers": t["num_hidden_layers"],
        "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": t["rms_norm_eps"],
        "rope_theta": t["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": list(t["mrope_section"])},
        "sliding_window": t["max_position_embeddings"],
        "use_sliding_window": False,
        "tie_word_embeddings": bool(tie_word_embeddings),
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": t["vocab_size"],
        "vision_config": {"model_type": "qwen2_5_vl", **v},
    }


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Deterministic in (seed, name): norms near 1, biases small, matrices ~ N(0, 1/fan_in)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)
    g = torch.Generator().manual_seed(h)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) == 1:
        x = (1.0 + 0.1 * x) if ("norm" in name or "ln_q" in name) else 0.1 * x
    elif "embed_tokens" in name:
        x = x / shape[1] ** 0.5  # rows of norm ~1: O(1) logits when tied to the output layer
    else:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        x = x / fan_in ** 0.5
    return x.to(dtype)


def iter_random_weights(cfg: dict, seed: int, dtype=torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in hf_param_shapes(cfg).items():
        yield name, random_tensor(name, shape, seed, dtype)


def _write_tokenizer_files(out_dir: str, tok, model_max_length: int) -> dict[str, int]:
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS}
    # vocab.json + merges.txt as published (slow-tokenizer files), from the same model.
    tj = json.load(open(os.path.join(out_dir, "tokenizer.json"), encoding="utf-8"))
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tj["model"]["vocab"], f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in tj["model"]["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    added = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": t not in _NOT_SPECIAL} for t in QWEN_SPECIAL_TOKENS}
    tcfg = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS[1:] if t not in _NOT_SPECIAL],
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": model_max_length, "tokenizer_class": "Qwen2Tokenizer",
        "processor_class": "Qwen2_5_VLProcessor", "chat_template": QWEN2_5_VL_CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
    return ids


# The published Qwen2.5-VL repositories' preprocessor_config.json pixel bounds (the processor's own;
# training and rollout use the recipe's data.min_pixels / data.max_pixels instead).
PUBLISHED_MIN_PIXELS, PUBLISHED_MAX_PIXELS = 3136, 12845056


def write_processor_files(out_dir: str, patch_size: int = 14, temporal_patch_size: int = 2,
                          merge_size: int = 2) -> None:
    """preprocessor_config.json + chat_template.json as in the published Qwen2.5-VL repositories."""
    pre = {
        "min_pixels": PUBLISHED_MIN_PIXELS, "max_pixels": PUBLISHED_MAX_PIXELS, "patch_size": patch_size,
        "temporal_patch_size": temporal_patch_size, "merge_size": merge_size,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)
    with open(os.path.join(out_dir, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}, f, indent=2)


def write_tiny_model(out_dir: str, seed: int = 0, tie_word_embeddings: bool = True,
                     text: Optional[dict] = None, vision: Optional[dict] = None,
                     dtype: torch.dtype = torch.float32, max_shard_bytes: Optional[int] = None) -> str:
    """Write a random Qwen2.5-VL in HF format to `out_dir`; same seed and sizes give identical files.

    `text` / `vision` override entries of TINY_TEXT / TINY_VISION (the benchmark model is built this
    way). With `max_shard_bytes` the weights are split into model-0000k-of-0000n.safetensors shards
    with a model.safetensors.index.json, like the published repositories.
    """
    os.makedirs(out_dir, exist_ok=True)
    # Weights of an earlier write (other sharding) would shadow these: readers prefer an index.
    for name in os.listdir(out_dir):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, name))
    tok = build_tokenizer()
    ids = _write_tokenizer_files(out_dir, tok, model_max_length=int((text or {}).get(
        "max_position_embeddings", TINY_TEXT["max_position_embeddings"])))
    cfg = hub_config(ids, tie_word_embeddings, text, vision)
    cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    if max(ids.values()) >= cfg["vocab_size"]:
        raise ValueError(f"vocab_size {cfg['vocab_size']} is smaller than the tokenizer ({max(ids.values()) + 1})")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"]}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    v = cfg["vision_config"]
    write_processor_files(out_dir, patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
                          merge_size=v["spatial_merge_size"])

    # Stream: one shard's tensors in memory at a time.
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(dict(iter_random_weights(cfg, seed, dtype)), os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return out_dir
    shapes = hf_param_shapes(cfg)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: random_tensor(n, shapes[n], seed, dtype) for n in names}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        del shard
        weight_map.update({n: fname for n in names})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out_dir


__all__ = ["QWEN_SPECIAL_TOKENS", "QWEN2_5_VL_CHAT_TEMPLATE", "TINY_TEXT", "TINY_VISION", "build_tokenizer",
           "hub_config", "iter_random_weights", "random_tensor", "write_processor_files",
           "write_tiny_model"]
