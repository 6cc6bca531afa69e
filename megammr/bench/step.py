"""`megammr bench step`: time of one GRPO step, where it goes, and TRL's GRPOTrainer at equal work.

Everything runs at world size 1 in fp32 on the tiny random Qwen2.5-VL with phase-1 text prompts:
--prompts prompts x --n samples x --max-new-tokens tokens per step (the tiny recipe's 4 x 4 x 32),
micro-batches of --micro-batch-size, KL to a reference model (algo.kl_coef 1e-3), one optimizer
step per rollout batch, --warmup steps not measured then --steps measured. One round is:

1. megammr's trainer (`megammr.trainer.train`) in this process. Per-stage times are the trainer's
   own metrics: time/rollout (the engine's generate call), time/reward, time/logprobs (reference
   log-probs), time/train (megatron forward/backward + optimizer), time/sync (weight sync into the
   engine), time/step (the whole step). "Step wall" is the wall time between two consecutive step
   ends (adds the per-step metric reduction and logging).
2. Megatron model compute: the same prompts (the trainer's loader, seed and order, so the same
   prompt token ids), max-length responses, micro-batched by megammr's own batching (so the padded
   shapes are the trainer's); the megatron model called directly - no schedule, no fused loss
   kernels, no bookkeeping - for the reference forward, the policy forward + backward of a minimal
   GRPO loss (log_softmax + gather, clipped ratio x advantage, k3 KL) and megatron's optimizer step;
   each step is followed by the trainer's own train-side code on the same micro-batches. (First
   round only, a diagnostic: the HF compute below, in this process under megammr's CPU layer.)
3. In a subprocess (so neither framework's imports or global state touch the other): the same work
   with transformers' Qwen2.5-VL and torch AdamW ("HF compute": TRL's model compute), megammr's
   rollout engine on the same prompts outside the trainer, then TRL's
   GRPOTrainer on the same HF directory with the same prompt texts in the same order (shuffle
   off), the same n, max completion length, temperature 1.0 with top-p 1 / top-k off,
   beta = kl_coef, clip 0.2, token-mean loss ("dapo"), lr, clip-norm 1.0, the same micro-batch size
   (gradient accumulation over the step's completions: one generation and one optimizer step per
   step), fp32 on CPU, no gradient checkpointing, and megammr's reward
   (`megammr.rewards.core.score_item`: format + accuracy) called in-process. Its step time is the
   wall time between two `on_step_end` callbacks; its generation time is its model.generate call.

--rounds repeats 1-3 and pools the measured steps (alternating the frameworks spreads the noise of
a shared machine over both). The same intra-op thread count (--threads) is used everywhere.

Framework overhead = time/step - (generation + model compute), per step, median over measured
steps: everything that is neither the engine's generate call nor the model's forward/backward/
optimizer math - data loading and prompt building, reward scoring (the pool round trip included),
advantages and micro-batching, megatron's schedule and the fused loss kernels, log-prob
bookkeeping, weight sync, metrics. TRL's overhead is the same formula with its step wall,
generate time and HF compute. Engine-internal work (megammr's sampler and log-prob gathering, prompt
encoding; TRL's generate call likewise) counts as generation; the same engine is also timed outside
the trainer, in the clean subprocess, to show what megammr's CPU compatibility layer costs it.

The subtraction compares medians measured in different processes at different moments, so on a
loaded machine it can swing by more than the overhead itself. "Overhead by parts" measures the
framework's own parts directly instead: the non-model stages of the step (rewards, weight sync,
data/advantages/batching, metric reduction and logging) from the trainer's metrics, plus the extra
time of the trainer's train-side code path (megammr.train.step.forward_logprobs + train_on:
megatron's schedule, the fused loss kernels, metric sums, the guarded optimizer step) over direct
model calls on the same micro-batches, the two run alternately in one process.

Equal work: both stop a completion at the same end-of-turn tokens (the random model rarely emits
one), so generated tokens per step are reported for both (they differ by a few percent) and the
ratio is also given per generated token.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any, Optional

from megammr.bench.compute import (COMPUTE_KEYS, compat_mode_active, compute_params, hf_compute, median,
                                   megatron_compute)
from megammr.bench.machine import loadavg, machine
from megammr.bench.yardstick import run_worker

OVERHEAD_DEFINITION = (
    "overhead = step time - (generation + model compute), per step, median over measured steps. "
    "generation = the rollout engine's generate call (megammr time/rollout; TRL model.generate). "
    "model compute = the model called directly on the step's micro-batches (same prompts, max-length "
    "responses, the trainer's padded shapes): reference forward + policy forward/backward of a minimal "
    "GRPO loss + optimizer step; the megatron model for megammr, transformers' model + torch AdamW for TRL. "
    "Everything else is framework overhead: data loading and prompts, rewards (pool round trip), "
    "advantages, micro-batching, megatron schedules and loss kernels, log-prob bookkeeping, weight sync, metrics.")

STAGES = ("rollout", "reward", "logprobs", "train", "sync")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None, help="tiny HF model directory (default: write one to the work dir)")
    p.add_argument("--data", default=None,
                   help="phase-1 shard directory, or a data root holding phase1/ (default: write synthetic data)")
    p.add_argument("--work-dir", default=None, help="run directories and generated inputs (default: a temporary one)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (GRPO group size, TRL num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest response (TRL max_completion_length)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward (both)")
    p.add_argument("--warmup", type=int, default=2, help="steps run and not measured, per round (>= 1)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per round")
    p.add_argument("--rounds", type=int, default=1, help="repeat megammr / compute / TRL this many times, pooled")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for both frameworks (default: torch's own, one per core)")
    p.add_argument("--reward-workers", type=int, default=1, help="megammr's verifier processes (reward.workers)")
    p.add_argument("--data-workers", type=int, default=0,
                   help="megammr's loader processes (data.num_workers; TRL's dataloader_num_workers stays 0)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for megammr's run (repeatable; TRL is not changed by it)")
    p.add_argument("--no-trl", action="store_true", help="skip TRL's GRPOTrainer")
    p.add_argument("--no-hf-compute", action="store_true", help="skip the transformers model-compute reference")
    p.add_argument("--worker-timeout", type=float, default=1800, help="seconds allowed for the TRL/HF subprocess")
    p.add_argument("--json", default=None, metavar="FILE", help="also write all figures to this JSON file")


# ----------------------------------------------------------------------------- inputs
def _prepare_inputs(args, work: str) -> tuple[str, str]:
    """(model dir, phase-1 shard dir), written under `work` where not given."""
    if args.model:
        model = os.path.abspath(args.model)
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise SystemExit(f"megammr bench step: --model {args.model}: no config.json there")
    else:
        from megammr.models.tiny import write_tiny_model
        model = write_tiny_model(os.path.join(work, "tiny-model"), seed=0)
    if args.data:
        data = os.path.abspath(args.data)
        if os.path.isdir(os.path.join(data, "phase1")):
            data = os.path.join(data, "phase1")
        if not os.path.isdir(data):
            raise SystemExit(f"megammr bench step: --data {args.data}: no such directory")
    else:
        from megammr.data.synthetic import write_all
        need = args.prompts * (args.warmup + args.steps)
        data = write_all(os.path.join(work, "data"), n=max(64, need), seed=0, phases=(1,), progress=False)[1]["shards"]
    return model, data


def _recipe(args, model: str, data: str, out_dir: str):
    """The tiny recipe (recipes/tiny/base.yaml + phase1.yaml) at the benchmark's sizes, no checkpoints."""
    from megammr.config import load_recipe
    ov = [
        "model.backbone=tiny", f"model.hf_path={model}", "model.precision=fp32",
        f"data.datasets=[{{path: {json.dumps(data)}}}]", "data.prompt_style=text",
        f"data.num_workers={args.data_workers}",
        f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.temperature=1.0",
        "rollout.top_p=1.0", "rollout.top_k=-1",
        # One generate call per step, as TRL does with its generation batch.
        f"rollout.max_batch_sequences={args.prompts * args.n}",
        f"train.steps={args.warmup + args.steps}", f"train.prompts_per_step={args.prompts}",
        f"train.micro_batch_size={args.micro_batch_size}", "train.updates_per_step=1",
        f"train.checkpoint_interval={10 ** 9}", "train.log_interval=1", f"train.seed={args.seed}",
        f"train.output_dir={out_dir}", "optim.lr=1.0e-4", f"reward.workers={args.reward_workers}",
    ]
    return load_recipe(None, ov + list(args.overrides))


