"""`megammr bench kernels`: fused log-prob / entropy / GRPO-loss kernels against naive torch.

CPU (always): extra peak memory above the inputs of log-probs + entropy + GRPO loss, forward and
backward down to dlogits, at T=4096, V=151936, fp32, each variant in a fresh process:
    naive      log_softmax + gather, entropy from softmax, the loss in torch ops, autograd
    ours       megammr.kernels (chunked torch path on CPU) with inplace_backward
    ours-oop   the same with the gradient in a new buffer (one [T, V] copy is then unavoidable)
and the forward-only passes (old- and reference-policy log-probs under torch.no_grad()) at
temperature --temperature:
    naive-nograd  log_softmax(logits.float() / temperature) + gather, entropy from the softmax
    ours-nograd   megammr.kernels.logprobs_from_logits(..., return_entropy=True)
The child process first runs its variant once on a few rows (so that one-time first-call costs,
libtorch code paged in, are not counted), resets the kernel's peak-RSS counter
(/proc/self/clear_refs) once its inputs exist, and reports VmHWM - VmRSS at that point: every
byte the variant allocated beyond them, the gradient included. Results are compared with the
naive variant of the same mode: loss, log-probs, entropy and a slice of dlogits for training,
log-probs and entropy for the -nograd pair. Time of the one call: wall seconds, and the process's
CPU seconds (user + system over all threads), which a busy machine does not inflate.

GPU (only when CUDA is present): median ms by triton.testing.do_bench, achieved GB/s and its
fraction of the measured copy bandwidth for the from-logits kernels, TFLOP/s and fraction of the
measured bf16 matmul rate for the from-hidden path, and peak memory, side by side with naive
torch and Liger-Kernel (when importable), at T=16384, H=2048, V=151936.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

CPU_VARIANTS = ("naive", "ours", "ours-oop", "naive-nograd", "ours-nograd")
NOGRAD_SUFFIX = "-nograd"
LOSS_CFG = dict(clip_low=0.2, clip_high=0.28, kl_coef=1e-3, kl_estimator="k3", tis_cap=None, entropy_coef=1e-3,
                loss_agg="token_mean")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {x}")
    return x


def _variants(text: str) -> str:
    names = [v for v in text.split(",") if v]
    unknown = [v for v in names if v not in CPU_VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown) or repr(text)}; "
                                         f"choose from {', '.join(CPU_VARIANTS)}")
    return ",".join(names)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--tokens", "-T", type=_positive_int, default=4096, help="tokens T of the CPU memory benchmark")
    p.add_argument("--vocab", "-V", type=_positive_int, default=151936, help="vocabulary size V")
    p.add_argument("--variants", type=_variants, default=",".join(CPU_VARIANTS),
                   help=f"CPU variants, comma separated (of {', '.join(CPU_VARIANTS)})")
    p.add_argument("--temperature", type=_positive_float, default=0.7,
                   help="sampling temperature of the forward-only (-nograd) variants (training ones use 1)")
    p.add_argument("--gpu-tokens", type=_positive_int, default=16384, help="T of the GPU benchmark")
    p.add_argument("--hidden", type=_positive_int, default=2048, help="H of the GPU from-hidden benchmark")
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU part")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")


# --------------------------------------------------------------------------- CPU memory
def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def _cpu_inputs(T, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(T, V)
    logits.normal_(0.0, 3.0, generator=g)  # in place: no transient second copy before the baseline
    labels = torch.randint(0, V, (T,), generator=g)
    old = -torch.rand(T, generator=g) * 5
    ref = old + torch.randn(T, generator=g) * 0.2
    adv = torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) > 0.1
    return logits.requires_grad_(), labels, old, ref, adv, mask


def _naive(logits, labels, old, ref, adv, mask):
    from megammr.kernels.reference import naive_token_terms
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    cfg = {k: v for k, v in LOSS_CFG.items() if k not in ("entropy_coef", "loss_agg")}
    terms = naive_token_terms(logp, old, adv, ref_logp=ref, **cfg) - LOSS_CFG["entropy_coef"] * ent
    m = mask.float()
    loss = (terms * m).sum() / m.sum()
    (dlogits,) = torch.autograd.grad(loss, logits)
    return loss.detach(), logp.detach(), ent.detach(), dlogits


def _ours(logits, labels, old, ref, adv, mask, inplace):
    from megammr.kernels import grpo_loss, logprobs_from_logits
    logp, ent = logprobs_from_logits(logits, labels, 1.0, return_entropy=True, inplace_backward=inplace)
    loss, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, entropy=ent, **LOSS_CFG)
    (dlogits,) = torch.autograd.grad(loss, logits)
    return loss.detach(), logp.detach(), ent.detach(), dlogits


def _naive_nograd(logits, labels, temperature):
    with torch.no_grad():
        logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
        logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def _ours_nograd(logits, labels, temperature):
    from megammr.kernels import logprobs_from_logits
    with torch.no_grad():
        return logprobs_from_logits(logits, labels, temperature, return_entropy=True)


WARMUP_ROWS = 4


def _run_variant(variant, inputs, temperature):
    """(logp, entropy) of a -nograd variant; (loss, logp, entropy, dlogits) of a training one."""
    if variant.endswith(NOGRAD_SUFFIX):
        fn = _naive_nograd if variant == "naive-nograd" else _ours_nograd
        return fn(inputs[0], inputs[1], temperature)
    if variant == "naive":
        return _naive(*inputs)
    return _ours(*inputs, inplace=(variant == "ours"))


def _child(variant, T, V, temperature, out_path):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    inputs = _cpu_inputs(T, V)
    import megammr.kernels  # noqa: F401  (imports before the baseline, as for naive's torch)
    import megammr.kernels.reference  # noqa: F401
    # The same variant once on WARMUP_ROWS rows first: one-time costs of a process's first call
    # (libtorch code paged in on first use, about 5 MiB of file-backed RSS) are then not counted,
    # only what every call needs. Its buffers are freed before the baseline.
    _run_variant(variant, _cpu_inputs(WARMUP_ROWS, V, seed=1), temperature)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the baseline is "inputs allocated"
    base = _status()["VmRSS"]
    # Wall time counts every moment another process held the cores; on a shared machine it swings
    # by 2-3x between runs of the same variant. The process's own CPU time (user + system, all
    # threads) counts only the work done, page faults of a fresh gradient buffer included.
    c0, t0 = os.times(), time.perf_counter()
    res = _run_variant(variant, inputs, temperature)
    secs, c1 = time.perf_counter() - t0, os.times()
    cpu = dict(secs=secs, user_s=c1.user - c0.user, sys_s=c1.system - c0.system)
    peak = _status()["VmHWM"]
    if variant.endswith(NOGRAD_SUFFIX):
        logp, ent = res
        torch.save(dict(logp=logp, ent=ent, extra=peak - base, base=base, **cpu), out_path)
        return
    loss, logp, ent, dlogits = res
    torch.save(dict(loss=loss, logp=logp, ent=ent, dlogits_rows=dlogits[:16].clone(),
                    dlogits_norm=torch.linalg.vector_norm(dlogits), extra=peak - base, base=base, **cpu), out_path)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _compare(r, ref):
    """Largest relative error of a variant's results against its naive reference."""
    errs = [_rel(r["logp"], ref["logp"]), _rel(r["ent"], ref["ent"])]
    if "loss" in ref:
        errs += [_rel(r["dlogits_rows"], ref["dlogits_rows"]),
                 abs(r["loss"].item() - ref["loss"].item()) / abs(ref["loss"].item()),
                 abs(r["dlogits_norm"].item() - ref["dlogits_norm"].item()) / ref["dlogits_norm"].item()]
    return max(errs)


