"""Validated records -> webdataset tar shards + energon metadata (.nv-meta), deterministically.

Layout of one shard sample (key = 9-digit sequence number, so record ids may hold any text):
    <key>.json        the record's metadata (Record.meta: id, question, answer, phase, images, ...)
    <key>.img<i>.<ext>  the i-th image, its original bytes (png, jpg, ...)

Why the output cannot be taken for whole when a build fails half way: everything is written to
a staging directory beside the target and renamed into place only after every shard is closed
and fsync'ed and energon's index is written. Tar members have fixed owner, mode and mtime, so
the same input gives byte-identical shards.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from tqdm import tqdm

from megammr.config import TOOLS
from megammr.data.decontam import Decontaminator
from megammr.data.schema import DEFAULT_MAX_IMAGE_PIXELS, RecordError, count_rows, read_rows, validate

MANIFEST = "megammr.json"
REJECTED = "rejected.jsonl"
SCHEMA_VERSION = 1
DATASET_YAML = "__module__: megatron.energon\n__class__: CrudeWebdataset\n"


class BuildError(RuntimeError):
    pass


class TarShardWriter:
    """Bounded tar shards (by bytes and by samples), each closed, fsync'ed and renamed when full."""

    def __init__(self, out_dir: str, max_bytes: int, max_samples: int, pattern: str = "shard-{:06d}.tar"):
        self.out_dir, self.max_bytes, self.max_samples, self.pattern = out_dir, max_bytes, max_samples, pattern
        self.names: list[str] = []
        self.samples_per_shard: list[int] = []
        self._tar = None
        self._fh = None
        self._bytes = 0
        self._count = 0

    def write(self, key: str, parts: dict[str, bytes]):
        size = sum(512 + -(-len(v) // 512) * 512 for v in parts.values())
        if self._tar is not None and (self._count >= self.max_samples or
                                      (self._count and self._bytes + size > self.max_bytes)):
            self._close()
        if self._tar is None:
            self._open()
        for ext, data in parts.items():
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o444, 0, 0, "", ""
            self._tar.addfile(ti, io.BytesIO(data))
        self._bytes += size
        self._count += 1

    def _open(self):
        name = self.pattern.format(len(self.names))
        self._fh = open(os.path.join(self.out_dir, name + ".part"), "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.names.append(name)
        self._bytes = self._count = 0

    def _close(self):
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        name = self.names[-1]
        os.replace(os.path.join(self.out_dir, name + ".part"), os.path.join(self.out_dir, name))
        self.samples_per_shard.append(self._count)
        self._tar = self._fh = None

    def close(self):
        if self._tar is not None:
            self._close()


@dataclass
class BuildSummary:
    out: str
    phase: int
    read: int = 0
    written: int = 0
    shards: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    decontaminated: dict = field(default_factory=dict)
    captions_dropped: int = 0
    rejected_file: Optional[str] = None
    seconds: float = 0.0

    def text(self) -> str:
        lines = [f"phase {self.phase}: read {self.read}, wrote {self.written} records in {self.shards} shard(s) "
                 f"to {self.out} ({self.seconds:.1f}s)"]
        skipped = sum(self.skipped.values())
        lines.append(f"skipped invalid: {skipped}" + ("" if not skipped else " (" + ", ".join(
            f"{r}: {c}" for r, c in sorted(self.skipped.items())) + f"); rejected lines in {self.rejected_file}"))
        for p, c in self.decontaminated.items():
            lines.append(f"decontaminated against {p}: {c}")
        if self.captions_dropped:
            lines.append(f"captions dropped (phase {self.phase} is caption-free): {self.captions_dropped}")
        return "\n".join(lines)


def build_shards(inputs: list[str], phase: int, out: str, *, skip_invalid: bool = False,
                 exclude: tuple = (), ngram: int = TOOLS.decontam_ngram,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 shard_max_bytes: int = int(TOOLS.shard_max_mb * (1 << 20)),
                 shard_max_samples: int = TOOLS.shard_max_records, overwrite: bool = False,
                 progress: bool = True, energon_workers: int = 1) -> BuildSummary:
    """Validate every row of `inputs` and write shards of the valid ones to `out`.

    Default: the first invalid row stops the build with a RecordError (file:line: field: ...),
    and nothing is written. skip_invalid=True: invalid rows are counted per reason and written
    to out/rejected.jsonl. Raises BuildError when nothing valid remains.
    """
    if phase not in (1, 2, 3):
        raise BuildError(f"phase must be 1, 2 or 3, got {phase}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise BuildError(f"{out} exists and is not a directory")
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise BuildError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        # --overwrite deletes the old directory: only ever a previous build, never a folder of
        # inputs or anything else given by mistake.
        if not (os.path.isfile(os.path.join(out, MANIFEST)) or os.path.isdir(os.path.join(out, ".nv-meta"))):
            raise BuildError(f"{out} is not a shard directory (no {MANIFEST}); --overwrite only replaces a "
                             "previous build: choose another --out or remove it yourself")
    for p in inputs:
        if not os.path.isfile(p):
            raise BuildError(f"input not found: {p}")
    for p in list(inputs) + list(exclude):
        if os.path.abspath(p).startswith(out + os.sep):
            raise BuildError(f"{p} is inside the output directory {out}, which the build replaces")
    decon = None
    if exclude:
        decon = Decontaminator(list(exclude), ngram=ngram)

    t0 = time.time()
    summary = BuildSummary(out=out, phase=phase)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    stage_prefix = f".{os.path.basename(out)}.building-"
    remove_stale_stages(parent, stage_prefix)
    stage = os.path.join(parent, f"{stage_prefix}{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    rejected_fh = None
    restore_sigterm = _sigterm_as_exit()
    try:
        writer = TarShardWriter(stage, shard_max_bytes, shard_max_samples)
        seen: dict[str, str] = {}
        total = sum(count_rows(p) or 0 for p in inputs)
        bar = _progress(total, f"phase {phase} shards", progress)
        for path in inputs:
            for row in read_rows(path):
                summary.read += 1
                bar.update(1)
                try:
                    rec = validate(row, phase, max_image_pixels=max_image_pixels)
                    if rec.id in seen:
                        raise RecordError(row.path, row.line, "id", "duplicate_id",
                                          f"duplicate id {rec.id!r} (first at {seen[rec.id]})")
                except RecordError as e:
                    if not skip_invalid:
                        raise
                    summary.skipped[e.reason] += 1
                    if rejected_fh is None:
                        rejected_fh = open(os.path.join(stage, REJECTED), "w", encoding="utf-8")
                    rejected_fh.write(json.dumps(_rejected_entry(row, e), ensure_ascii=False) + "\n")
                    continue
                seen[rec.id] = f"{row.path}:{row.line}"
                if decon is not None and decon.match(rec.question) is not None:
                    continue
                if phase == 3 and isinstance(row.data, dict) and row.data.get("caption") is not None:
                    summary.captions_dropped += 1
                parts = {"json": json.dumps(rec.meta(phase), ensure_ascii=False, sort_keys=True).encode("utf-8")}
                for i, (blob, ext) in enumerate(zip(rec.images, rec.image_exts)):
                    parts[f"img{i}.{ext}"] = blob
                writer.write(f"{summary.written:09d}", parts)
                summary.written += 1
        bar.close()
        writer.close()
        if rejected_fh is not None:
            rejected_fh.close()
            rejected_fh = None
            summary.rejected_file = os.path.join(out, REJECTED)
        if decon is not None:
            summary.decontaminated = dict(decon.hits)
        if summary.written == 0:
            raise BuildError(f"no valid records in {', '.join(inputs)} (read {summary.read}; "
                             f"skipped {dict(summary.skipped)}); nothing written")
        summary.shards = len(writer.names)
        prepare_energon(stage, writer.names, workers=energon_workers)
        _write_manifest(stage, summary, writer, inputs)
        _fsync_dir(stage)
        summary.seconds = time.time() - t0
        _swap_into_place(stage, out)
    except BaseException:
        if rejected_fh is not None:
            rejected_fh.close()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        restore_sigterm()
    return summary


def _sigterm_as_exit():
    """SIGTERM (kill, Slurm, a container stop) raises SystemExit during a build so the staging
    directory is removed like after Ctrl-C; the default action would leave it behind. Returns
    the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def remove_stale_stages(parent: str, prefix: str):
    """Staging directories of earlier builds of the same output whose process is gone (SIGKILL,
    a crash of the machine): partial data nobody will finish."""
    for name in os.listdir(parent):
        if not name.startswith(prefix) or not name[len(prefix):].isdigit():
            continue
        pid = int(name[len(prefix):])
        try:
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # a build of the same output is running right now
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def prepare_energon(path: str, tar_names: list[str], workers: int = 1):
    """Write .nv-meta (index, split.yaml, dataset.yaml) the way `energon prepare` does, without prompts."""
    # lazy: megatron-energon imports torch (~1.2 s); validating and writing the records needs neither
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.prepare import WebdatasetPreparator

    # energon prints its own progress lines to stdout; our summary says what happened.
    with contextlib.redirect_stdout(io.StringIO()):
        WebdatasetPreparator.prepare_dataset(
            EPath(path), list(tar_names), split_parts_ratio=[("train", 1.0)], workers=workers,
            progress_fn=lambda it, total=None: it)
    with open(os.path.join(path, ".nv-meta", "dataset.yaml"), "w") as f:
        f.write(DATASET_YAML)


def _write_manifest(stage: str, summary: BuildSummary, writer: TarShardWriter, inputs: list[str]):
    shards = []
    for name, count in zip(writer.names, writer.samples_per_shard):
        with open(os.path.join(stage, name), "rb") as f:
            shards.append({"name": name, "samples": count, "sha256": hashlib.sha256(f.read()).hexdigest()})
    manifest = {"schema_version": SCHEMA_VERSION, "phase": summary.phase, "samples": summary.written,
                "inputs": [os.path.basename(p) for p in inputs], "shards": shards,
                "skipped": dict(sorted(summary.skipped.items())), "decontaminated":
                {os.path.basename(p): c for p, c in summary.decontaminated.items()}}
    with open(os.path.join(stage, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


def read_manifest(path: str) -> dict:
    """The build manifest of a shard directory (phase, sample count, shards)."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative to the current directory {os.getcwd()})"
        raise FileNotFoundError(f"{path}: no such directory{where}; build it with tools/build_shards.py")
    if not os.path.isdir(os.path.join(path, ".nv-meta")):
        raise FileNotFoundError(f"{path}: not a prepared shard directory (no .nv-meta); build it with "
                                "tools/build_shards.py")
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"{path}: no {MANIFEST}; build it with tools/build_shards.py")
    with open(mpath) as f:
        return json.load(f)


def _rejected_entry(row, e: RecordError) -> dict:
    entry = {"file": row.path, "line": row.line, "field": e.field, "reason": e.reason, "message": e.message}
    if row.raw is not None:
        entry["raw"] = row.raw
    elif row.raw_bytes is not None:
        entry["raw_base64"] = base64.b64encode(row.raw_bytes).decode("ascii")
    elif isinstance(row.data, dict):  # parquet: keep the row, images as their sizes only
        entry["row"] = {k: (f"<{len(v)} bytes>" if isinstance(v, (bytes, bytearray)) else v)
                        for k, v in row.data.items() if k != "images"}
    return entry


def _swap_into_place(stage: str, out: str):
    old = None
    if os.path.exists(out):
        old = out + f".old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    return tqdm(total=total or None, desc=desc, unit="rec", file=sys.stderr, dynamic_ncols=True)