def _bench_prompts(recipe, count: int) -> list[dict]:
    """The first `count` prompts the trainer's loader yields for this recipe (same seed, rank, order)."""
    from megammr.data.loader import PhaseDataLoader
    from megammr.models.processor import load_processor

    tok = load_processor(recipe.model.hf_path).tokenizer
    with PhaseDataLoader(recipe.data, seed=recipe.train.seed, dp_rank=0, dp_size=1, tokenizer=tok) as loader:
        samples = loader.next_batch(count)
    if len(samples) < count:
        raise SystemExit(f"megammr bench step: the data has {len(samples)} usable prompts, {count} needed")
    return [{"text": s.prompt.text, "ids": s.prompt.input_ids.tolist(), "answer": s.answer, "choices": s.choices}
            for s in samples]


def _bench_micro_batches(recipe, step_prompts: list[list[dict]]) -> list[list]:
    """Per measured step, the trainer's micro-batches for its prompts with max-length responses
    (random ordinary tokens): the padded shapes the trainer computes on."""
    import torch

    from megammr.backbones import Backbone
    from megammr.models.processor import load_processor
    from megammr.train.batching import Sample, make_micro_batches

    bb = Backbone.from_hf_dir(recipe.model.hf_path, name=recipe.model.backbone)
    tok = load_processor(recipe.model.hf_path).tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
    # Ordinary tokens only: no stop token, no image/vision/control token (a random <|image_pad|>
    # would need an image).
    special = set(getattr(tok, "added_tokens_decoder", {}) or {}) | set(tok.all_special_ids)
    allowed = torch.tensor([t for t in range(min(bb.vocab_size, len(tok))) if t not in special])
    g = torch.Generator().manual_seed(0)
    out = []
    for prompts in step_prompts:
        samples = []
        for p in prompts:
            for j in range(recipe.rollout.n):
                resp = allowed[torch.randint(len(allowed), (recipe.rollout.max_new_tokens,), generator=g)].tolist()
                samples.append(Sample(p["ids"], resp, 1.0 if j % 2 else -1.0, [0.0] * len(resp)))
        out.append(make_micro_batches(samples, bb, pad_id=pad_id, micro_batch_size=recipe.train.micro_batch_size,
                                      max_tokens=recipe.train.max_tokens_per_micro_batch,
                                      fixed_shape=recipe.parallel.pp > 1))
    return out


