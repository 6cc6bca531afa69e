"""The phase data loader: energon over the shards of one curriculum phase.

    loader = PhaseDataLoader(recipe.data, seed=recipe.train.seed, dp_rank=r, dp_size=n, tokenizer=tok)
    batch = loader.next_batch(prompts_per_rank)       # list[DataSample], too-long prompts skipped (counted)
    ckpt["data"] = loader.state_dict()                # plain dict (bytes inside), torch.save-able
    loader.load_state_dict(ckpt["data"])               # before the first next_batch of a resumed run

Why energon and not plain webdataset: energon keeps a savable state per worker (shard
positions, shuffle buffers, RNG), so a restored loader yields exactly the samples an
uninterrupted one would; it splits shards across data-parallel ranks and workers without
overlap; and it blends datasets by weight (MetadatasetV2). Samples are read crude (raw bytes,
no energon decoding) and decoded here, so images are decoded once, by PIL, into the Qwen2.5-VL
preprocessing of megammr.data.images, inside the worker processes.

Any exception in a worker stops the run (reraise_exception): the shards were validated when
built, so a failure here is a bug or a corrupt file, never something to skip silently.
"""
from __future__ import annotations

import collections
import gc
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from megatron.energon import (Cooker, DefaultTaskEncoder, Sample, WorkerConfig, basic_sample_keys, get_savable_loader,
                              get_train_dataset, stateless)
from megatron.energon.edataclass import edataclass
from megatron.energon.errors import reraise_exception

from megammr.data.images import decode_image
from megammr.data.prompts import Prompt, encode_prompt
from megammr.data.shards import read_manifest

STATE_VERSION = 1
# Prompt style -> the build phases whose shards it can read (phase 3 shards carry no caption).
STYLE_PHASES = {"text": (1,), "caption": (2,), "image": (2, 3)}


class DataStateError(RuntimeError):
    """A saved loader state that does not fit this loader (different workers, ranks, datasets...)."""


class DataConfigError(ValueError):
    pass


@dataclass
class DataSample:
    """One prompt with everything the rollout engine, the rewards and the trainer need."""
    key: str                   # energon sample key, "<shard>/<sequence number>": where it came from
    id: str
    source: str
    phase: int
    question: str
    answer: str
    prompt: Prompt
    caption: Optional[str] = None
    choices: Optional[list[str]] = None
    extra: dict = field(default_factory=dict)


@edataclass
class RawSample(Sample):
    """A shard sample as stored: the parsed JSON part and the image parts' bytes."""
    meta: dict
    images: list


@stateless
def _cook(raw: dict) -> RawSample:
    """Crude webdataset sample (raw bytes per part) -> RawSample; runs in the workers."""
    meta = json.loads(raw["json"])
    return RawSample(**basic_sample_keys(raw), meta=meta, images=[raw[name] for name in meta["images"]])


