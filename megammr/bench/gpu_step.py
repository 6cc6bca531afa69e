"""`megammr bench gpu-step`: the GPU train step of a real model shape (3B by default), random weights.

One process, one GPU (world size 1). For each precision (bf16; fp8 when transformer-engine and an
FP8 GPU are present) it builds the backbone's Megatron model with random weights, megatron's
optimizer, and --micro-batches text micro-batches of --micro-batch-size x --seq tokens (a quarter
prompt, the rest response, random ids), then times per step, after --warmup untimed steps:

  logprobs   the trainer's forward-only log-prob pass (megammr.train.step.forward_logprobs: what the
             reference / old-policy passes cost)
  train      the trainer's update (megammr.train.step.train_on: megatron forward/backward schedule,
             fused GRPO loss, optimizer step with clipping)
  sync       megammr.train.sync.WeightSync of the whole model in --bucket-mb buckets into a sink
             that holds each bucket on the GPU (gather + convert + hand-over; what vLLM's
             load_weights adds is measured by the vLLM part)

and reports tokens/s of the train stage and its MFU: model FLOPs per token = 6 N + 6 L h s
(N = decoder + output-layer matmul weights, attention score and value products with causal
masking, L layers, h hidden, s sequence length) over the GPU's dense peak (--peak-tflops, or the
table below by device name; FP8 is reported against the bf16 peak too, so the two compare).

With vLLM installed (--vllm), the colocated engine is built first for the same shape (dummy
weights, max_images 0), synced from the Megatron model, and generates --vllm-prompts x --vllm-n
samples of --vllm-tokens tokens: rollout tokens/s and the sync's load time into vLLM.

Goals (issue 12): bf16 MFU >= 45% on an H100-class GPU, FP8 >= 1.3x bf16 step throughput, 3B weight
sync < 2 s. --backbone tiny --allow-cpu runs the same code on the CPU (a test of the plumbing only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Optional

from megammr.rollout.base import WeightTarget

# Dense tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's datasheets, by device-name substring.
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp8": 1979.0}, "H100": {"bf16": 989.0, "fp8": 1979.0},
               "A100": {"bf16": 312.0, "fp8": None}, "B200": {"bf16": 2250.0, "fp8": 4500.0}}


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--backbone", default="qwen2.5-vl-3b", help="backbones table name (random weights)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the backbone's)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence (prompt + response)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per update")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--precisions", default="bf16,fp8", help="comma list of bf16, fp8 (fp8 skipped without TE)")
    p.add_argument("--spec", choices=("auto", "te", "local"), default="auto",
                   help="layer spec: auto = te when transformer-engine imports, else local")
    p.add_argument("--fp8-recipe", default="tensorwise")
    p.add_argument("--bucket-mb", type=int, default=512, help="weight-sync bucket size (train.sync_bucket_mb)")
    p.add_argument("--no-sync", action="store_true", help="skip the weight-sync timing")
    p.add_argument("--vllm", action="store_true", help="also time vLLM rollouts (needs vllm)")
    p.add_argument("--vllm-prompts", type=int, default=64)
    p.add_argument("--vllm-n", type=int, default=8)
    p.add_argument("--vllm-tokens", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak for MFU (default: by device name)")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU (tiny shapes: tests the plumbing)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this JSON file")


def train_flops_per_token(bb, seq: int) -> float:
    """6 N + 6 L h s: forward + backward matmuls of the decoder and output layer, plus causal attention."""
    h, L = bb.hidden_size, bb.num_layers
    kv = bb.head_dim * bb.num_kv_heads
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * bb.intermediate_size
    n = L * per_layer + bb.vocab_size * h
    return 6.0 * n + 6.0 * L * h * seq


def peak_tflops(device_name: Optional[str], override: Optional[float]) -> Optional[float]:
    if override:
        return override
    for key, v in PEAK_TFLOPS.items():
        if device_name and key in device_name:
            return v["bf16"]
    return None


def _sync_dev():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _micro_batches(bb, args, seed: int):
    import torch

    from megammr.train.batching import Sample, make_micro_batches
    g = torch.Generator().manual_seed(seed)
    p = max(1, args.seq // 4)
    samples = []
    for _ in range(args.micro_batch_size * args.micro_batches):
        ids = torch.randint(0, bb.vocab_size, (args.seq + 1,), generator=g).tolist()
        r = len(ids) - p
        samples.append(Sample(ids[:p], ids[p:], float(torch.randn((), generator=g)),
                              (-torch.rand(r, generator=g)).tolist()))
    return make_micro_batches(samples, bb, pad_id=0, micro_batch_size=args.micro_batch_size)


class _GpuSink(WeightTarget):
    """A weight-sync target that keeps each bucket on the device (what an engine's load reads)."""

    def __init__(self):
        self.tensors = self.bytes = 0

    def update_weights(self, named) -> int:
        for _, t in named:
            self.tensors += 1
            self.bytes += t.numel() * t.element_size()
        return len(named)


def _median(xs):
    return float(statistics.median(xs)) if xs else None


def measure(args, bb, spec: str, precision: str, device_name: Optional[str]) -> dict:
    import torch

    from megammr.config import load_recipe
    from megammr.models.vlm import build_model
    from megammr.train import setup
    from megammr.train.step import forward_logprobs, train_on
    from megammr.train.sync import WeightSync

    r = load_recipe(None, [f"model.layer_spec={spec}", f"model.precision={precision}",
                           f"model.fp8_recipe={args.fp8_recipe}", "optim.lr=1e-7", "algo.kl_coef=0"])
    module = build_model(bb, r.model, perform_initialization=True)
    if torch.cuda.is_available():
        module.cuda()
    module.config.calculate_per_token_loss = True
    ddp, opt, _ = setup.build_optimizer(r, module)
    times = {"logprobs": [], "train": [], "sync": []}
    tokens = args.seq * args.micro_batch_size * args.micro_batches
    sync = None if args.no_sync else WeightSync(module, _GpuSink(), args.bucket_mb)
    skipped = 0
    for step in range(args.warmup + args.steps):
        mbs = _micro_batches(bb, args, seed=step)
        _sync_dev()
        t0 = time.perf_counter()
        forward_logprobs(ddp, mbs, 1.0)
        _sync_dev()
        t1 = time.perf_counter()
        u = train_on(ddp, opt, mbs, r.algo, 1.0)
        _sync_dev()
        t2 = time.perf_counter()
        if sync is not None:
            sync.sync()
            _sync_dev()
        t3 = time.perf_counter()
        if step >= args.warmup:
            times["logprobs"].append(t1 - t0)
            times["train"].append(t2 - t1)
            if sync is not None:
                times["sync"].append(t3 - t2)
            skipped += bool(u.skipped)
    med = {k: _median(v) for k, v in times.items()}
    flops = train_flops_per_token(bb, args.seq)
    peak = peak_tflops(device_name, args.peak_tflops)
    tps = tokens / med["train"] if med["train"] else None
    out = {"precision": precision, "spec": spec, "tokens_per_step": tokens, "median_s": med,
           "train_tokens_per_s": tps, "train_tflops": tps * flops / 1e12 if tps else None,
           "mfu_vs_bf16_peak": (tps * flops / 1e12 / peak) if (tps and peak) else None,
           "skipped_updates": skipped,
           "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None}
    if sync is not None:
        out["sync_timings"] = asdict(sync.timings)
        out["sync_gib"] = sync.engine.bytes / 2**30 / max(1, len(times["sync"]) + args.warmup)
    del ddp, opt, module
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def _fp8_skip_reason(spec: str, fp8_recipe: str) -> Optional[str]:
    import torch

    from megammr.models import te
    if spec != "te":
        return "fp8 needs the TE layer spec (transformer-engine not importable)"
    probs = te.fp8_problems(fp8_recipe, te.te_version(),
                            torch.cuda.get_device_capability() if torch.cuda.is_available() else None,
                            torch.version.cuda)
    return "; ".join(probs) or None


def _te_importable() -> bool:
    try:
        from megammr.models.te import require_te
        require_te()
        return True
    except RuntimeError:
        return False


def run_vllm(args, bb, device_name) -> dict:
    """Rollout tokens/s of the colocated vLLM engine at this shape (text prompts, dummy weights synced
    from a random Megatron model)."""
    import tempfile

    import torch

    from megammr.rollout.vllm_engine import EngineUnavailable, vllm_version
    if vllm_version() is None:
        return {"skipped": 'vllm is not installed (pip install -e ".[gpu]")'}
    from megammr import runtime
    from megammr.config import ModelConfig, load_recipe
    from megammr.models.tiny import write_tiny_model
    from megammr.models.vlm import build_model
    from megammr.rollout import RolloutPrompt, SamplingParams
    from megammr.rollout.vllm_engine import VLLMEngine
    from megammr.train.sync import WeightSync

    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as d:
        # The shape's config.json over the tiny checkpoint's tokenizer files: vLLM's dummy load needs
        # no weights, and text-only prompts never meet the tokenizer's smaller vocabulary.
        write_tiny_model(d, seed=0)
        for f in os.listdir(d):
            if f.endswith(".safetensors") or f.endswith(".index.json"):
                os.remove(os.path.join(d, f))
        cfg = bb.to_hf_config()
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        r = load_recipe(None, [f"model.hf_path={d}", "model.precision=bf16", "rollout.engine=vllm",
                               "rollout.max_images=0", f"rollout.max_new_tokens={args.vllm_tokens}",
                               "data.max_prompt_tokens=512", "rollout.gpu_memory_utilization=0.5"])
        rt = runtime.init(r)
        try:
            eng = VLLMEngine.build(r, rt, group=None, leader=0, is_leader=True)
        except EngineUnavailable as e:
            return {"skipped": str(e)}
        module = build_model(bb, ModelConfig(layer_spec="local", precision="bf16"), perform_initialization=True).cuda()
        sync = WeightSync(module, eng, args.bucket_mb)
        t = sync.sync()
        prompts = [RolloutPrompt(text=f"<|im_start|>user\nCount to {i}.<|im_end|>\n<|im_start|>assistant\n")
                   for i in range(args.vllm_prompts)]
        sp = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=args.vllm_tokens, seed=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ros = eng.generate(prompts, args.vllm_n, sp)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        eng.finish_rollouts()
        toks = sum(len(ro.token_ids) for ro in ros)
        return {"rollout_tokens": toks, "rollout_s": dt, "rollout_tokens_per_s": toks / dt, "sync_into_vllm": asdict(t)}


def run(args) -> int:
    import torch

    from megammr.backbones import get_backbone
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("megammr bench gpu-step: needs CUDA (no GPU is visible); on the CPU use `megammr bench step`",
              file=sys.stderr)
        return 2
    from megammr import runtime
    from megammr.config import load_recipe
    bb = get_backbone(args.backbone)
    if args.layers:
        bb = bb.replace(num_layers=args.layers)
    spec = args.spec if args.spec != "auto" else ("te" if _te_importable() else "local")
    runtime.init(load_recipe(None, []))
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report = {"machine": {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
                          "te": _version("transformer-engine"), "vllm": _version("vllm"),
                          "megatron-core": _version("megatron-core")},
              "shape": {"backbone": args.backbone, "layers": bb.num_layers, "hidden": bb.hidden_size,
                        "seq": args.seq, "micro_batch_size": args.micro_batch_size,
                        "micro_batches": args.micro_batches, "flops_per_token": train_flops_per_token(bb, args.seq),
                        "peak_bf16_tflops": peak_tflops(device_name, args.peak_tflops)},
              "results": []}
    if args.vllm:  # first: vLLM claims its memory before Megatron allocates
        report["vllm"] = run_vllm(args, bb, device_name)
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        reason = _fp8_skip_reason(spec, args.fp8_recipe) if precision == "fp8" else None
        if reason:
            report["results"].append({"precision": precision, "skipped": reason})
            continue
        report["results"].append(measure(args, bb, spec, precision, device_name))
    res = {x["precision"]: x for x in report["results"] if "skipped" not in x}
    if "bf16" in res and "fp8" in res:
        report["fp8_speedup"] = res["fp8"]["train_tokens_per_s"] / res["bf16"]["train_tokens_per_s"]
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    runtime.shutdown()
    return 0


def _version(name: str) -> Optional[str]:
    import importlib.metadata as md
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def print_report(rep: dict, out=None) -> None:
    out = out or sys.stdout
    sh, m = rep["shape"], rep["machine"]
    print(f"megammr bench gpu-step: {sh['backbone']} ({sh['layers']} layers), {sh['micro_batches']} x "
          f"{sh['micro_batch_size']} x {sh['seq']} tokens per update on {m['device'] or 'CPU'} "
          f"(bf16 peak {_f(sh['peak_bf16_tflops'], '{:.0f}')} TFLOP/s)", file=out)
    print(f"{'precision':<10}{'spec':<7}{'logprobs s':>11}{'train s':>9}{'sync s':>8}{'tok/s':>10}"
          f"{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}", file=out)
    for x in rep["results"]:
        if "skipped" in x:
            print(f"{x['precision']:<10}skipped: {x['skipped']}", file=out)
            continue
        med = x["median_s"]
        print(f"{x['precision']:<10}{x['spec']:<7}{_f(med['logprobs']):>11}{_f(med['train']):>9}{_f(med['sync']):>8}"
              f"{_f(x['train_tokens_per_s'], '{:.0f}'):>10}{_f(x['train_tflops'], '{:.1f}'):>9}"
              f"{_f(x['mfu_vs_bf16_peak'] and 100 * x['mfu_vs_bf16_peak'], '{:.1f}%'):>7}"
              f"{_f(x['peak_memory_gib'], '{:.1f}'):>10}", file=out)
    if "fp8_speedup" in rep:
        print(f"fp8 / bf16 train throughput: {rep['fp8_speedup']:.2f}x", file=out)
    if "vllm" in rep:
        v = rep["vllm"]
        print("vLLM: " + (f"skipped: {v['skipped']}" if "skipped" in v else
                          f"{v['rollout_tokens_per_s']:.0f} rollout tokens/s ({v['rollout_tokens']} tokens in "
                          f"{v['rollout_s']:.2f} s); sync into vLLM {v['sync_into_vllm']['total_s']:.2f} s"), file=out)
