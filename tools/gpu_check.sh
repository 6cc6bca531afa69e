#!/usr/bin/env bash
# tools/gpu_check.sh: every GPU check of megammr in one run, on ONE H100/H200, in about 8 minutes.
#
# What it runs (each step under its own time limit; results in $OUT/gpu_check.json, log in
# $OUT/gpu_check.log):
#   1. env      nvidia-smi, python / torch / triton / megatron-core versions, which optional packages import
#   2. kernels  tests/gpu/test_kernels_gpu.py: compiled Triton kernels against float64
#   3. model    tests/gpu/test_train_gpu.py: the tiny model on the GPU vs transformers (fp32, bf16),
#               backward vs float64, packed (THD) vs padded log-probs, three `megammr train` GRPO
#               steps on the GPU (plain; with train.offload_during_rollout + train.pack_sequences)
#   4. te       tests/gpu/test_models_gpu.py + test_fp8_gpu.py (TransformerEngine, FP8, TE packed vs
#               padded)                                                             - needs transformer-engine
#   5. vllm     tests/gpu/test_vllm_gpu.py (the colocated vLLM engine)                    - needs vllm
#   6. bench-kernels   `megammr bench kernels --skip-cpu` (Liger-Kernel side by side when importable)
#                      -> $OUT/bench_kernels.json
#   7. bench-step      `megammr bench gpu-step` on the 3B shape (bf16; fp8 with TE; vLLM rollouts with vllm)
#                      -> $OUT/bench_gpu_step.json
# A step whose package is missing is reported "skipped" with the reason, never "passed"; a pytest
# step counts passed/failed/skipped tests from its junit report. Exit code: 0 when no step failed.
# Time limits: 120 + 180 + 150 + 180 + 90 + 180 s (te and vllm only when installed): without TE and
# vLLM at most 9.5 minutes, expected well under that (compiles and model builds dominate). The
# limits are estimates, not measurements; README "GPU path" records what ran on which device.
#
# The device machine of this workplace (and most clusters' login-free GPU nodes) has python3 with
# torch, triton and transformers but not megatron-core, megatron-energon or math-verify, and reaches no
# package registry. Those wheels are small and travel with the call:
#
#   here (any machine with pip and a registry), in the repository root, once:
#       echo /.whl/ >> .git/info/exclude
#       bash tools/gpu_check.sh --download-wheels        # pure-Python or manylinux wheels for CPython 3.12 into .whl/
#   on the GPU machine (this workplace: the device tool's `run`, with carry [".whl"]):
#       bash tools/gpu_check.sh                          # installs .whl/*.whl into /tmp/site when .whl/ exists
#
# transformer-engine (~280 MB plus an extension built against the device's torch) and vllm (GBs,
# its own CUDA torch) cannot travel that way: where they are not installed their steps are skipped.
# OUT defaults to ./gpu_check_out; TIME_SCALE=2 doubles every step's time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}

# Wheels the checks import that a torch + transformers image lacks (imports of megatron-core,
# megatron-energon and its loaders, math-verify), pinned to the versions the CPU suite runs with.
WHEELS=(
  megatron-core==0.16.1 megatron-energon==7.4.1 webdataset==1.0.2 braceexpand==0.1.7 filetype==1.2.0
  rapidyaml==0.15.2 multi-storage-client==1.3.1 opentelemetry-api==1.45.2 deprecation==2.1.0 wcmatch==10.2.1
  bracex==3.2.3 xattr==1.3.1 cffi==2.1.1 pycparser==3.12 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1 lark==1.3.1 jmespath==1.1.0 prettytable==3.18.0 wcwidth==0.9.4
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 liger-kernel==0.8.5
)

if [[ "${1:-}" == "--download-wheels" ]]; then
  mkdir -p .whl
  plats=()
  for n in 17 24 27 28 31 34; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plats[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" || exit 1
  du -sh .whl
  echo "now call the device with carry [\".whl\"] and: bash tools/gpu_check.sh"
  exit 0
fi

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
SCALE=${TIME_SCALE:-1}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || say "WARNING: wheel install failed (see log)"
  export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

STEPS_JSON="$WORK/steps.jsonl"
: > "$STEPS_JSON"
FAILED=0

# record NAME STATUS SECONDS [JUNIT_XML] [NOTE]
record() {
  $PY - "$@" >>"$STEPS_JSON" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
name, status, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
junit = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] else None
note = sys.argv[5] if len(sys.argv) > 5 else ""
row = {"step": name, "status": status, "seconds": round(secs, 1), "note": note}
if junit:
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        t = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        def reason(el):  # a module-level skip says "collection skipped"; its text holds the reason
            msg = (el.get("message") or "").strip()
            if msg != "collection skipped":
                return msg[:160]
            return (el.text or msg).strip().rstrip(")").strip("'\"").split(": ", 1)[-1][:160]
        reasons = sorted({reason(c.find("skipped")) for s in suites for c in s.iter("testcase")
                          if c.find("skipped") is not None})
        failed = sorted(f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None)
        passed = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
        row.update(passed=passed, failed=t["failures"] + t["errors"], skipped=t["skipped"],
                   skip_reasons=reasons, failed_tests=failed)
        if row["status"] == "ok":
            row["status"] = "failed" if row["failed"] else ("skipped" if passed == 0 else "passed")
    except (OSError, ET.ParseError) as e:
        row.update(status="failed" if status == "ok" else status, note=f"no junit report ({e}) {note}".strip())
print(json.dumps(row))
EOF
  local st
  st=$(tail -n 1 "$STEPS_JSON" | $PY -c "import json,sys; print(json.load(sys.stdin)['status'])")
  say "$1: $st $(tail -n 1 "$STEPS_JSON")"
  [[ "$st" == "failed" || "$st" == "timeout" ]] && FAILED=1
  return 0
}