def _as_dicts(batches) -> list[list[dict]]:
    """MicroBatch objects -> plain dicts of CPU tensors (what the worker subprocess loads)."""
    keys = ("input_ids", "position_ids", "labels", "loss_mask", "advantages", "pixel_values", "image_grid_thw")
    return [[{k: getattr(mb, k) for k in keys} for mb in mbs] for mbs in batches]


# ----------------------------------------------------------------------------- 1. megammr
def run_megammr(recipe, prompts: list[dict]) -> dict:
    from megammr.trainer import train

    import shutil
    out_dir = recipe.train.output_dir
    if os.path.isdir(out_dir):  # a checkpoint left there by an earlier run would be resumed, not rerun
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "bench-train.log")
    load_before = loadavg()
    t0 = time.perf_counter()
    rec: list[tuple[float, dict]] = []  # (wall clock at the end of each step, its metrics)
    with open(log_path, "w") as logf, contextlib.redirect_stdout(logf):
        train(recipe, on_step=[lambda m: rec.append((time.perf_counter(), dict(m)))])
    total = time.perf_counter() - t0
    per, n = recipe.train.prompts_per_step, recipe.rollout.n
    longest = max(len(p["ids"]) for p in prompts)
    steps, prev = [], t0
    for i, (t, m) in enumerate(rec):
        response = m.get("response/length_mean", 0.0) * m.get("samples", 0)
        row = {"step": m.get("step", i + 1), **{f"{k}_s": m.get(f"time/{k}") for k in STAGES},
               "step_s": m.get("time/step"), "wall_s": t - prev,
               "generated_tokens": response, "samples": m.get("samples"),
               "prompt_tokens": sum(len(p["ids"]) for p in prompts[i * per:(i + 1) * per]) * n}
        row["other_s"] = (row["step_s"] - sum(row[f"{k}_s"] or 0.0 for k in STAGES)) if row["step_s"] else None
        # The trainer counts prompt tokens per kept sample (a dropped empty response removes one prompt):
        # equal to ours up to that, so the trainer saw exactly the prompts this benchmark gave the others.
        tps = m.get("tokens_per_s")
        seen = round(tps * row["step_s"] - response) if (tps is not None and row["step_s"]) else None
        dropped = per * n - (row["samples"] or 0)
        row["prompts_match"] = seen is None or 0 <= row["prompt_tokens"] - seen <= dropped * longest
        steps.append(row)
        prev = t
    return {"steps": steps, "run_s": round(total, 2), "log": log_path, "loadavg": [load_before, loadavg()]}


