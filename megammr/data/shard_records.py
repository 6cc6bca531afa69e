"""Records back out of a shard directory (megammr.data.shards' layout), and records out to JSONL.

Curation (megammr/curate.py) reads shards as well as JSONL and writes what it keeps as records
JSONL (images as files beside it, byte-equal to the originals) that `build_shards` turns back into
shards; shards are never edited in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from typing import Iterator

from megammr.data.schema import Record
from megammr.data.shards import read_manifest

_KNOWN = ("id", "question", "answer", "images", "caption", "choices", "source")


def is_shard_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "megammr.json"))


def read_shard_records(path: str) -> Iterator[Record]:
    """Every record of a built shard directory, in shard order (image bytes as written)."""
    manifest = read_manifest(path)
    for shard in manifest["shards"]:
        with tarfile.open(os.path.join(path, shard["name"])) as tar:
            groups: dict[str, dict[str, bytes]] = {}
            order: list[str] = []
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                key, _, part = m.name.partition(".")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][part] = tar.extractfile(m).read()
            for key in order:
                parts = groups[key]
                meta = json.loads(parts["json"].decode("utf-8"))
                names = meta.get("images", [])
                yield Record(id=str(meta["id"]), question=meta["question"], answer=meta["answer"],
                             source=meta.get("source", ""), images=[parts[n] for n in names],
                             image_exts=[n.rsplit(".", 1)[-1] for n in names], caption=meta.get("caption"),
                             choices=meta.get("choices"), extra=dict(meta.get("extra") or {}))


def shard_phase(path: str) -> int:
    return int(read_manifest(path)["phase"])


def image_hash(data: bytes) -> str:
    """Content hash of an image's encoded bytes (exact duplicates only)."""
    return hashlib.sha256(data).hexdigest()


def record_line(rec: Record, images_dir: str, rel_to: str, extra: dict) -> dict:
    """The JSONL object of a record (megammr.data.schema's input layout); its images are written
    once each to `images_dir`, named by content hash, and referenced relative to `rel_to`."""
    paths = []
    for blob, ext in zip(rec.images, rec.image_exts):
        name = os.path.join(images_dir, f"{image_hash(blob)}.{ext}")
        if not os.path.exists(name):
            tmp = name + ".tmp"
            with open(tmp, "wb") as f:
                f.write(blob)
            os.replace(tmp, name)
        paths.append(os.path.relpath(name, rel_to))
    line = {"id": rec.id, "question": rec.question, "answer": rec.answer, "source": rec.source}
    if paths:
        line["images"] = paths
    if rec.caption is not None:
        line["caption"] = rec.caption
    if rec.choices is not None:
        line["choices"] = rec.choices
    for k, v in {**rec.extra, **extra}.items():
        if k not in _KNOWN:  # an extra key named like a field (caption on a phase-3 record) is not one
            line[k] = v
    return line


def exclusion_hashes(paths: list[str]) -> dict[str, str]:
    """{image content hash: the file it came from} of every image in `paths`: shard directories,
    or JSONL files (records, other phases' data, benchmark files) whose lines hold `images` (a
    list) or `image` (one), as paths relative to the file. A listed image that cannot be read is a
    ValueError naming it: an exclusion list that silently misses images would let duplicates in."""
    out: dict[str, str] = {}
    for p in paths:
        if is_shard_dir(p):
            for rec in read_shard_records(p):
                for blob in rec.images:
                    out.setdefault(image_hash(blob), p)
            continue
        if not os.path.isfile(p):
            raise ValueError(f"--exclude-images {p}: not found (a shard directory or a JSONL file is expected)")
        with open(p, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{p}:{n}: cannot parse ({e})") from None
                refs = d.get("images") if isinstance(d, dict) else None
                if refs is None and isinstance(d, dict) and isinstance(d.get("image"), str):
                    refs = [d["image"]]
                for ref in refs or []:
                    ref = ref.get("path") if isinstance(ref, dict) else ref
                    if not isinstance(ref, str):
                        continue
                    full = ref if os.path.isabs(ref) else os.path.join(os.path.dirname(os.path.abspath(p)), ref)
                    try:
                        with open(full, "rb") as img:
                            out.setdefault(image_hash(img.read()), p)
                    except OSError as e:
                        raise ValueError(f"{p}:{n}: images: cannot read {ref} ({e.strerror or e})") from None
    return out


__all__ = ["exclusion_hashes", "image_hash", "is_shard_dir", "read_shard_records", "record_line", "shard_phase"]
