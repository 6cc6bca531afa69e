"""Curation by pass rate: keep the prompts a model solves sometimes, drop those it always or never solves.

Each prompt is sampled `n` times with a rollout engine (the registry's choice: vLLM on GPU,
transformers on CPU) and scored with the training reward (RewardPool); its pass rate is the fraction
of samples with accuracy 1. Records with LO <= pass rate <= HI are kept. A dataset that ships a pass
rate (e.g. ViRL39K's PassRate_7BBase, under a record's `extra`) can be filtered without a model.
Records whose images are exact duplicates (content hash) of images in other phases' data or in
benchmark files are counted and dropped before anything is sampled.

Output directory (never the input; shards are never edited in place):
    curate.json        the settings of the run (a restart with other settings is refused)
    pass_rates.jsonl   one line per scored prompt: id, source, pass_rate, correct, n
    records.jsonl      the kept records (schema of megammr.data.schema; images/ beside it, byte-equal)
    shards/            the kept records as shards (megammr.data.shards), when asked
    summary.json       kept / dropped per source and reason; pass_rates.png, the histogram
    DONE               written last

Resume: pass rates are appended (flushed and fsynced) one generate batch at a time; a restarted run
skips the prompts already scored. Batches are fixed slices of the input order and each batch's
sampling seed is drawn from (seed, batch index), so a resumed run scores every prompt exactly as an
uninterrupted one would, and the final files are the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from megammr.config import TOOLS, RecipeError
from megammr.data.decontam import Decontaminator
from megammr.data.schema import Record, read_rows, validate
from megammr.data.shard_records import (exclusion_hashes, image_hash, is_shard_dir, read_shard_records,
                                        record_line, shard_phase)

PHASE_STYLE = {1: "text", 2: "caption", 3: "image"}
RATES = "pass_rates.jsonl"
SETTINGS = "curate.json"


class CurateError(RuntimeError):
    """A curation that cannot run as asked: one line naming the file or flag and the fix."""


@dataclass
class CurateSummary:
    read: int = 0
    kept: int = 0
    scored_now: int = 0      # prompts sampled by this invocation (0 on a finished rerun)
    per_source: dict = field(default_factory=lambda: defaultdict(Counter))  # source -> {kept, low, high, ...}
    histogram: Optional[str] = None
    out: str = ""

    def count(self, source: str, what: str):
        self.per_source[source][what] += 1

    def text(self) -> str:
        lines = [f"curate: {self.kept} of {self.read} record(s) kept -> {self.out}"]
        for src in sorted(self.per_source):
            c = self.per_source[src]
            lines.append(f"  {src}: " + ", ".join(f"{k} {c[k]}" for k in sorted(c)))
        return "\n".join(lines)


# --------------------------------------------------------------------------- input
def load_records(path: str, phase: Optional[int]) -> tuple[list[Record], int]:
    """(records, phase) of a shard directory (its manifest's phase) or a JSONL/parquet file (validated
    as `phase`); a bad row is a CurateError naming file, line and field."""
    if is_shard_dir(path):
        return list(read_shard_records(path)), shard_phase(path)
    if not os.path.isfile(path):
        raise CurateError(f"--input {path}: not found (a shard directory or a records JSONL file is expected)")
    if phase is None:
        raise CurateError(f"--input {path}: a records file needs --phase 1, 2 or 3 (shards carry theirs)")
    out, seen = [], set()
    for row in read_rows(path):
        try:
            rec = validate(row, phase)
        except ValueError as e:
            raise CurateError(str(e)) from None
        if rec.id in seen:
            raise CurateError(f"{path}:{row.line}: id: duplicate id {rec.id!r}")
        seen.add(rec.id)
        out.append(rec)
    return out, phase


def column_pass_rate(rec: Record, column: str) -> Optional[float]:
    """The shipped pass rate of a record (its `extra[column]`), None when missing or -1 (unlabelled)."""
    v = rec.extra.get(column)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        return None
    return float(v)


# --------------------------------------------------------------------------- scoring
def batch_seed(seed: int, batch_index: int) -> int:
    return int(np.random.SeedSequence([seed % 2**63, batch_index]).generate_state(1, np.uint64)[0] >> 1)


def build_prompt(rec: Record, style: str, system_prompt: Optional[str]):
    from megammr.data.images import decode_image
    from megammr.data.prompts import build_messages, render_chat
    from megammr.rollout import RolloutPrompt
    images = [decode_image(b) for b in rec.images] if style != "text" else []
    msgs = build_messages(rec.question, style=style, caption=rec.caption, choices=rec.choices,
                          system_prompt=system_prompt, images=images or None)
    return RolloutPrompt(render_chat(msgs), images)


def read_rates(path: str) -> dict[str, dict]:
    """Pass rates already written; a torn last line (the run was killed mid-write) is ignored."""
    out: dict[str, dict] = {}
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for line in f:
            try:
                d = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            out[str(d["id"])] = d
    return out


def score(records: Sequence[Record], engine, recipe, *, n: int, seed: int, style: str, rates_path: str,
          batch_size: int, progress: Callable[[int], None]) -> tuple[dict[str, dict], int]:
    """Pass rate of every record, resuming from `rates_path`; returns ({id: row}, prompts scored now)."""
    from megammr import megatron_cpu  # torch: lazy, so `megammr curate --help` and the column path stay light
    from megammr.rewards import RewardItem, RewardPool
    from megammr.rollout import SamplingParams

    done = read_rates(rates_path)
    progress(sum(r.id in done for r in records))
    scored = 0
    todo = [(b, records[s:s + batch_size]) for b, s in enumerate(range(0, len(records), batch_size))]
    todo = [(b, chunk) for b, chunk in todo if any(r.id not in done for r in chunk)]
    if not todo:
        return done, 0
    with RewardPool(recipe.reward) as pool, open(rates_path, "a", encoding="utf-8") as out:
        for b, chunk in todo:
            sampling = SamplingParams.from_config(recipe.rollout, seed=batch_seed(seed, b))
            prompts = [build_prompt(r, style, recipe.data.system_prompt) for r in chunk]
            with megatron_cpu.suspended():  # after a CPU training phase: generate never calls megatron
                rollouts = engine.generate(prompts, n, sampling)
            items = [RewardItem(ro.text, chunk[ro.prompt_index].answer, chunk[ro.prompt_index].choices)
                     for ro in rollouts]
            results = pool.score(items)
            new = 0
            for i, rec in enumerate(chunk):
                if rec.id in done:
                    continue
                correct = sum(int(res.accuracy > 0) for ro, res in zip(rollouts, results) if ro.prompt_index == i)
                row = {"id": rec.id, "source": rec.source, "pass_rate": correct / n, "correct": correct, "n": n}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[rec.id] = row
                new += 1
            out.flush()
            os.fsync(out.fileno())
            scored += new
            progress(new)
    return done, scored


# --------------------------------------------------------------------------- the pass
def settings_of(*, input_path: str, model: Optional[str], n: int, seed: int, column: Optional[str],
                recipe, batch_size: int, exclude_images: Sequence[str], exclude: Sequence[str] = ()) -> dict:
    """What the pass rates depend on (the batches fix the seeds; the exclusions, which prompts are
    batched together); a restart in the same directory must match them. The keep range is not among
    them: rerunning with another --keep reselects from the pass rates already written."""
    return {"input": os.path.abspath(input_path), "model": os.path.abspath(model) if model else None,
            "n": n, "seed": seed, "pass_rate_column": column, "batch_size": batch_size,
            "exclude_images": [os.path.abspath(p) for p in exclude_images],
            "exclude": [os.path.abspath(p) for p in exclude],
            "sampling": {k: getattr(recipe.rollout, k) for k in ("temperature", "top_p", "top_k", "max_new_tokens")},
            "reward": {k: getattr(recipe.reward, k) for k in ("require_think", "require_answer_tag")},
            "system_prompt": recipe.data.system_prompt}


def curate(input_path: str, out: str, recipe, *, keep: Sequence[float], n: int, seed: int,
           phase: Optional[int] = None, style: Optional[str] = None, model: Optional[str] = None,
           engine_factory: Optional[Callable[[], object]] = None, column: Optional[str] = None,
           keep_unlabelled: bool, exclude_images: Sequence[str] = (), exclude: Sequence[str] = (),
           shards: Optional[bool] = None,
           batch_size: int = TOOLS.curate_batch_size, progress: Optional[bool] = None,
           log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> CurateSummary:
    """Curate `input_path` into `out` (see the module docstring). Exactly one of `column` (a shipped
    pass rate) and `engine_factory` (called once, only when something is left to score)."""
    lo, hi = keep
    if not 0 <= lo <= hi <= 1:
        raise CurateError(f"--keep {lo}:{hi}: need 0 <= LO <= HI <= 1")
    if (column is None) == (engine_factory is None):
        raise CurateError("give a model to sample with, or --pass-rate-column (not both)")
    if os.path.abspath(out) == os.path.abspath(input_path) or \
            os.path.abspath(input_path).startswith(os.path.abspath(out) + os.sep):
        raise CurateError(f"--out {out}: the input {input_path} is inside it; choose another directory")
    records, phase = load_records(input_path, phase)
    style = style or PHASE_STYLE[phase]
    shards = is_shard_dir(input_path) if shards is None else shards
    os.makedirs(out, exist_ok=True)
    want = settings_of(input_path=input_path, model=model, n=n, seed=seed, column=column, recipe=recipe,
                       batch_size=batch_size, exclude_images=exclude_images, exclude=exclude)
    spath = os.path.join(out, SETTINGS)
    if os.path.exists(spath):
        with open(spath, encoding="utf-8") as f:
            have = json.load(f)
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise CurateError(f"--out {out}: holds a curation with other settings ({', '.join(diff)} differ): "
                              "use another --out, or remove it to start over")
    else:
        _write_json(spath, want)

    summary = CurateSummary(read=len(records), out=out)
    banned = exclusion_hashes(list(exclude_images)) if exclude_images else {}
    # Text decontamination against the eval sets, as build_shards and data import do: before
    # scoring, so no sample is spent on a question that would be dropped anyway.
    deco = Decontaminator(list(exclude)) if exclude else None
    candidates = []
    for rec in records:
        hit = next((banned[h] for h in map(image_hash, rec.images) if h in banned), None)
        match = deco.match(rec.question) if deco is not None and hit is None else None
        if hit is not None:
            summary.count(rec.source, f"dropped_duplicate_image({os.path.basename(os.path.normpath(hit))})")
        elif match is not None:
            summary.count(rec.source, f"decontaminated({os.path.basename(match)})")
        else:
            candidates.append(rec)

    if column is not None:
        rates = {r.id: column_pass_rate(r, column) for r in candidates}
    else:
        bar = _Progress(len(candidates), progress)
        engine = None
        done = read_rates(os.path.join(out, RATES))
        if any(r.id not in done for r in candidates):
            engine = engine_factory()
        try:
            rows, summary.scored_now = score(candidates, engine, recipe, n=n, seed=seed, style=style,
                                             rates_path=os.path.join(out, RATES), batch_size=batch_size,
                                             progress=bar.update)
        finally:
            bar.close()
        rates = {r.id: rows[r.id]["pass_rate"] for r in candidates}

    kept = []
    for rec in candidates:
        rate = rates[rec.id]
        if rate is None:
            summary.count(rec.source, "kept_unlabelled" if keep_unlabelled else "dropped_unlabelled")
            if keep_unlabelled:
                kept.append((rec, rate))
        elif rate < lo:
            summary.count(rec.source, "dropped_low")
        elif rate > hi:
            summary.count(rec.source, "dropped_high")
        else:
            summary.count(rec.source, "kept")
            kept.append((rec, rate))
    summary.kept = len(kept)
    _write_records(out, kept, add_rate=column is None)
    if shards and not kept:
        log(f"curate: no record kept: no shards written to {os.path.join(out, 'shards')}")
    elif shards:
        from megammr.data.shards import build_shards
        build_shards([os.path.join(out, "records.jsonl")], phase, os.path.join(out, "shards"), overwrite=True,
                     progress=False)
    summary.histogram = _histogram(out, [r for r in rates.values() if r is not None], (lo, hi), log)
    _write_json(os.path.join(out, "summary.json"), {
        "read": summary.read, "kept": summary.kept, "keep": [lo, hi], "n": n, "seed": seed,
        "pass_rate_column": column, "per_source": {s: dict(c) for s, c in sorted(summary.per_source.items())}})
    with open(os.path.join(out, "DONE"), "w") as f:
        f.write("ok\n")
    return summary


def _write_records(out: str, kept, *, add_rate: bool):
    images = os.path.join(out, "images")
    os.makedirs(images, exist_ok=True)
    tmp = os.path.join(out, "records.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec, rate in kept:
            extra = {"pass_rate": rate} if add_rate else {}  # a shipped column is already in extra
            f.write(json.dumps(record_line(rec, images, out, extra), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out, "records.jsonl"))


def _write_json(path: str, obj):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _histogram(out: str, rates: list[float], keep, log) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("curate: matplotlib is not installed: no pass_rates.png (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(rates, bins=np.linspace(0, 1, 21), color="tab:blue")
    for x in keep:
        ax.axvline(x, color="tab:red", linestyle="--")
    ax.set_xlabel("pass rate")
    ax.set_ylabel("prompts")
    ax.set_title(f"{len(rates)} prompts; kept {keep[0]} <= rate <= {keep[1]}")
    fig.tight_layout()
    path = os.path.join(out, "pass_rates.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _Progress:
    """tqdm on a terminal, else one line per TOOLS.curate_progress_every prompts."""

    def __init__(self, total: int, enabled: Optional[bool]):
        self.total, self.n, self.last, self.t0 = total, 0, 0, time.time()
        tty = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        if tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="curate", unit="prompt", file=sys.stderr, dynamic_ncols=True)

    def update(self, k: int):
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.n - self.last >= TOOLS.curate_progress_every or (self.n == self.total and self.n != self.last):
            self.last = self.n
            print(f"curate: {self.n}/{self.total} prompts scored ({time.time() - self.t0:.0f}s)", file=sys.stderr,
                  flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- engine
def build_engine(recipe, model: str, *, world_size: int = 1):
    """A rollout engine on `model` through the registry (rollout.engine, `auto`: vLLM with CUDA, else
    transformers), in this process alone. Under a multi-rank job only one rank curates, so an engine
    that needs every rank (collective: vLLM) gives way to the next available one."""
    import torch

    from megammr import runtime
    from megammr.rollout.registry import ENGINES, check_engine, engine_class, resolve_engine
    recipe = replace(recipe, model=replace(recipe.model, hf_path=model))
    cuda = torch.cuda.is_available()
    name, note = resolve_engine(recipe.rollout.engine, cuda)
    if world_size > 1 and engine_class(name).collective:
        name = next((e for e in ENGINES if not engine_class(e).collective and engine_class(e).available(cuda)[0]),
                    None)
        if name is None:
            raise CurateError("curation runs on one rank; every available engine needs all ranks: run "
                              "`megammr curate` as one process first")
        note = f"curation on one rank: using the {engine_class(name).label} engine"
    errors, _ = check_engine(recipe, name, cuda)
    if errors:
        raise RecipeError(errors)
    if note:
        print(f"megammr: {note}", file=sys.stderr, flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = runtime.DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=port,
                          launcher="single")
    rt = runtime.Runtime(env, runtime.device(), "none", 1, 1, 1, 1, [])
    return engine_class(name).build(recipe, rt, group=None, leader=0, is_leader=True)


# --------------------------------------------------------------------------- curriculum
def file_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def model_digest(model: str) -> str:
    files = sorted(f for f in os.listdir(model) if f.endswith((".safetensors", ".bin", ".json")))
    return file_digest([os.path.join(model, f) for f in files])


def data_digest(path: str) -> str:
    if is_shard_dir(path):  # the manifest holds every shard's sha256
        return file_digest([os.path.join(path, "megammr.json")])
    return file_digest([path])


def curate_phase(recipe, prev_output_dir: Optional[str], out_root: str, *, rank: int, world_size: int,
                 engine_factory: Optional[Callable[[str], object]] = None, wait_s: float = 5.0) -> list[str]:
    """data.curate of one curriculum phase: each dataset of `recipe` curated with the model it names
    (`previous`: prev_output_dir/hf) into out_root/<hash>/, where the hash covers the data, the model
    weights and the settings, so a rerun or a resumed phase reuses it. Rank 0 curates; the other ranks
    wait for its DONE file. Returns the curated shard directories, in data.datasets order."""
    cfg = recipe.data.curate
    model = os.path.join(prev_output_dir, "hf") if cfg.model == "previous" and prev_output_dir else cfg.model
    if cfg.model == "previous" and not prev_output_dir:
        raise CurateError(f"{recipe.phase.name}: data.curate.model=previous, but it is the first phase: name an "
                          "HF directory")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise CurateError(f"{recipe.phase.name}: data.curate: {model} is not an HF export (no config.json); "
                          "the previous phase writes one when train.export_hf is on")
    settings = json.dumps({"n": cfg.n, "keep": cfg.keep, "seed": recipe.train.seed,
                           "style": recipe.data.prompt_style, "weights": model_digest(model),
                           **settings_of(input_path="", model=None, n=cfg.n, seed=recipe.train.seed, column=None,
                                         recipe=recipe, batch_size=TOOLS.curate_batch_size, exclude_images=())}, sort_keys=True, default=str)
    outs = []
    for ds in recipe.data.datasets:
        key = hashlib.sha256((settings + data_digest(ds.path)).encode()).hexdigest()[:16]
        out = os.path.join(out_root, key)
        outs.append(os.path.join(out, "shards"))
        if os.path.exists(os.path.join(out, "DONE")):
            continue
        failed = os.path.join(out, "FAILED")
        if rank != 0:
            t0 = time.time() - 1  # a FAILED left by an earlier run is not this run's
            while not os.path.exists(os.path.join(out, "DONE")):
                if os.path.exists(failed) and os.path.getmtime(failed) >= t0:
                    raise CurateError(f"{recipe.phase.name}: rank 0's curation of {ds.path} failed (see its log)")
                time.sleep(wait_s)
            continue
        factory = (lambda: engine_factory(model)) if engine_factory else \
            (lambda: build_engine(recipe, model, world_size=world_size))
        os.makedirs(out, exist_ok=True)
        if os.path.exists(failed):
            os.remove(failed)
        try:
            s = curate(ds.path, out, recipe, keep=cfg.keep, n=cfg.n, seed=recipe.train.seed,
                       style=recipe.data.prompt_style, model=model, engine_factory=factory,
                       keep_unlabelled=TOOLS.curate_keep_unlabelled, shards=True)
        except BaseException:
            with open(failed, "w") as f:  # the waiting ranks stop instead of waiting forever
                f.write("failed\n")
            raise
        print(s.text(), file=sys.stderr, flush=True)
    for ds, shards in zip(recipe.data.datasets, outs):
        if not os.path.isfile(os.path.join(shards, "megammr.json")):
            raise CurateError(f"{recipe.phase.name}: data.curate kept no record of {ds.path} (keep {cfg.keep}; "
                              f"see {os.path.dirname(shards)}/summary.json): widen data.curate.keep")
    return outs


__all__ = ["CurateError", "CurateSummary", "build_engine", "column_pass_rate", "curate", "curate_phase",
           "load_records", "read_rates", "score"]
