"""Backbones table: each qwen2.5-vl size built on the meta device has exactly the parameter count of
transformers' Qwen2_5_VLForConditionalGeneration built on the meta device from the same config; the
config round-trips through Backbone.from_hf_config; unknown architectures are refused."""
import json
import os
import subprocess
import sys

import pytest

from megammr.backbones import BACKBONES, Backbone, get_backbone

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Published totals (billions) as a sanity anchor for the table's numbers: 3.75B, 8.29B, 33.5B, 73.4B.
APPROX_B = {"qwen2.5-vl-3b": 3.75, "qwen2.5-vl-7b": 8.29, "qwen2.5-vl-32b": 33.45, "qwen2.5-vl-72b": 73.4}

_WORKER = r"""
import json, os, sys, torch
from megammr.config import load_recipe
from megammr import runtime
from megammr.backbones import get_backbone
from megammr.models.vlm import count_parameters_meta
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
runtime.init(load_recipe(None, []), environ=dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1]))
out = {}
for name in sys.argv[2:]:
    bb = get_backbone(name)
    ours = count_parameters_meta(bb)
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(bb.to_hf_config()))
    out[name] = dict(ours=ours, hf=sum(p.numel() for p in hf.parameters()))
print("RESULT " + json.dumps(out))
runtime.shutdown()
"""


def test_parameter_counts_match_transformers_on_meta():
    from conftest import free_port
    names = ["tiny", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b"]
    # A child process: the megatron CPU layer it applies must not leak into this test session.
    p = subprocess.run([sys.executable, "-c", _WORKER, str(free_port()), *names], capture_output=True, text=True,
                       timeout=600, cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore",
                                                       PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))[7:])
    for name in names:
        assert res[name]["ours"] == res[name]["hf"], (name, res[name])
        if name in APPROX_B:
            assert abs(res[name]["hf"] / 1e9 - APPROX_B[name]) < 0.05 * APPROX_B[name], (name, res[name])


@pytest.mark.parametrize("name", list(BACKBONES))
def test_hf_config_round_trip(name):
    bb = get_backbone(name)
    back = Backbone.from_hf_config(json.loads(json.dumps(bb.to_hf_config())), name=name)
    assert back.replace(hf_repo=bb.hf_repo) == bb


def test_tiny_table_matches_tiny_writer(tmp_path):
    from megammr.models.tiny import write_tiny_model
    d = write_tiny_model(str(tmp_path / "t"), seed=0)
    bb = Backbone.from_hf_config(json.load(open(os.path.join(d, "config.json"))), name="tiny")
    assert bb.replace(hf_repo=None) == get_backbone("tiny")


def test_unknown_architecture_is_refused():
    cfg = get_backbone("tiny").to_hf_config()
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="unknown architecture.*llama"):
        Backbone.from_hf_config(cfg)
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone("qwen9")
