"""Streaming checkpoint conversion: HF safetensors <-> megatron-core torch_dist, for Qwen2.5-VL.

hf-to-mcore writes the torch_dist layout megatron-core's `dist_checkpointing.save` writes for
Qwen25VLModel.sharded_state_dict() (keys, stacked layer axis, one chunk per layer), so it loads at
any TP/PP. It goes through torch.distributed.checkpoint with a planner whose `resolve_data` builds
each chunk only when the writer asks for it, and one file per chunk, so the writer never holds more
than one tensor group (one layer's QKV, one embedding, ...) in memory. mcore-to-hf reads chunk by
chunk through the checkpoint's own metadata (whatever TP/PP layout wrote it) and writes HF
safetensors shards of at most `max_shard_bytes`. Tensors are moved, never recomputed: a round trip
is bit-exact.

The HF config, tokenizer and processor files travel inside the checkpoint (`hf/` folder) so
mcore-to-hf can write a directory that `from_pretrained` loads.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, ReadItem, SavePlan, TensorWriteData,
                                                  WriteItem, WriteItemType)

from megammr.backbones import Backbone
from megammr.models.checkpoint_io import CheckpointError
from megammr.models.mapping import (DEC, LAYER_KEYS, LM, HFReader, global_nonlayer_keys, hf_layer_to_global,
                                    hf_shapes, iter_hf_from_global)

HF_META_DIR = "hf"
_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def copy_hf_meta(src_dir: str, dst_dir: str) -> None:
    """Copy config, tokenizer, processor and generation files (everything that is not weights)."""
    os.makedirs(dst_dir, exist_ok=True)
    for name in sorted(os.listdir(src_dir)):
        p = os.path.join(src_dir, name)
        if os.path.isfile(p) and not name.endswith(_WEIGHT_FILES) and name != "model.safetensors.index.json":
            shutil.copy2(p, os.path.join(dst_dir, name))


# ----------------------------------------------------------------------------- HF -> mcore
def _plan_items(bb: Backbone, reader: HFReader):
    """(WriteItem, producer) for every chunk of the checkpoint, producers lazy."""
    items: list[tuple[WriteItem, Callable]] = []

    def tensor_item(key, gshape, offsets, sizes, dtype, producer):
        idx = MetadataIndex(key, torch.Size(offsets))
        wd = TensorWriteData(chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                             properties=TensorProperties(dtype=dtype), size=torch.Size(gshape))
        items.append((WriteItem(index=idx, type=WriteItemType.SHARD, tensor_data=wd), producer))

    shapes = reader.expected
    for key, hf in global_nonlayer_keys(bb).items():
        dt = _dtype(reader, hf)
        tensor_item(key, shapes[hf], [0] * len(shapes[hf]), shapes[hf], dt, lambda hf=hf: reader.get(hf).contiguous())
    L = bb.num_layers
    for short, hf_parts in LAYER_KEYS.items():
        key = DEC + short
        probe = {n: shapes[f"model.layers.0.{n}"] for n in hf_parts}
        rows = sum(s[0] for s in probe.values())
        shape = (rows, *next(iter(probe.values()))[1:])
        dt = _dtype(reader, f"model.layers.0.{hf_parts[0]}")
        for layer in range(L):
            tensor_item(key, (L, *shape), (layer,) + (0,) * len(shape), (1, *shape), dt,
                        lambda layer=layer, short=short: hf_layer_to_global(reader.get, bb, layer, short)[None].contiguous())
    # megatron writes an (empty) extra state object per linear layer; write the same so that a plain
    # dist_checkpointing.load of Qwen25VLModel.sharded_state_dict() finds every key.
    for mod in _EXTRA_STATE_MODULES:
        for layer in range(L):
            key = f"{DEC}{mod}._extra_state/shard_{layer}_{L}"
            items.append((WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO), _none_bytes))
    return items


def _dtype(reader: HFReader, name: str) -> torch.dtype:
    st = reader.dtype(name)
    dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(st)
    if dt is None:
        raise CheckpointError(f"{reader.path}/{reader.files[name]}: tensor {name} has dtype {st}; only F32, BF16 "
                              "and F16 are supported")
    return dt


def _none_bytes():
    buf = io.BytesIO()
    torch.save([None], buf)  # megatron stores a list of the objects of one key (here: no TE state)
    buf.seek(0)
    return buf


def hf_to_mcore(hf_dir: str, out_dir: str) -> dict:
    """Convert an HF Qwen2.5-VL directory into a torch_dist checkpoint at `out_dir` (single process)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"--out {out_dir} exists and is not a directory")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not empty")
    reader = HFReader(hf_dir)
    reader.validate()  # shape errors before anything is written
    bb = reader.backbone
    items = _plan_items(bb, reader)
    producers = {(w.index.fqn, w.index.offset): p for w, p in items}

    class LazyPlanner(DefaultSavePlanner):
        def create_local_plan(self):
            self.plan = SavePlan([w for w, _ in items])
            return self.plan

        def resolve_data(self, write_item):
            return producers[(write_item.index.fqn, write_item.index.offset)]()

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        # one file per chunk: the writer keeps a reference to every tensor of a file until it is closed
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=False, thread_count=1, sync_files=True)
        dcp.save({}, storage_writer=writer,
                 planner=LazyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)
        torch.save({}, os.path.join(tmp, "common.pt"))
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                       "common_backend": "torch", "common_backend_version": 1}, f)
        copy_hf_meta(hf_dir, os.path.join(tmp, HF_META_DIR))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves nothing behind
        raise
    if os.path.exists(out_dir):
        os.rmdir(out_dir)
    os.rename(tmp, out_dir)
    return {"tensors": len([1 for w, _ in items if w.tensor_data is not None]), "backbone": bb.name}


