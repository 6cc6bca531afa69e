"""`megammr bench TARGET`: benchmarks live in code; their latest figures go to BENCHMARKS.md.

Each target is a module megammr.bench.<target> with `add_arguments(parser)` and `run(args)`.
"""
from __future__ import annotations

import argparse
import importlib

TARGETS = {
    "kernels": "fused log-prob / entropy / KL / GRPO-loss kernels vs naive torch (memory; GPU: time)",
    "data": "loader throughput with image decode and preprocessing vs plain webdataset",
    "rewards": "verifications per second and latency of the reward pool",
    "step": "one GRPO step on the tiny model: per-stage times, framework overhead, TRL GRPOTrainer side by side",
    "curriculum": "the README's first command (tiny curriculum from nothing): wall and CPU time, where it went, reward rise",
    "gpu-step": "GPU: train step of a 3B-shaped model (bf16, fp8 with TE): tokens/s, stage times, MFU, weight sync; vLLM rollouts",
}


def add_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, help_ in TARGETS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(f"megammr.bench.{name.replace('-', '_')}").add_arguments(sp)


def run(args) -> int:
    return int(importlib.import_module(f"megammr.bench.{args.target.replace('-', '_')}").run(args) or 0)