# 2. model compute: megammr/bench/compute.py; 3. TRL in a subprocess: megammr/bench/yardstick.py


# ----------------------------------------------------------------------------- report
def _overhead(rows: list[dict], step_key: str, gen_key: str, compute: list[dict]) -> Optional[dict]:
    """Median over steps of step - generation - compute (compute paired by round and step index)."""
    comp = {(c["round"], c["index"]): c["total_s"] for c in compute}
    over, share = [], []
    for r in rows:
        c = comp.get((r["round"], r["index"]))
        if c is None or r.get(step_key) is None or r.get(gen_key) is None:
            continue
        o = r[step_key] - r[gen_key] - c
        over.append(o)
        share.append(o / r[step_key])
    if not over:
        return None
    return {"seconds": median(over), "share": median(share), "step": step_key}


def _overhead_by_parts(rows: list[dict], direct: list[dict], path: list[dict], med: dict) -> Optional[dict]:
    """The framework's own parts, each measured directly: the step's non-model stages (rewards, weight
    sync, data/advantages/batching, metric reduction and logging) from the trainer's metrics, plus the
    extra time of the trainer's train-side code path over direct model calls, measured alternately."""
    stages = [(r["reward_s"] or 0) + (r["sync_s"] or 0) + (r["other_s"] or 0) +
              ((r["wall_s"] - r["step_s"]) if r.get("wall_s") is not None else 0.0) for r in rows if r.get("step_s")]
    d = {(c["round"], c["index"]): c["total_s"] for c in direct}
    extra = [p["total_s"] - d[(p["round"], p["index"])] for p in path if (p["round"], p["index"]) in d]
    if not stages:
        return None
    wall = med["wall_s"] if med["wall_s"] is not None else med["step_s"]
    s, e = median(stages), (median(extra) if extra else None)
    total = s + (e or 0.0)
    return {"stages_s": s, "train_path_extra_s": e, "seconds": total, "share": total / wall if wall else None,
            "pairs": len(extra)}