# ----------------------------------------------------------------------------- mcore -> HF
class McoreReader:
    """Reads global tensors (or one layer of a stacked tensor) from a torch_dist checkpoint, any layout."""

    def __init__(self, ckpt_dir: str):
        if not os.path.isdir(ckpt_dir):
            raise CheckpointError(f"{ckpt_dir}: not a directory" if os.path.exists(ckpt_dir)
                                  else f"{ckpt_dir}: no such directory")
        if not os.path.exists(os.path.join(ckpt_dir, ".metadata")):
            raise CheckpointError(f"{ckpt_dir}: not a torch_dist checkpoint (no .metadata)")
        self.dir = ckpt_dir
        self.fs = FileSystemReader(ckpt_dir)
        self.md = self.fs.read_metadata()
        self.fs.set_up_storage_reader(self.md, True)

    def get(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        meta = self.md.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise CheckpointError(f"{self.dir}: tensor {key} missing from the checkpoint")
        g = list(meta.size)
        t_off = [0] * len(g)
        t_size = list(g)
        if layer is not None:
            t_off[0], t_size[0] = layer, 1
        out = torch.empty(t_size, dtype=meta.properties.dtype)
        reqs, covered = [], 0
        for c in meta.chunks:
            lo = [max(a, b) for a, b in zip(c.offsets, t_off)]
            hi = [min(a + s, b + z) for a, s, b, z in zip(c.offsets, c.sizes, t_off, t_size)]
            if any(x >= y for x, y in zip(lo, hi)):
                continue
            lengths = [y - x for x, y in zip(lo, hi)]
            covered += int(torch.Size(lengths).numel())
            reqs.append(ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(key), dest_offsets=torch.Size(
                [x - b for x, b in zip(lo, t_off)]), storage_index=MetadataIndex(key, c.offsets),
                storage_offsets=torch.Size([x - a for x, a in zip(lo, c.offsets)]), lengths=torch.Size(lengths)))
        if covered != out.numel():
            raise CheckpointError(f"{self.dir}: chunks of {key} cover {covered} of {out.numel()} elements")

        class _Planner:
            def resolve_tensor(self, r):
                v = out
                for d, (o, n) in enumerate(zip(r.dest_offsets, r.lengths)):
                    v = v.narrow(d, o, n)
                return v

            def commit_tensor(self, r, t):
                pass

        self.fs.read_data(LoadPlan(reqs), _Planner()).wait()
        return out[0] if layer is not None else out


