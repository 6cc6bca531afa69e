"""Weight sync: this model-parallel group's Megatron weights -> its rollout engine, under HF names.

The engine lives on the group's source rank (tensor rank 0 of the first pipeline stage; see
megammr.train.experience). For every tensor group of megammr.models.mapping, in one fixed
order that every rank derives from the backbone alone:
  1. the pipeline stage that owns it all-gathers the tensor-parallel slices (TP group),
  2. tensor rank 0 of that stage converts the global tensor to HF tensors (mapping, no arithmetic),
  3. HF tensors are collected into buckets of at most `bucket_mb`; a full bucket goes to the
     engine directly (first stage) or is broadcast over the pipeline group of tensor rank 0
     (later stages) and loaded by the source rank.
No rank ever holds more than one bucket plus one global tensor in flight, so memory stays bounded
whatever the model size. Every data-parallel replica syncs its own engine in parallel.

A colocated vLLM engine lives on every tensor rank of the first stage (its TP group is Megatron's);
each of those ranks then converts the gathered tensors itself and loads the same buckets in
lockstep (vLLM slices its own shard). The target is a WeightTarget (megammr.rollout.base): its
begin_weight_update / finish_weight_update are called around the buckets. Each sync's timings and counts on this rank: SyncTimes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors.torch import save_file

from megammr import runtime
from megammr.models.mapping import (DEC, LAYER_KEYS, LM, LOCAL_ALIASES, TP_DIM, global_layer_to_hf,
                                    global_nonlayer_keys)
from megammr.rollout.base import WeightTarget


def _owner_stage(key: str, layer: Optional[int], num_layers: int, pp: int) -> int:
    if layer is not None:
        return layer // (num_layers // pp)
    if key.startswith("vision_model.") or key == LM + "embedding.word_embeddings.weight":
        return 0
    return pp - 1  # final norm, untied output layer


def tensor_order(bb, layer_suffixes=None) -> list[tuple[str, Optional[int], str]]:
    """(local-name suffix, global layer or None, mapping key) for every tensor, in sync order.

    `layer_suffixes`: the names inside one decoder layer of the model at hand. The local spec keeps
    the norms as separate modules (input_layernorm.weight); TE's fused LayerNormLinear holds them
    under the mapping's own names (self_attention.linear_qkv.layer_norm_weight), so the local name
    is whichever of the two the model has (local spec when not given)."""
    out = [(key, None, key) for key in global_nonlayer_keys(bb)]
    inverse = {v: k for k, v in LOCAL_ALIASES.items()}
    for layer in range(bb.num_layers):
        for key in LAYER_KEYS:
            local = inverse.get(key, key)
            if layer_suffixes is not None and local not in layer_suffixes:
                if key not in layer_suffixes:
                    raise KeyError(f"weight sync: a decoder layer has neither {local} nor {key} "
                                   f"(its tensors: {sorted(layer_suffixes)})")
                local = key
            out.append((local, layer, key))
    return out


def _tp_gather(t: torch.Tensor, key: str, group, size: int) -> torch.Tensor:
    """Inverse of mapping.tp_slice: the global tensor from every rank's slice."""
    dim = TP_DIM.get(key) if key in TP_DIM else (0 if key in (LM + "embedding.word_embeddings.weight",
                                                                LM + "output_layer.weight") else None)
    if size == 1 or dim is None:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    if key == "mlp.linear_fc1.weight":  # each rank holds [gate_r; up_r]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


@dataclass
class SyncTimes:
    """One sync on this rank: seconds in all and per part, and tensor counts."""
    total_s: float = 0.0
    tensors_loaded: int = 0   # into this rank's engine
    tensors_sent: int = 0     # broadcast from this pipeline stage to the first one
    gather_s: float = 0.0     # TP all-gathers
    convert_s: float = 0.0    # Megatron -> HF tensors
    transfer_s: float = 0.0   # pipeline broadcasts (a receiver's wait for the owner included)
    load_s: float = 0.0       # the engine's update_weights and finish_weight_update