def build_report(args, recipe, rounds: list[dict]) -> dict:
    def measured(rows):
        return [r for r in rows if r["index"] >= 0]

    def tag(rows, k, offset):
        return [dict(r, round=k, index=i - offset) for i, r in enumerate(rows)]

    mm_rows, trl_rows, comp = [], [], {"megatron": [], "hf": [], "hf_under_cpu_mode": []}
    trl_info, errors, whats, engine_rows, path_rows = None, [], {}, [], []
    for k, rd in enumerate(rounds):
        mm_rows += tag(rd["megammr"]["steps"], k, args.warmup)
        for key in comp:
            if rd.get(key):
                comp[key] += tag(rd[key]["steps"], k, 0)
                whats[key] = rd[key]["what"]
        if (rd.get("megatron") or {}).get("trainer_path"):
            path_rows += tag(rd["megatron"]["trainer_path"]["steps"], k, 0)
        w = rd.get("worker") or {}
        if "error" in w:
            errors.append(w)
        if w.get("engine"):
            engine_rows += [dict(r, round=k) for r in w["engine"]["steps"]]
        if w.get("trl"):
            trl_rows += tag(w["trl"]["steps"], k, args.warmup)
            trl_info = {kk: vv for kk, vv in w["trl"].items() if kk != "steps"}
    mm_m = measured(mm_rows)
    keys = [f"{s}_s" for s in STAGES] + ["other_s", "step_s", "wall_s", "generated_tokens", "prompt_tokens"]
    mm_med = {k: median(r[k] for r in mm_m) for k in keys}
    rep: dict[str, Any] = {
        "config": {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                   "micro_batch_size": args.micro_batch_size, "warmup": args.warmup, "steps": args.steps,
                   "rounds": args.rounds, "reward_workers": args.reward_workers, "data_workers": args.data_workers,
                   "kl_coef": recipe.algo.kl_coef, "precision": recipe.model.precision, "seed": args.seed,
                   "overrides": list(args.overrides), "model": recipe.model.hf_path,
                   "data": recipe.data.datasets[0].path},
        "machine": machine(),
        "overhead_definition": OVERHEAD_DEFINITION,
        "megammr": {"median": mm_med, "steps": mm_rows,
                    "prompts_match": all(r["prompts_match"] for r in mm_rows),
                    "runs": [{kk: vv for kk, vv in rd["megammr"].items() if kk != "steps"} for rd in rounds]},
        "model_compute": {key: ({"what": whats[key], "median": {c: median(r[c] for r in rows) for c in COMPUTE_KEYS},
                                 "steps": rows} if rows else None) for key, rows in comp.items()},
        "overhead": {
            "megammr": _overhead(mm_m, "step_s", "rollout_s", comp["megatron"]),
            "megammr_wall": _overhead(mm_m, "wall_s", "rollout_s", comp["megatron"]),
            "megammr_vs_hf_compute": _overhead(mm_m, "step_s", "rollout_s", comp["hf"]),
            "megammr_by_parts": _overhead_by_parts(mm_m, comp["megatron"], path_rows, mm_med),
            "trl": None},
        "engine_outside_trainer": ({"what": "megammr's TransformersEngine.generate on the same prompts in a clean "
                                            "process (no CPU compatibility mode): compare with time/rollout",
                                    "median": {k: median(r[k] for r in engine_rows)
                                               for k in ("generate_s", "generated_tokens")},
                                    "steps": engine_rows} if engine_rows else None),
        "trl": None,
        "ratio": None,
        "errors": errors,
    }
    if path_rows and rep["model_compute"]["megatron"]:
        rep["model_compute"]["megatron"]["trainer_path"] = {
            "what": "the trainer's own train-side code (forward_logprobs + train_on) on the same micro-batches, "
                    "run right after each direct step",
            "median": {k: median(r[k] for r in path_rows) for k in ("ref_forward_s", "train_s", "total_s")},
            "steps": path_rows}
    if args.no_trl:
        rep["trl"] = {"skipped": "--no-trl"}
    elif trl_rows:
        t_m = measured(trl_rows)
        t_med = {k: median(r[k] for r in t_m)
                 for k in ("wall_s", "generate_s", "reward_s", "generated_tokens", "prompt_tokens")}
        rep["trl"] = {"median": t_med, "steps": trl_rows, **(trl_info or {})}
        rep["overhead"]["trl"] = _overhead(t_m, "wall_s", "generate_s", comp["hf"])
        m_wall = mm_med["wall_s"] if mm_med["wall_s"] is not None else mm_med["step_s"]
        t_wall, m_tok, t_tok = t_med["wall_s"], mm_med["generated_tokens"], t_med["generated_tokens"]
        rep["ratio"] = {
            "step_megammr_over_trl": m_wall / t_wall if t_wall else None,
            "per_generated_token_megammr_over_trl":
                (m_wall / m_tok) / (t_wall / t_tok) if (t_wall and m_tok and t_tok) else None,
            "generation_megammr_over_trl":
                mm_med["rollout_s"] / t_med["generate_s"] if t_med.get("generate_s") else None,
        }
    elif not errors:
        import importlib.util
        rep["trl"] = {"skipped": "trl is not installed (pip install 'megammr[bench]')"
                      if importlib.util.find_spec("trl") is None else "not run"}
    return rep