def mcore_to_hf(ckpt_dir: str, out_dir: str, hf_meta_dir: Optional[str] = None,
                max_shard_bytes: int = 512 * 2**20) -> dict:
    """Write HF safetensors (+ config, tokenizer, processor) from a torch_dist checkpoint."""
    reader = McoreReader(ckpt_dir)
    if os.path.exists(out_dir):
        raise CheckpointError(f"{out_dir} exists")
    meta = hf_meta_dir or os.path.join(ckpt_dir, HF_META_DIR)
    if not os.path.exists(os.path.join(meta, "config.json")):
        raise CheckpointError(f"no config.json in {meta}: pass --hf-config DIR (the HF directory the model came from)")
    bb = Backbone.from_hf_dir(meta)
    expected = hf_shapes(bb)
    check_against_config(reader, bb, expected, os.path.join(meta, "config.json"))
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        total, files = _write_hf(reader, bb, expected, meta, tmp, ckpt_dir, max_shard_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves nothing behind
        raise
    os.rename(tmp, out_dir)
    return {"files": len(files), "bytes": total}


def check_against_config(reader: McoreReader, bb: Backbone, expected: dict, cfg_path: str) -> None:
    """Every tensor config.json needs is in the checkpoint with its shape, and nothing else of the model.

    Before anything is written: a checkpoint of another backbone (other depth or width, untied
    lm_head under a tied config) otherwise exports a truncated model without a word.
    """
    want = {key: tuple(expected[hf]) for key, hf in global_nonlayer_keys(bb).items()}
    for short, parts in LAYER_KEYS.items():
        shapes = [expected[f"model.layers.0.{p}"] for p in parts]
        want[DEC + short] = (bb.num_layers, sum(s[0] for s in shapes), *shapes[0][1:])
    have = {k: tuple(m.size) for k, m in reader.md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}
    for key, shape in want.items():
        if key not in have:
            raise CheckpointError(f"{reader.dir}: tensor {key} missing from the checkpoint "
                                  f"(needed by {cfg_path})")
        if have[key] != shape:
            what = " (leading axis = decoder layers)" if key.startswith(DEC) else ""
            raise CheckpointError(f"{reader.dir}: tensor {key} has shape {have[key]}, {cfg_path} expects "
                                  f"{shape}{what}: a checkpoint of a different model?")
    unused = [k for k in have if k.startswith((LM, "vision_model.")) and k not in want]
    if unused:
        raise CheckpointError(f"{reader.dir}: {len(unused)} tensors that {cfg_path} has no place for, e.g. "
                              f"{unused[:3]}: a checkpoint of a different model?")


def _write_hf(reader, bb, expected, meta, tmp, ckpt_dir, max_shard_bytes):
    copy_hf_meta(meta, tmp)
    dtypes = {k: v.properties.dtype for k, v in reader.md.state_dict_metadata.items() if hasattr(v, "properties")}
    # Names in the order the generator yields them, with their dtypes, so that every shard's
    # safetensors header can be written before its data and tensors streamed one group at a time.
    order = [(hf, dtypes[key]) for key, hf in global_nonlayer_keys(bb).items()]
    for layer in range(bb.num_layers):
        for short, parts in LAYER_KEYS.items():
            order += [(f"model.layers.{layer}.{p}", dtypes[DEC + short]) for p in parts]
    bad = next(((n, d) for n, d in order if d not in _ST_DTYPE), None)
    if bad:
        raise CheckpointError(f"{ckpt_dir}: {bad[0]} is {bad[1]}; only float32, bfloat16 and float16 export")
    shards, size = [[]], 0
    for name, dt in order:
        n = torch.Size(expected[name]).numel() * torch.tensor([], dtype=dt).element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dt, n))
        size += n
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {name: files[i] for i, sh in enumerate(shards) for name, _, _ in sh}
    gen = iter_hf_from_global(reader.get, bb)
    total = 0
    for fname, sh in zip(files, shards):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, dt, n in sh:
            header[name] = {"dtype": _ST_DTYPE[dt], "shape": list(expected[name]), "data_offsets": [off, off + n]}
            off += n
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(os.path.join(tmp, fname), "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            for name, dt, n in sh:
                got, t = next(gen)
                if got != name or tuple(t.shape) != tuple(expected[name]) or t.dtype != dt:
                    raise CheckpointError(f"{ckpt_dir}: {got} has shape {tuple(t.shape)} {t.dtype}, config.json "
                                          f"expects {name} {tuple(expected[name])} {dt}")
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))  # no extra copy
                total += n
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total, files


__all__ = ["HF_META_DIR", "McoreReader", "check_against_config", "copy_hf_meta", "hf_to_mcore", "mcore_to_hf"]