class WeightSync:
    """Streams the Megatron model (unwrapped Qwen25VLModel) into `engine`, a WeightTarget (on the
    ranks that hold one, None elsewhere)."""

    def __init__(self, model, engine: Optional[WeightTarget], bucket_mb: int):
        if engine is not None and not isinstance(engine, WeightTarget):
            raise TypeError(f"WeightSync: {type(engine).__name__} is not a megammr.rollout.base.WeightTarget")
        self.model, self.engine = model, engine
        self.bb = model.backbone
        self.bucket_bytes = int(bucket_mb) << 20
        self.tp_group, self.tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_group, self.pp = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()
        self.stage = ps.get_pipeline_model_parallel_rank()
        self.pp_ranks = dist.get_process_group_ranks(self.pp_group) if self.pp > 1 else [dist.get_rank()]
        layers = model.language_model.decoder.layers
        self.offset = (layers[0].layer_number - 1) if len(layers) else 0
        first = f"{DEC}0."
        suffixes = {k[len(first):] for k in model.state_dict(keep_vars=True) if k.startswith(first)} or None
        self.order = tensor_order(self.bb, suffixes)
        self.timings = SyncTimes()  # of the last sync
        self._clock = SyncTimes()

    def _local(self, suffix: str, layer: Optional[int]) -> torch.Tensor:
        sd = self._sd
        name = f"{DEC}{layer - self.offset}.{suffix}" if layer is not None else suffix
        return sd[name].detach()

    def _my_hf_tensors(self, stage: int) -> Iterator[tuple[str, torch.Tensor]]:
        """HF tensors owned by `stage` (this rank's stage): TP-gathered on every tensor rank of the
        stage (a collective), converted and yielded on tensor rank 0 only."""
        converts = self.tp_rank == 0 or (self.engine is not None and stage == 0)
        for suffix, layer, key in self.order:
            if _owner_stage(key, layer, self.bb.num_layers, self.pp) != stage:
                continue
            t0 = time.perf_counter()
            full = _tp_gather(self._local(suffix, layer), key, self.tp_group, self.tp)
            t1 = time.perf_counter()
            self._clock.gather_s += t1 - t0
            if not converts:
                continue
            if layer is None:
                out = {global_nonlayer_keys(self.bb)[key]: full}
            else:
                out = global_layer_to_hf(full, self.bb, layer, key)
            self._clock.convert_s += time.perf_counter() - t1
            yield from out.items()

    def _buckets(self, stage: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        bucket, size = [], 0
        for name, t in self._my_hf_tensors(stage):
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    @torch.no_grad()
    def sync(self) -> SyncTimes:
        """Push the current weights; returns this rank's timings and counts (also kept as .timings)."""
        t0 = time.perf_counter()
        self._sd = self.model.state_dict(keep_vars=True)
        self._clock = SyncTimes()
        loaded, sent = 0, 0
        if self.engine is not None:
            self.engine.begin_weight_update()
        if self.stage == 0:
            for bucket in self._buckets(0):
                if self.engine is not None:
                    loaded += self._load(bucket)
        elif self.tp_rank != 0:
            for _ in self._buckets(self.stage):  # the TP all-gathers are collective: take part
                pass
        if self.pp > 1 and self.tp_rank == 0:
            for stage in range(1, self.pp):
                src = self.pp_ranks[stage]
                mine = self._buckets(stage) if stage == self.stage else None
                while True:
                    loaded_now, sent_now = self._transfer(mine, src)
                    if loaded_now is None:
                        break
                    loaded += loaded_now
                    sent += sent_now
        self._sd = None
        if self.engine is not None:
            t1 = time.perf_counter()
            self.engine.finish_weight_update()
            self._clock.load_s += time.perf_counter() - t1
        c = self._clock
        c.total_s, c.tensors_loaded, c.tensors_sent = time.perf_counter() - t0, loaded, sent
        self.timings = c
        return self.timings

    def _load(self, bucket) -> int:
        t0 = time.perf_counter()
        n = self.engine.update_weights(bucket) or len(bucket)
        self._clock.load_s += time.perf_counter() - t0
        return n

    def _transfer(self, mine, src: int):
        """One bucket from pipeline stage `src` over the pipeline group: (loaded, sent), None when done."""
        if mine is not None:
            bucket = next(mine, None)
            meta = None if bucket is None else [(n, tuple(t.shape), t.dtype) for n, t in bucket]
            box = [meta]
        else:
            box = [None]
        t0 = time.perf_counter()  # a receiver also waits here for the owning stage's gather and convert
        dist.broadcast_object_list(box, src=src, group=self.pp_group)
        meta = box[0]
        if meta is None:
            self._clock.transfer_s += time.perf_counter() - t0
            return None, 0
        dtype = meta[0][2]
        numel = sum(int(torch.Size(s).numel()) for _, s, _ in meta)
        dev = runtime.device()
        if mine is not None:
            flat = torch.cat([t.reshape(-1).to(dtype) for _, t in bucket]).to(dev)
        else:
            flat = torch.empty(numel, dtype=dtype, device=dev)
        dist.broadcast(flat, src=src, group=self.pp_group)
        self._clock.transfer_s += time.perf_counter() - t0
        if mine is not None or self.engine is None:
            return 0, (len(meta) if mine is not None else 0)
        tensors, off = [], 0
        for name, shape, _ in meta:
            n = int(torch.Size(shape).numel())
            tensors.append((name, flat[off:off + n].view(shape)))
            off += n
        return self._load(tensors), 0



class SafetensorsWriter(WeightTarget):
    """A weight-sync target that writes each bucket as one safetensors shard (HF checkpoint names)
    plus model.safetensors.index.json: the HF export of a phase, never the whole model in memory."""

    def __init__(self, out_dir: str):
        self.out_dir, self.shards, self.weight_map = out_dir, 0, {}
        os.makedirs(out_dir, exist_ok=True)

    def update_weights(self, named) -> int:
        self.shards += 1
        fname = f"model-{self.shards:05d}.safetensors"
        save_file({n: t.detach().contiguous().cpu() for n, t in named}, os.path.join(self.out_dir, fname),
                  metadata={"format": "pt"})
        for n, _ in named:
            self.weight_map[n] = fname
        return len(named)

    def finish(self) -> None:
        # Shard names are only known once all are written: rename to the HF -of- pattern.
        total = self.shards
        renames = {f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)}
        for old, new in renames.items():
            os.replace(os.path.join(self.out_dir, old), os.path.join(self.out_dir, new))
        index = {"metadata": {}, "weight_map": {n: renames[f] for n, f in sorted(self.weight_map.items())}}
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)


HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                 "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                 "chat_template.jinja", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def export_hf(model, src_hf_dir: str, out_dir: str, bucket_mb: int) -> Optional[str]:
    """Write the current weights of data-parallel replica 0 in HF layout to out_dir (atomically:
    out_dir.tmp, then renamed); config, tokenizer and processor files are copied from src_hf_dir.
    Every rank calls it; returns out_dir on global rank 0."""
    if ps.get_data_parallel_rank() != 0:
        return None
    rank0 = runtime.is_rank0()
    tmp = out_dir.rstrip("/") + ".tmp"
    writer = None
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        writer = SafetensorsWriter(tmp)
    WeightSync(model, writer, bucket_mb).sync()
    if not rank0:
        return None
    writer.finish()
    for name in HF_SIDE_FILES:
        if os.path.exists(os.path.join(src_hf_dir, name)):
            shutil.copy2(os.path.join(src_hf_dir, name), os.path.join(tmp, name))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