# run_step NAME LIMIT_S JUNIT_OR_EMPTY -- command...
run_step() {
  local name=$1 limit=$(( $2 * SCALE )) junit=$3; shift 4
  say "== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local secs=$(( SECONDS - t0 ))
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    record "$name" timeout "$secs" "$junit" "ran past ${limit}s"
  elif [[ -n "$junit" ]]; then
    # pytest: 0 all passed/skipped, 1 some failed, 5 nothing collected; the junit report decides
    if [[ $rc -eq 0 || $rc -eq 1 || $rc -eq 5 ]]; then record "$name" ok "$secs" "$junit" "pytest rc=$rc"
    else record "$name" failed "$secs" "$junit" "pytest rc=$rc"; fi
  else
    if [[ $rc -eq 0 ]]; then record "$name" passed "$secs"; else record "$name" failed "$secs" "" "rc=$rc"; fi
  fi
}

skip_step() { record "$1" skipped 0 "" "$2"; }

importable() { $PY -c "import $1" >/dev/null 2>&1; }

# 1. environment -------------------------------------------------------------------------------
say "== env"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true; } >>"$LOG"
$PY - >"$WORK/env.json" 2>>"$LOG" <<'EOF'
import importlib, importlib.metadata as md, json, platform
import torch
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
       "capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None}
for mod, dist in (("triton", "triton"), ("transformers", "transformers"), ("megatron.core", "megatron-core"),
                  ("megatron.energon", "megatron-energon"), ("math_verify", "math-verify"),
                  ("transformer_engine", "transformer-engine"), ("vllm", "vllm"), ("liger_kernel", "liger-kernel")):
    try:
        importlib.import_module(mod)
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "importable"
    except Exception as e:
        out[dist] = None
        out[dist + "_error"] = f"{type(e).__name__}: {e}"[:200]
print(json.dumps(out))
EOF
cat "$WORK/env.json" | tee -a "$LOG"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ "${GPU_CHECK_WITHOUT_CUDA:-0}" != 1 ]]; then
    say "no CUDA device is visible: nothing to check here (the CPU suite is python -m pytest -q)"
    exit 2
  fi
  say "no CUDA device: GPU_CHECK_WITHOUT_CUDA=1 runs the steps anyway (to test this script: they skip or fail)"
fi

PYTEST=($PY -m pytest -q -p no:cacheprovider -o addopts="" -rs)

# 2.-5. tests/gpu ------------------------------------------------------------------------------
run_step kernels 120 "$WORK/kernels.xml" -- "${PYTEST[@]}" tests/gpu/test_kernels_gpu.py --junitxml="$WORK/kernels.xml"
if importable megatron.core && importable megatron.energon; then
  run_step model 180 "$WORK/model.xml" -- "${PYTEST[@]}" tests/gpu/test_train_gpu.py --junitxml="$WORK/model.xml"
else
  skip_step model "megatron-core / megatron-energon not importable (carry the wheels: tools/gpu_check.sh --download-wheels)"
fi
if importable transformer_engine.pytorch; then
  run_step te 150 "$WORK/te.xml" -- "${PYTEST[@]}" tests/gpu/test_models_gpu.py tests/gpu/test_fp8_gpu.py \
    --junitxml="$WORK/te.xml"
else
  skip_step te "transformer-engine not importable (pip install -e \".[gpu]\")"
fi
if importable vllm; then
  run_step vllm 180 "$WORK/vllm.xml" -- "${PYTEST[@]}" tests/gpu/test_vllm_gpu.py --junitxml="$WORK/vllm.xml"
else
  skip_step vllm "vllm not importable (pip install -e \".[gpu]\")"
fi

# 6.-7. benchmarks -----------------------------------------------------------------------------
run_step bench-kernels 90 "" -- $PY -m megammr bench kernels --skip-cpu --json "$OUT/bench_kernels.json"
if importable megatron.core; then
  VLLM_FLAG=(); importable vllm && VLLM_FLAG=(--vllm)
  run_step bench-step 180 "" -- $PY -m megammr bench gpu-step --backbone qwen2.5-vl-3b --seq 4096 \
    --micro-batch-size 1 --micro-batches 4 --warmup 2 --steps 3 "${VLLM_FLAG[@]}" --json "$OUT/bench_gpu_step.json"
else
  skip_step bench-step "megatron-core not importable (carry the wheels: tools/gpu_check.sh --download-wheels)"
fi

# summary --------------------------------------------------------------------------------------
$PY - "$WORK/env.json" "$STEPS_JSON" "$OUT" >"$OUT/gpu_check.json" <<'EOF'
import json, os, sys, time
env = json.load(open(sys.argv[1]))
steps = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
out = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "env": env, "steps": steps}
for name, path in (("bench_kernels", "bench_kernels.json"), ("bench_gpu_step", "bench_gpu_step.json")):
    p = os.path.join(sys.argv[3], path)
    if os.path.exists(p):
        out[name] = json.load(open(p))
print(json.dumps(out, indent=1))
EOF
say "summary: $OUT/gpu_check.json"
$PY - "$STEPS_JSON" <<'EOF' | tee -a "$LOG"
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    counts = f" ({r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped)" if "passed" in r else ""
    print(f"  {r['step']:<14}{r['status']:<9}{r['seconds']:>7.1f} s{counts}  {r.get('note', '')}")
EOF
rm -rf "$WORK"
exit $FAILED
