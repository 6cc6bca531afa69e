"""`megammr bench gpu-step` without a GPU: a clear refusal, the FLOP count, and the plumbing on CPU."""
import json
import os
import subprocess
import sys

from megammr.bench.gpu_step import peak_tflops, train_flops_per_token
from megammr.backbones import get_backbone

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_flops_per_token_of_the_3b_shape():
    bb = get_backbone("qwen2.5-vl-3b")  # h 2048, ffn 11008, 36 layers, 16 heads, 2 kv heads, vocab 151936
    h, kv = 2048, 128 * 2
    n = 36 * (h * (h + 2 * kv) + h * h + 3 * h * 11008) + 151936 * h
    assert train_flops_per_token(bb, 4096) == 6 * n + 6 * 36 * h * 4096
    assert 6 * 3.0e9 < train_flops_per_token(bb, 0) < 6 * 3.2e9  # ~3.1B matmul weights (the ViT is not counted)


def test_peak_table():
    assert peak_tflops("NVIDIA H200", None) == 989.0 and peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert peak_tflops("Some GPU", None) is None and peak_tflops("Some GPU", 123.0) == 123.0


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "megammr", "bench", "gpu-step", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_refuses_without_cuda():
    p = _run()
    assert p.returncode == 2 and "needs CUDA" in p.stderr and "megammr bench step" in p.stderr
    assert "Traceback" not in p.stderr


def test_plumbing_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    p = _run("--backbone", "tiny", "--allow-cpu", "--seq", "48", "--micro-batches", "2", "--warmup", "1",
             "--steps", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(out.read_text())
    bf16, fp8 = rep["results"]
    assert bf16["precision"] == "bf16" and bf16["train_tokens_per_s"] > 0 and bf16["skipped_updates"] == 0
    assert bf16["sync_timings"]["tensors_loaded"] > 0 and {"gather_s", "convert_s", "load_s"} <= set(bf16["sync_timings"])
    assert fp8 == {"precision": "fp8", "skipped": "fp8 needs the TE layer spec (transformer-engine not importable)"}
    assert "skipped" in p.stdout