class PhaseTaskEncoder(DefaultTaskEncoder):
    """Crude sample -> DataSample: decode images, preprocess, render (and tokenise) the prompt."""
    cookers = [Cooker(_cook)]
    decoder = None  # crude: bytes in, decoded once by PIL below

    def __init__(self, style: str, system_prompt: Optional[str], tokenizer, min_pixels: int, max_pixels: int):
        super().__init__()
        self.style, self.system_prompt, self.tokenizer = style, system_prompt, tokenizer
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    @stateless
    def encode_sample(self, s: RawSample) -> DataSample:
        m = s.meta
        images = [decode_image(b) for b in s.images] if self.style != "text" else []
        prompt = encode_prompt(m["question"], style=self.style, images=images, caption=m.get("caption"),
                               choices=m.get("choices"), system_prompt=self.system_prompt,
                               tokenizer=self.tokenizer, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return DataSample(key=s.__key__, id=m["id"], source=m["source"], phase=m["phase"],
                          question=m["question"], answer=m["answer"], prompt=prompt,
                          caption=m.get("caption"), choices=m.get("choices"), extra=m.get("extra", {}))


def check_datasets(cfg) -> list[dict]:
    """Every dataset exists, is built, and fits the prompt style; return their manifests."""
    if not cfg.datasets:
        raise DataConfigError("data.datasets is empty: give at least one shard directory "
                              "(tools/build_shards.py or tools/make_synthetic_data.py writes them)")
    manifests = []
    for i, d in enumerate(cfg.datasets):
        try:
            man = read_manifest(d.path)
        except FileNotFoundError as e:
            raise DataConfigError(f"data.datasets[{i}].path: {e}") from None
        ok = STYLE_PHASES[cfg.prompt_style]
        if man["phase"] not in ok:
            raise DataConfigError(
                f"data.datasets[{i}].path {d.path}: built as phase {man['phase']} data, which prompt_style "
                f"{cfg.prompt_style!r} cannot use (it reads phase {' or '.join(map(str, ok))} shards)")
        manifests.append(man)
    return manifests


def _blend_yaml(cfg, directory: str) -> str:
    """A MetadatasetV2 blending the datasets by weight (energon only takes a blend from a file)."""
    lines = ["__module__: megatron.energon", "__class__: MetadatasetV2", "splits:", "  train:", "    blend:"]
    for d in cfg.datasets:
        lines += [f"      - weight: {float(d.weight)!r}", f"        path: {json.dumps(os.path.abspath(d.path))}"]
    path = os.path.join(directory, "blend.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class PhaseDataLoader:
    """Samples of one phase for one data-parallel rank; see the module docstring."""

    def __init__(self, cfg, *, seed: int, dp_rank: int = 0, dp_size: int = 1, tokenizer=None,
                 repeat: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise DataConfigError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        self.cfg, self.seed, self.dp_rank, self.dp_size, self.repeat = cfg, seed, dp_rank, dp_size, repeat
        self.manifests = check_datasets(cfg)
        self.skipped: collections.Counter = collections.Counter()
        self.tokenizer = tokenizer
        self._tmp = None
        self._loader = None
        self._it: Optional[Iterator] = None
        self._build()

    def _build(self):
        cfg = self.cfg
        if len(cfg.datasets) == 1:
            path = os.path.abspath(cfg.datasets[0].path)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="megammr-blend-")
            path = _blend_yaml(cfg, self._tmp.name)
        wc = WorkerConfig(rank=self.dp_rank, world_size=self.dp_size, num_workers=cfg.num_workers,
                          seed_offset=self.seed, global_error_handler=reraise_exception)
        enc = PhaseTaskEncoder(cfg.prompt_style, cfg.system_prompt, self.tokenizer, cfg.min_pixels, cfg.max_pixels)
        ds = get_train_dataset(path, worker_config=wc, batch_size=None, shuffle_buffer_size=cfg.shuffle_buffer_size,
                               max_samples_per_sequence=cfg.max_samples_per_sequence, task_encoder=enc,
                               repeat=self.repeat)
        self._loader = get_savable_loader(ds)
        if not torch.cuda.is_available():
            self._loader.pin_memory = False  # energon asks for pinned memory; without a GPU torch warns

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[DataSample]:
        if self._it is None:
            self._it = iter(self._loader)
        limit = self.cfg.max_prompt_tokens
        for s in self._it:
            n = s.prompt.num_tokens
            if n is not None and n > limit:
                self.skipped["too_long"] += 1
                continue
            yield s

    def next_batch(self, n: int) -> list[DataSample]:
        """The next n usable samples; fewer only when a non-repeating loader is exhausted."""
        out = []
        it = iter(self)
        for s in it:
            out.append(s)
            if len(out) == n:
                break
        return out

    def close(self):
        """Stop the worker processes now (call it, or use `with`, when done with a loader): left to
        the garbage collector, torch may wait out a 5 s timeout per worker before it kills them."""
        if self._it is not None:
            self._it.close()
            self._it = None
            # torch's worker iterator sits in a reference cycle inside energon; collected now, it
            # stops its workers at once; collected later, workers may already be blocked writing
            # prefetched samples and each costs that 5 s timeout.
            gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down modules
            pass

    # ------------------------------------------------------------------ state
    def _identity(self) -> dict:
        return {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "num_workers": self.cfg.num_workers,
                "seed": self.seed, "datasets": [[os.path.abspath(d.path), float(d.weight)] for d in self.cfg.datasets],
                "shuffle_buffer_size": self.cfg.shuffle_buffer_size,
                "max_samples_per_sequence": self.cfg.max_samples_per_sequence}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here: plain types, energon's state pickled to bytes."""
        return {"version": STATE_VERSION, **self._identity(), "skipped": dict(self.skipped),
                "energon": pickle.dumps(self._loader.save_state_rank())}

    def load_state_dict(self, state: dict):
        """Continue from a state_dict(); must be called before iterating."""
        if self._it is not None:
            raise DataStateError("load_state_dict must be called before the loader is iterated")
        if state.get("version") != STATE_VERSION:
            raise DataStateError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self._identity()
        diffs = []
        for k, v in mine.items():
            saved = state.get(k)
            if k == "datasets":
                saved = [[p, float(w)] for p, w in (saved or [])]
                # A moved data directory is fine if the directory names and weights agree.
                same = len(saved) == len(v) and all(os.path.basename(a[0]) == os.path.basename(b[0]) and a[1] == b[1]
                                                    for a, b in zip(saved, v))
            else:
                same = saved == v
            if not same:
                diffs.append(f"{k}: saved {saved!r}, now {v!r}")
        if diffs:
            raise DataStateError(
                "the saved data-loader state does not fit this loader (energon's state is per rank and per "
                "worker, over the same datasets): " + "; ".join(diffs) +
                ". Resume with the same data.num_workers, data-parallel size, seed and data.datasets.")
        try:
            self._loader.restore_state_rank(pickle.loads(state["energon"]))
        except AssertionError as e:
            raise DataStateError(f"energon refused the saved loader state ({e or 'assertion failed'}); it was "
                                 f"saved by a loader configured differently: {mine}") from e
        self.skipped = collections.Counter(state.get("skipped", {}))