def run_cpu(args) -> dict:
    T, V = args.tokens, args.vocab
    temperature = getattr(args, "temperature", 0.7)
    variants = [v for v in args.variants.split(",") if v]
    input_bytes = T * V * 4
    rows, results, failed = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            path = os.path.join(tmp, f"{v}.pt")
            cmd = [sys.executable, "-m", "megammr.bench.kernels", "--child", v, str(T), str(V), repr(temperature),
                   path]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{v}: child failed (rc={p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr)
                failed.append(v)
                continue
            results[v] = torch.load(path)
    for v, r in results.items():
        nograd = v.endswith(NOGRAD_SUFFIX)
        ref_name = "naive-nograd" if nograd else "naive"
        row = dict(variant=v, mode="forward" if nograd else "train", extra_gib=r["extra"] / 2**30,
                   extra_over_logits=r["extra"] / input_bytes, seconds=r["secs"], cpu_user_s=r["user_s"],
                   cpu_sys_s=r["sys_s"])
        if nograd:
            row["temperature"] = temperature
        ref = results.get(ref_name)
        if ref is not None:
            row["ratio_vs_naive"] = ref["extra"] / max(r["extra"], 1)
            row["rel_err"] = _compare(r, ref)
        rows.append(row)
    for ref_name, nograd in (("naive", False), ("naive-nograd", True)):
        if ref_name not in results and any(v.endswith(NOGRAD_SUFFIX) == nograd for v in variants):
            print(f"{ref_name} variant missing: nothing to compare against", file=sys.stderr)
    what = {"train": "log-probs + entropy + GRPO loss, forward + backward to dlogits",
            "forward": f"log-probs + entropy under torch.no_grad(), temperature {temperature:g}"}
    for mode in ("train", "forward"):
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        print(f"\nCPU: extra peak memory above inputs (logits fp32 [{T}, {V}] = {input_bytes / 2**30:.2f} GiB), "
              f"{what[mode]}; fresh process per variant")
        print(f"{'variant':13s} {'extra GiB':>10s} {'x logits':>9s} {'naive/this':>11s} {'max rel err':>12s} "
              f"{'wall s':>7s} {'cpu s':>7s} {'of it sys':>9s}")
        for r in sel:
            print(f"{r['variant']:13s} {r['extra_gib']:10.3f} {r['extra_over_logits']:9.3f} "
                  f"{r.get('ratio_vs_naive', float('nan')):11.1f} {r.get('rel_err', float('nan')):12.2e} "
                  f"{r['seconds']:7.1f} {r['cpu_user_s'] + r['cpu_sys_s']:7.1f} {r['cpu_sys_s']:9.1f}")
    return dict(T=T, V=V, dtype="fp32", temperature=temperature, rows=rows, failed=failed, machine=_machine())


# --------------------------------------------------------------------------- GPU timing
def _ceilings():
    """Measured ceilings: device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate."""
    from triton.testing import do_bench
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    bw = 2 * src.numel() / (ms * 1e-3)
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    return bw, 2 * n**3 / (ms * 1e-3)


def _measure(fn):
    """(median ms, extra peak bytes above what was allocated before) or an 'OOM' marker."""
    from triton.testing import do_bench
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(fn, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return ms, peak


def _liger():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
        return LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except Exception:  # optional comparison only
        return None, None


def run_gpu(args) -> dict:
    from megammr.kernels import logprobs_from_hidden, logprobs_from_logits
    from megammr.kernels.reference import naive_logprobs
    T, H, V = args.gpu_tokens, args.hidden, args.vocab
    dev, bf16 = "cuda", torch.bfloat16
    bw, mm_rate = _ceilings()
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(T, V, device=dev, generator=g) * 3).to(bf16)
    labels = torch.randint(0, V, (T,), device=dev, generator=g)
    g1, g2 = torch.randn(T, device=dev, generator=g), torch.randn(T, device=dev, generator=g)
    nbytes = T * V * logits.element_size()
    rows = []

    def add(name, kind, fn, moved=None, flops=None, note=""):
        ms, peak = _measure(fn)
        r = dict(name=name, kind=kind, ms=ms, peak_gib=None if peak is None else peak / 2**30, note=note)
        if ms is not None and moved:
            r["GBps"] = moved / (ms * 1e-3) / 1e9
            r["roofline"] = moved / (ms * 1e-3) / bw
        if ms is not None and flops:
            r["TFLOPs"] = flops / (ms * 1e-3) / 1e12
            r["of_peak"] = flops / (ms * 1e-3) / mm_rate
        rows.append(r)

    # correctness on the first rows against float64, before any timing
    lp, en = logprobs_from_logits(logits, labels, 1.0, return_entropy=True)
    rl, re = naive_logprobs(logits[:256].double(), labels[:256], 1.0)
    err = max(_rel(lp[:256], rl), _rel(en[:256], re))

    x = logits.clone().requires_grad_()

    def ours_fwd(bv=None):
        with torch.no_grad():
            return logprobs_from_logits(logits, labels, 1.0, return_entropy=True, block_v=bv)

    def ours_fwd_bwd():
        a, b = logprobs_from_logits(x, labels, 1.0, return_entropy=True)
        return torch.autograd.grad((a * g1).sum() + (b * g2).sum(), x)

    def naive_fwd():
        with torch.no_grad():
            la = torch.log_softmax(logits.float(), -1)
            return la.gather(-1, labels[:, None]), -(la.exp() * la).sum(-1)

    def naive_fwd_bwd():
        la = torch.log_softmax(x.float(), -1)
        a, b = la.gather(-1, labels[:, None]).squeeze(-1), -(la.exp() * la).sum(-1)
        return torch.autograd.grad((a * g1).sum() + (b * g2).sum(), x)

    for bv in (2048, 4096, 8192):
        add(f"ours fwd BLOCK_V={bv}", "logits", lambda bv=bv: ours_fwd(bv), moved=nbytes)
    add("ours fwd+bwd", "logits", ours_fwd_bwd, moved=3 * nbytes, note="bwd out-of-place; in-place moves the same bytes")
    add("naive fwd", "logits", naive_fwd, moved=nbytes)
    add("naive fwd+bwd", "logits", naive_fwd_bwd, moved=3 * nbytes)
    ce_cls, flce_cls = _liger()
    if ce_cls is not None:
        ce = ce_cls()
        xl = logits.clone().requires_grad_()
        # Liger writes the gradient over its input in the forward; repeated runs see gradient values.
        add("liger CE fwd+bwd", "logits", lambda: torch.autograd.grad(ce(xl, labels), xl),
            moved=3 * nbytes, note="mean CE, no entropy, in-place")
    del x

    hidden = torch.randn(T, H, device=dev, generator=g).to(bf16)
    weight = (torch.randn(V, H, device=dev, generator=g) * H**-0.5).to(bf16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    f = 2 * T * H * V

    def hid_fwd():
        with torch.no_grad():
            return logprobs_from_hidden(hidden, weight, labels, 1.0, return_entropy=True)

    def hid_fwd_bwd():
        a, b = logprobs_from_hidden(h, w, labels, 1.0, return_entropy=True)
        return torch.autograd.grad((a * g1).sum() + (b * g2).sum(), (h, w))

    def hid_naive_fwd_bwd():
        la = torch.log_softmax((h @ w.t()).float(), -1)
        a, b = la.gather(-1, labels[:, None]).squeeze(-1), -(la.exp() * la).sum(-1)
        return torch.autograd.grad((a * g1).sum() + (b * g2).sum(), (h, w))

    add("ours hidden fwd", "hidden", hid_fwd, flops=f)
    add("ours hidden fwd+bwd", "hidden", hid_fwd_bwd, flops=3 * f, note="useful 6THV; runs 8THV (recompute)")
    add("naive hidden fwd+bwd", "hidden", hid_naive_fwd_bwd, flops=3 * f)
    if flce_cls is not None:
        flce = flce_cls()
        add("liger FLCE fwd+bwd", "hidden", lambda: torch.autograd.grad(flce(w, h, labels), (h, w)), flops=3 * f,
            note="mean CE, no entropy")

    print(f"\nGPU {torch.cuda.get_device_name()}: T={T} H={H} V={V} bf16; copy {bw / 1e9:.0f} GB/s, "
          f"bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s measured; max rel err vs float64 {err:.2e}")
    print(f"{'variant':28s} {'ms':>8s} {'GB/s':>7s} {'roof':>5s} {'TFLOP/s':>8s} {'peak':>5s} {'extra GiB':>9s}  note")
    for r in rows:
        ms = "OOM" if r["ms"] is None else f"{r['ms']:.2f}"
        print(f"{r['name']:28s} {ms:>8s} {r.get('GBps', float('nan')):7.0f} {r.get('roofline', float('nan')):5.2f} "
              f"{r.get('TFLOPs', float('nan')):8.1f} {r.get('of_peak', float('nan')):5.2f} "
              f"{(r['peak_gib'] if r['peak_gib'] is not None else float('nan')):9.2f}  {r['note']}")
    return dict(T=T, H=H, V=V, copy_GBps=bw / 1e9, mm_TFLOPs=mm_rate / 1e12, rel_err=err, rows=rows,
                machine=_machine())


def _machine():
    return dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
                python=platform.python_version(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def run(args) -> int:
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        # Checked before minutes of benchmarking, not after.
        print(f"megammr bench kernels: error: --json {args.json}: directory "
              f"{os.path.dirname(os.path.abspath(args.json))} does not exist", file=sys.stderr)
        return 2
    out = {}
    if not args.skip_cpu:
        out["cpu"] = run_cpu(args)
    if torch.cuda.is_available():
        out["gpu"] = run_gpu(args)
    else:
        print("\nGPU part skipped: no CUDA device (do_bench ms, GB/s, TFLOP/s, Liger comparison need one).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    bad = [r for r in out.get("cpu", {}).get("rows", []) if not r.get("rel_err", 0.0) < 1e-4]
    # A variant whose process failed (naive OOM-killed, say) is a failed benchmark, not a pass.
    return 1 if bad or out.get("cpu", {}).get("failed") else 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
    else:
        ap = argparse.ArgumentParser(prog="megammr bench kernels")
        add_arguments(ap)
        sys.exit(run(ap.parse_args()))