def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_report(rep: dict, out=None) -> None:
    out = out or sys.stdout
    c, mm = rep["config"], rep["megammr"]
    m = mm["median"]

    def p(*a):
        print(*a, file=out)

    p(f"megammr bench step: {c['prompts']} prompts x {c['n']} samples x {c['max_new_tokens']} new tokens per step, "
      f"micro-batch {c['micro_batch_size']}, {c['precision']}, KL {c['kl_coef']}; medians of {c['steps']} measured "
      f"steps x {c['rounds']} round(s), {c['warmup']} warm-up steps per run")
    mc = rep["machine"]
    p(f"machine: {mc['machine']}, {mc['cpus']} CPUs, {mc['torch_threads']} torch threads, Python {mc['python']}, "
      f"torch {mc['torch']}, megatron-core {mc['megatron-core']}, transformers {mc['transformers']}, trl {mc['trl']}")
    p(f"load average (1/5/15 min) around the megammr runs: {[r['loadavg'] for r in mm['runs']]}")
    busiest = max((la[0] for r in mm["runs"] for la in r["loadavg"] if la), default=0.0)
    if mc["cpus"] and busiest > mc["cpus"]:
        p(f"WARNING: the machine was busy (1-min load average up to {busiest} on {mc['cpus']} CPUs): figures are "
          f"noisy; prefer an idle machine, more --rounds, and --threads 1 (oversubscribed OpenMP threads stall)")
    p("")
    p("megammr per stage (s per step, median)")
    rows = [("generation (time/rollout)", m["rollout_s"]), ("rewards (time/reward)", m["reward_s"]),
            ("reference log-probs (time/logprobs)", m["logprobs_s"]),
            ("megatron fwd/bwd + optimizer (time/train)", m["train_s"]), ("weight sync (time/sync)", m["sync_s"]),
            ("rest of the step (data, advantages, batching)", m["other_s"]), ("time/step", m["step_s"]),
            ("step wall (incl. metric reduction, logging)", m["wall_s"])]
    width = max(len(r[0]) for r in rows)
    for name, v in rows:
        p(f"  {name:<{width}}  {_f(v)}")
    p(f"  generated / prompt tokens per step: {_f(m['generated_tokens'], 1)} / {_f(m['prompt_tokens'], 0)}; "
      f"trainer saw the bench prompts: {mm['prompts_match']}")
    eo = rep.get("engine_outside_trainer")
    if eo:
        p(f"  the same engine outside the trainer (no CPU compatibility mode): {_f(eo['median']['generate_s'])} s "
          f"per generate call, {_f(eo['median']['generated_tokens'], 1)} tokens")
    p("")
    p("model compute (s per step, median; same prompts, max-length responses, the trainer's micro-batch shapes)")
    p(f"  {'':<17}  {'ref fwd':>8}  {'fwd+bwd':>8}  {'optim':>8}  {'total':>8}")
    for key, comp in rep["model_compute"].items():
        if comp:
            cm = comp["median"]
            p(f"  {key:<17}  {_f(cm['ref_forward_s']):>8}  {_f(cm['forward_backward_s']):>8}  "
              f"{_f(cm['optimizer_s']):>8}  {_f(cm['total_s']):>8}")
    p("")
    o = rep["overhead"]
    p("framework overhead = step - (generation + model compute), median per step")
    bp = o.get("megammr_by_parts")
    if bp:
        p(f"  {'megammr, by parts (see below)':<38} {_f(bp['seconds']):>7} s  {_pct(bp['share']):>7}   = stages "
          f"{_f(bp['stages_s'])} s + trainer train path over direct calls {_f(bp['train_path_extra_s'])} s")
    for key, label in (("megammr", "megammr: time/step, megatron compute"),
                       ("megammr_wall", "megammr: step wall, megatron compute"),
                       ("megammr_vs_hf_compute", "megammr: time/step, HF compute"),
                       ("trl", "TRL: step wall, HF compute")):
        if o.get(key):
            p(f"  {label:<38} {_f(o[key]['seconds']):>7} s  {_pct(o[key]['share']):>7}")
    p("")
    t = rep["trl"]
    if t is None or "median" not in t:
        p(f"TRL: {(t or {}).get('skipped') or 'failed'}")
    else:
        tm, r = t["median"], rep["ratio"]
        p(f"side by side (s per step, median)     {'megammr':>9}  {'TRL':>9}  {'megammr/TRL':>11}")
        mw = m["wall_s"] if m["wall_s"] is not None else m["step_s"]
        p(f"  step (wall, end to end)             {_f(mw):>9}  {_f(tm['wall_s']):>9}  "
          f"{_f(r['step_megammr_over_trl'], 2):>11}")
        p(f"  generation                          {_f(m['rollout_s']):>9}  {_f(tm['generate_s']):>9}  "
          f"{_f(r['generation_megammr_over_trl'], 2):>11}")
        p(f"  rewards                             {_f(m['reward_s']):>9}  {_f(tm['reward_s']):>9}")
        p(f"  generated tokens                    {_f(m['generated_tokens'], 1):>9}  "
          f"{_f(tm['generated_tokens'], 1):>9}")
        p(f"  prompt tokens                       {_f(m['prompt_tokens'], 0):>9}  {_f(tm['prompt_tokens'], 0):>9}")
        p(f"  step time per generated token       {'':>9}  {'':>9}  "
          f"{_f(r['per_generated_token_megammr_over_trl'], 2):>11}")
    for e in rep["errors"]:
        p(f"worker error: {e['error']}")
    p("")
    p("definition: " + rep["overhead_definition"])
    p("by parts: rewards + weight sync + rest of the step + metric reduction/logging (trainer metrics) + the "
      "trainer's forward_logprobs/train_on minus direct model calls on the same micro-batches, run alternately; "
      "robust to machine load, unlike the subtraction of separately measured medians.")


