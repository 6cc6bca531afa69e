"""tools/convert_checkpoint.py: HF -> mcore -> HF is bit-exact per tensor and the export loads in
transformers; `check` on the converted checkpoint passes at TP=2xPP=2 (one torchrun launch, both
tied and untied are covered by test_model_parity) and fails (exit 1) against a different model;
wrong or incomplete checkpoints give clear errors."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")
pytestmark = pytest.mark.dist


def tool(*args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def _tensors(d):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from megammr.models.tiny import write_tiny_model
    root = tmp_path_factory.mktemp("conv")
    # untied, sharded HF input (index + several files), to exercise the sharded reader
    hf = write_tiny_model(str(root / "hf"), seed=5, tie_word_embeddings=False, max_shard_bytes=400_000)
    assert len(glob.glob(os.path.join(hf, "model-*.safetensors"))) > 1
    r = tool("hf-to-mcore", "--hf", hf, "--out", root / "ckpt")
    assert r.returncode == 0, r.stderr[-3000:]
    r = tool("mcore-to-hf", "--ckpt", root / "ckpt", "--out", root / "back", "--max-shard-mb", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, hf


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_bit_exact_and_loads(tmp_path, tied):
    from megammr.models.convert import hf_to_mcore, mcore_to_hf
    from megammr.models.tiny import write_tiny_model
    hf = write_tiny_model(str(tmp_path / "hf"), seed=2, tie_word_embeddings=tied)
    hf_to_mcore(hf, str(tmp_path / "ckpt"))
    mcore_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "back"))
    a, b = _tensors(hf), _tensors(str(tmp_path / "back"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    from transformers import Qwen2_5_VLForConditionalGeneration
    from megammr.models.processor import load_processor
    m0 = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).eval()
    m1 = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "back")).eval()
    assert m1.config.tie_word_embeddings == tied
    proc = load_processor(str(tmp_path / "back"))
    ids = proc.tokenizer(["<|im_start|>user\nWhat is 2+2?<|im_end|>"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(m0(input_ids=ids).logits, m1(input_ids=ids).logits)


def test_sharded_round_trip_and_check_tp2_pp2(converted):
    root, hf = converted
    a, b = _tensors(hf), _tensors(str(root / "back"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert len(glob.glob(str(root / "back" / "model-*.safetensors"))) > 1
    r = tool("check", "--hf", hf, "--ckpt", root / "ckpt", "--tp", 2, "--pp", 2)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "max abs logit diff" in r.stdout and "OK" in r.stdout


def test_check_fails_on_a_different_model(converted, tmp_path):
    from megammr.models.tiny import write_tiny_model
    root, _ = converted
    other = write_tiny_model(str(tmp_path / "other"), seed=6, tie_word_embeddings=False)
    r = tool("check", "--hf", other, "--ckpt", root / "ckpt")
    assert r.returncode == 1 and "FAIL" in r.stdout, r.stdout + r.stderr[-2000:]


def test_clear_errors(converted, tmp_path):
    root, hf = converted
    # missing shard
    bad = tmp_path / "missing"
    shutil.copytree(hf, bad)
    victim = sorted(glob.glob(str(bad / "model-*.safetensors")))[1]
    os.remove(victim)
    r = tool("hf-to-mcore", "--hf", bad, "--out", tmp_path / "o1")
    assert r.returncode == 2 and "missing shard" in r.stderr and os.path.basename(victim) in r.stderr
    # shape mismatch names the tensor
    bad = tmp_path / "shape"
    shutil.copytree(hf, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(bad / "config.json", "w"))
    r = tool("hf-to-mcore", "--hf", bad, "--out", tmp_path / "o2")
    assert r.returncode == 2 and "mlp.gate_proj.weight has shape" in r.stderr, r.stderr[-2000:]
    # unknown architecture
    bad = tmp_path / "arch"
    shutil.copytree(hf, bad)
    cfg = json.load(open(bad / "config.json"))
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    json.dump(cfg, open(bad / "config.json", "w"))
    r = tool("hf-to-mcore", "--hf", bad, "--out", tmp_path / "o3")
    assert r.returncode == 2 and "unknown architecture" in r.stderr
    # not a torch_dist checkpoint
    r = tool("mcore-to-hf", "--ckpt", hf, "--out", tmp_path / "o4", "--hf-config", hf)
    assert r.returncode == 2 and "not a torch_dist checkpoint" in r.stderr
