"""`megammr plan RECIPE [key=value ...] [--gpus-per-node 8] [--nodes N] [--gpu-mem-gib 80] [--json]`:
per-rank memory of one training step and of the rollout, whether it fits, and (re-planned, not
guessed) the one or two recipe changes that make it fit. The figures are megammr.plan's."""
from __future__ import annotations

import json
import sys

from megammr import plan as planner
from megammr.config import TOOLS, RecipeError, load_recipe

GIB = planner.GIB


def add_arguments(p):
    p.add_argument("recipe", help="recipe YAML (may use extends:)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="typed overrides, applied last")
    p.add_argument("--gpus-per-node", type=int, default=TOOLS.plan_gpus_per_node, metavar="G",
                   help=f"GPUs per node (default {TOOLS.plan_gpus_per_node})")
    p.add_argument("--nodes", type=int, default=None, metavar="N",
                   help="nodes (default: the fewest the recipe's tp x pp and prompt split accept)")
    p.add_argument("--gpu-mem-gib", type=float, default=TOOLS.plan_gpu_mem_gib, metavar="GIB",
                   help=f"memory of one GPU in GiB (default {TOOLS.plan_gpu_mem_gib:g})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes; the same numbers)")


def _g(x: float) -> str:
    return f"{x / GIB:8.2f}"


def table(path: str, p: dict, fixes: list[dict]) -> str:
    t, ro = p["train"], p["rollout"]
    opt = "distributed optimizer" if p["distributed_optimizer"] else "optimizer not distributed"
    lines = [
        f"megammr plan {path}: {p['backbone']} ({p['parameters'] / 1e9:.2f} B params) on {p['gpus']} GPUs "
        f"({p['nodes']} x {p['gpus_per_node']}) of {p['gpu_mem'] / GIB:g} GiB",
        f"layout tp={p['tp']} pp={p['pp']} dp={p['dp']}, {p['precision']}, {opt}; micro-batch "
        f"{p['micro_batch_tokens']} tokens (longest sequence {p['max_sequence_tokens']})",
        f"per rank, largest stage ({t['stage']} of {p['pp']}: {t['params'] / 1e9:.3f} B params){'GiB':>17s}",
        f"  weights ({p['precision']}, tp shard{' + vision tower' if t['stage'] == 0 else ''})".ljust(58)
        + _g(t["weights"]),
        "  gradients (fp32 main-grad buffer)".ljust(58) + _g(t["grads"]),
        (f"  optimizer (fp32 master + 2 Adam moments{', / dp ' + str(p['dp']) if p['distributed_optimizer'] else ''})"
         .ljust(58) + _g(t["optimizer"])),
        ("  reference model (algo.kl_coef > 0, not offloaded)".ljust(58) + _g(t["reference"])
         if p["reference_model"] else "  reference model: none (algo.kl_coef = 0)".ljust(58) + _g(0)),
        f"  activations ({p['layers_per_stage']} layers x {t['micro_batches_in_flight']} micro-batch"
        f"{'es' if t['micro_batches_in_flight'] > 1 else ''} in flight)".ljust(58) + _g(t["activations"]),
        "  logits + log-prob buffers (on the last stage)".ljust(58) + _g(t["logits"]),
        "  = training step".ljust(58) + _g(t["train_total"])
        + ("   fits" if p["train_short_by"] == 0 else f"   over by {p['train_short_by'] / GIB:.2f}"),
        f"rollout ({ro['engine']}{', tp=' + str(ro['tp']) if 'tp' in ro else ''})",
        (f"  trainer resident (weights, reference{'' if ro['offload_during_rollout'] else ', grads, optimizer'})"
         .ljust(58) + _g(ro["trainer_resident"])),
        (f"  train.offload_during_rollout: {'on, frees' if ro['offload_during_rollout'] else 'off, would free'}"
         .ljust(58) + _g(ro["offload_frees"])),
    ]
    if "vllm_claim" in ro:
        lines += [
            f"  vLLM claim (gpu_memory_utilization {ro['gpu_memory_utilization']:g})".ljust(58) + _g(ro["vllm_claim"]),
            f"    of which vLLM weights (tp {ro['tp']})".ljust(58) + _g(ro["vllm_weights"]),
            f"    of which KV cache ({ro['kv_bytes_per_token'] / 1024:g} KiB/token): {ro['kv_tokens']} tokens"
            f" = {ro['kv_sequences']} longest sequences".ljust(58) + _g(max(ro["kv_budget"], 0)),
        ]
    else:
        lines.append(f"  {ro['note']}")
    lines.append("  = rollout".ljust(58) + _g(ro["total"])
                 + ("   fits" if p["rollout_short_by"] == 0 else f"   over by {p['rollout_short_by'] / GIB:.2f}"))
    if p["fits"]:
        lines.append(f"verdict: fits (training {t['train_total'] / GIB:.1f}, rollout {ro['total'] / GIB:.1f} "
                     f"of {p['gpu_mem'] / GIB:g} GiB)")
    else:
        lines.append(f"verdict: does not fit by {p['short_by'] / GIB:.2f} GiB")
        for f in fixes:
            verdict = "fits" if f["fits"] else f"still short by {f['short_by'] / GIB:.2f} GiB"
            lines.append(f"  with {' '.join(f['changes'])}: training {f['train_total'] / GIB:.1f}, rollout "
                         f"{f['rollout_total'] / GIB:.1f} GiB -> {verdict}")
        if not fixes:
            lines.append("  no change tried (distributed optimizer, offload, smaller micro-batch, lower "
                         "gpu_memory_utilization, more PP) helps: use more GPUs or a larger tp")
    lines.append(f"activations: {p['activation_formula']}")
    lines.append(f"not counted: {p['not_counted']}")
    return "\n".join(lines) + "\n"


def _error(msg: str) -> int:
    print(f"megammr plan: error: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    if args.gpus_per_node < 1:
        return _error(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    if args.nodes is not None and args.nodes < 1:
        return _error(f"--nodes must be >= 1, got {args.nodes}")
    if not args.gpu_mem_gib > 0:
        return _error(f"--gpu-mem-gib must be > 0, got {args.gpu_mem_gib}")
    try:
        r = load_recipe(args.recipe, args.overrides)
        nodes = args.nodes or planner.min_nodes(r, args.gpus_per_node)
        if nodes is None:
            return _error(f"no node count of {args.gpus_per_node} GPUs fits tp x pp x cp = "
                          f"{r.parallel.tp * r.parallel.pp * r.parallel.cp} and train.prompts_per_step")
        hw = planner.Hardware(args.gpus_per_node, nodes, args.gpu_mem_gib)
        load_recipe(args.recipe, args.overrides, world_size=hw.world_size)  # the trainer's layout rules
        p = planner.plan(r, hw)
        fixes = [] if p["fits"] else planner.suggest(args.recipe, args.overrides, hw, p)
    except RecipeError as e:
        return _error("; ".join(e.errors))
    except OSError as e:
        return _error(f"{args.recipe}: {e.strerror or e}")
    if args.json:
        print(json.dumps(dict(p, recipe=args.recipe, overrides=list(args.overrides), fixes=fixes), indent=1))
    else:
        sys.stdout.write(table(args.recipe, p, fixes))
    return 0
