#!/usr/bin/env python
"""Qwen2.5-VL checkpoint conversion between HF safetensors and megatron-core torch_dist.

    python tools/convert_checkpoint.py hf-to-mcore --hf HF_DIR --out CKPT_DIR
    python tools/convert_checkpoint.py mcore-to-hf --ckpt CKPT_DIR --out HF_DIR [--hf-config DIR]
    python tools/convert_checkpoint.py check --hf HF_DIR --ckpt CKPT_DIR [--tp N] [--pp M] [--tol 1e-4]

Conversion streams tensor groups (peak memory near the largest group, see BENCHMARKS.md) and
the torch_dist checkpoint loads at any TP/PP. `check` launches torchrun itself (gloo on CPU, N*M
processes), runs the Megatron model loaded from CKPT_DIR and transformers' model from HF_DIR on
random text and text+image inputs in float32, prints the max absolute logit difference and exits
non-zero above --tol. Logic lives in megammr.models.convert / megammr.models.parity.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing_processor_files(d):
    """What `from_pretrained` of a Qwen2.5-VL processor needs and `d` lacks."""
    missing = [] if os.path.exists(os.path.join(d, "preprocessor_config.json")) else ["preprocessor_config.json"]
    if not any(os.path.exists(os.path.join(d, f)) for f in ("tokenizer.json", "vocab.json")):
        missing.append("tokenizer.json")
    return missing


def check(hf, ckpt, tp, pp, tol):
    # The workers run from the repository root: hand them absolute paths.
    hf, ckpt = os.path.abspath(hf), os.path.abspath(ckpt)
    for what, path in (("--hf", hf), ("--ckpt", ckpt)):
        if not os.path.isdir(path):
            print(f"check: {what} {path} is not a directory", file=sys.stderr)
            return 2
    missing = _missing_processor_files(hf)
    if missing:
        print(f"check: --hf {hf} lacks {', '.join(missing)}: check tokenises a chat prompt and preprocesses "
              "images with the HF directory's tokenizer and processor; copy them from the original model",
              file=sys.stderr)
        return 2
    # Layout and checkpoint/config agreement are checked here, not in N*M workers whose errors
    # would drown in torchrun's output.
    from megammr.models.convert import McoreReader, check_against_config
    from megammr.models.mapping import HFReader, hf_shapes
    from megammr.models.vlm import check_parallel_layout
    bb = HFReader(hf).backbone
    check_parallel_layout(bb, tp, pp)
    check_against_config(McoreReader(ckpt), bb, hf_shapes(bb), os.path.join(hf, "config.json"))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp * pp}", f"--master-port={_free_port()}",
               "--master-addr=127.0.0.1", "-m", "megammr.models.parity", "--hf", hf, "--ckpt", ckpt,
               "--tp", str(tp), "--pp", str(pp), "--out", out]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if p.returncode != 0 or not os.path.exists(out):
            sys.stderr.write((p.stdout + p.stderr)[-6000:])
            print(f"check failed to run (torchrun exit {p.returncode})", file=sys.stderr)
            return 2
        res = json.load(open(out))
    worst = max(c["max_abs_diff"] for c in res["cases"].values())
    for name, c in res["cases"].items():
        print(f"{name:14s} seq={c['seq']:4d} images={c['n_images']} max_abs_logit_diff={c['max_abs_diff']:.3e}")
    print(f"TP={tp} PP={pp} max abs logit diff {worst:.3e} (tolerance {tol:g}): {'OK' if worst <= tol else 'FAIL'}")
    return 0 if worst <= tol else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors (sharded or not) -> torch_dist checkpoint")
    a.add_argument("--hf", required=True)
    a.add_argument("--out", required=True)
    b = sub.add_parser("mcore-to-hf", help="torch_dist checkpoint -> HF safetensors + config/tokenizer/processor")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--hf-config", default=None, help="HF dir for config/tokenizer if the checkpoint lacks its hf/ folder")
    b.add_argument("--max-shard-mb", type=int, default=512)
    c = sub.add_parser("check", help="logit parity of CKPT (Megatron, TP x PP) against HF (transformers)")
    c.add_argument("--hf", required=True)
    c.add_argument("--ckpt", required=True)
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size (must divide heads, kv heads, vocab)")
    c.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (must divide the decoder layers)")
    c.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    from megammr.models.checkpoint_io import CheckpointError
    try:
        if args.cmd == "hf-to-mcore":
            from megammr.models.convert import hf_to_mcore
            print(json.dumps(hf_to_mcore(args.hf, args.out)))
        elif args.cmd == "mcore-to-hf":
            from megammr.models.convert import mcore_to_hf
            print(json.dumps(mcore_to_hf(args.ckpt, args.out, args.hf_config, args.max_shard_mb * 2**20)))
            missing = _missing_processor_files(args.out)
            if missing:
                print(f"warning: {args.out} has no {', '.join(missing)} (the checkpoint carried none): "
                      "the model loads, the processor does not; pass --hf-config DIR with them", file=sys.stderr)
        else:
            return check(args.hf, args.ckpt, args.tp, args.pp, args.tol)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