# ----------------------------------------------------------------------------- entry points
def run(args) -> int:
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        raise SystemExit("megammr bench step: --warmup, --steps and --rounds must be >= 1 (the first step is cold)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("megammr bench step: runs in one process (world size 1); not under torchrun")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if min(args.prompts, args.n, args.max_new_tokens, args.micro_batch_size) < 1:
        raise SystemExit("megammr bench step: --prompts, --n, --max-new-tokens and --micro-batch-size must be >= 1")
    import importlib.util
    trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    if trl and (args.n < 2 or (args.prompts * args.n) % args.micro_batch_size):
        raise SystemExit("megammr bench step: TRL needs --n >= 2 and --prompts x --n divisible by "
                         "--micro-batch-size (gradient accumulation over whole steps); or pass --no-trl")
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="megammr-bench-step-"))
        os.makedirs(work, exist_ok=True)
        model, data = _prepare_inputs(args, work)
        recipe = _recipe(args, model, data, os.path.join(work, "megammr-run"))
        total = args.warmup + args.steps
        per = recipe.train.prompts_per_step
        prompts = _bench_prompts(recipe, per * total)
        objects = _bench_micro_batches(recipe, [prompts[i * per:(i + 1) * per] for i in range(args.warmup, total)])
        batches = _as_dicts(objects)
        rounds = []
        for k in range(args.rounds):
            tag = f"round {k + 1}/{args.rounds}: "
            rd: dict[str, Any] = {}
            r_k = _recipe(args, model, data, os.path.join(work, f"megammr-run-{k}"))
            print(tag + f"megammr trainer, {total} steps ...", file=sys.stderr, flush=True)
            rd["megammr"] = run_megammr(r_k, prompts)
            print(tag + "megatron model compute ...", file=sys.stderr, flush=True)
            rd["megatron"] = megatron_compute(r_k, batches, objects)
            if k == 0 and not args.no_hf_compute and compat_mode_active():
                # Diagnostic: transformers' model under megammr's CPU compatibility layer (which the
                # trainer's rollout engine runs under), against the clean figure from the worker.
                print(tag + "HF model compute under megammr's CPU mode ...", file=sys.stderr, flush=True)
                rd["hf_under_cpu_mode"] = hf_compute(compute_params(r_k), batches)
            if trl or not args.no_hf_compute:
                print(tag + ("HF model compute + " if not args.no_hf_compute else "") +
                      ("TRL GRPOTrainer " if trl else "") + "(subprocess) ...", file=sys.stderr, flush=True)
                rd["worker"] = run_worker(args, r_k, prompts, batches, os.path.join(work, f"worker-{k}"),
                                          trl=trl, hf=not args.no_hf_compute)
                rd["hf"] = rd["worker"].get("hf")
            rounds.append(rd)
        rep = build_report(args, recipe, rounds)
        print_report(rep)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rep, f, indent=2, default=str)
    for e in rep["errors"]:
        print(f"megammr bench step: worker failed: {e['error']}\n{e.get('log_tail', '')}", file=sys.stderr)
    return 1 if rep["errors"] else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m megammr.bench.step")
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
