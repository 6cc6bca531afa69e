"""`megammr bench data`: loader throughput with image decode + Qwen2.5-VL preprocessing.

Builds phase-3 shards from the synthetic generator (images upscaled to --image-size so decode
and resize cost what real chart/photo data costs), then reads one epoch twice with the same
per-sample work (PNG decode, resize, normalise, patchify, prompt rendering) and the same worker
count: once through megammr's energon PhaseDataLoader, once through a plain webdataset pipeline
in a torch DataLoader (the baseline: no resumable state, no blends, no rank splitting).
Reported: steady samples/s (after the first sample, i.e. without worker start-up) and samples/s
including start-up.
"""
from __future__ import annotations

import json
import os
import tempfile
import time


def add_arguments(p):
    p.add_argument("--samples", type=int, default=512, help="records in the benchmark shards")
    p.add_argument("--workers", type=int, default=None,
                   help="loader worker processes of both loaders (default: the recipe default, data.num_workers)")
    p.add_argument("--image-size", type=int, default=448, help="side of the square PNG images")
    p.add_argument("--max-pixels", type=int, default=None, help="Qwen2.5-VL max_pixels (default: the recipe default)")
    p.add_argument("--work-dir", default=None, help="where to build the shards (default: a temporary directory)")


def _build(work: str, n: int, size: int) -> str:
    from PIL import Image

    from megammr.data.shards import build_shards
    from megammr.data.synthetic import write_phase
    raw = os.path.join(work, "raw")
    jsonl = write_phase(raw, 3, n, seed=0)
    if size != 224:
        img_dir = os.path.join(raw, "images", "phase3")
        for f in sorted(os.listdir(img_dir)):
            p = os.path.join(img_dir, f)
            Image.open(p).resize((size, size), Image.BICUBIC).save(p, format="PNG")
    out = os.path.join(work, "shards")
    build_shards([jsonl], 3, out, overwrite=True, progress=False, shard_max_samples=max(8, n // 8))
    return out


def _wds_decode(sample, min_pixels, max_pixels):
    """The baseline's per-sample work: the same as PhaseTaskEncoder.encode_sample."""
    from megammr.data.images import decode_image
    from megammr.data.prompts import encode_prompt
    meta = json.loads(sample["json"])
    images = [decode_image(sample[name]) for name in meta["images"]]
    return encode_prompt(meta["question"], style="image", images=images, choices=meta.get("choices"),
                         min_pixels=min_pixels, max_pixels=max_pixels)


def _time(iterable, n: int):
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in iterable:
        count += 1
        if first is None:
            first = time.perf_counter()
        if count == n:
            break
    end = time.perf_counter()
    steady = (count - 1) / (end - first) if count > 1 else float("nan")
    return {"count": count, "startup_s": first - t0, "steady": steady, "total": count / (end - t0)}


def bench_webdataset(shards: str, n: int, workers: int, min_pixels: int, max_pixels: int):
    import functools

    import torch
    import webdataset as wds
    tars = sorted(os.path.join(shards, f) for f in os.listdir(shards) if f.endswith(".tar"))
    ds = wds.WebDataset(tars, shardshuffle=False, empty_check=False).map(
        functools.partial(_wds_decode, min_pixels=min_pixels, max_pixels=max_pixels))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=lambda x: x)
    return _time(loader, n)


def bench_energon(shards: str, n: int, workers: int, min_pixels: int, max_pixels: int):
    from megammr.config import DataConfig, DatasetConfig
    from megammr.data.loader import PhaseDataLoader
    cfg = DataConfig(datasets=[DatasetConfig(path=shards)], prompt_style="image", num_workers=workers,
                     min_pixels=min_pixels, max_pixels=max_pixels)
    with PhaseDataLoader(cfg, seed=0, repeat=False) as ld:
        return _time(iter(ld), n)


def run(args) -> int:
    import platform

    import torch

    from megammr.config import DataConfig
    d = DataConfig()
    max_pixels = args.max_pixels or d.max_pixels
    workers = d.num_workers if args.workers is None else args.workers
    tmp = None
    work = args.work_dir
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="megammr-bench-data-")
        work = tmp.name
    try:
        t = time.perf_counter()
        shards = _build(work, args.samples, args.image_size)
        print(f"built {args.samples} phase-3 records ({args.image_size}x{args.image_size} PNG) in "
              f"{time.perf_counter() - t:.1f}s")
        torch.set_num_threads(1)  # workers do the work; keep the main process from competing for cores
        rows = [("plain webdataset", bench_webdataset(shards, args.samples, workers, d.min_pixels, max_pixels)),
                ("energon (megammr)", bench_energon(shards, args.samples, workers, d.min_pixels, max_pixels))]
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\nmegammr bench data: {args.samples} samples, {workers} workers, PNG decode + Qwen2.5-VL "
          f"preprocessing (max_pixels {max_pixels}) + prompt rendering; {platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'loader':<20} {'samples/s (steady)':>20} {'samples/s (incl. start-up)':>28} {'first sample (s)':>18}")
    for name, r in rows:
        print(f"{name:<20} {r['steady']:>20.1f} {r['total']:>28.1f} {r['startup_s']:>18.2f}")
    base = rows[0][1]["steady"]
    print(f"energon / webdataset (steady): {rows[1][1]['steady'] / base:.2f}x")
    for name, r in rows:
        if r["count"] != args.samples:
            print(f"error: {name} yielded {r['count']} of {args.samples} samples")
            return 1
    return 0
