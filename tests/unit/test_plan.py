"""`megammr plan`: every shipped recipe gets its table; a recipe that does not fit says by how much
and which re-planned changes make it fit; --json carries the same numbers; bad arguments are one
line. The static figures equal what megatron allocates (TP=1 here, in one child process; TP=2,
DP=2 and TP=2 x PP=2 in tests/dist/test_plan_memory.py), and the per-rank parameter lists equal
the built models' (every backbone, on the meta device)."""
import glob
import json
import os
import subprocess
import sys

import pytest

from megammr.backbones import BACKBONES, get_backbone
from megammr.cli import main
from megammr.curriculum import is_curriculum
from megammr.plan import GIB, rank_parameters, static_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "recipes", "*", "*.yaml")) if not is_curriculum(p))


def plan(capsys, *argv):
    rc = main(["plan", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.relpath(p, REPO) for p in RECIPES])
def test_every_shipped_recipe_gets_a_table(capsys, recipe):
    rc, out, err = plan(capsys, recipe)
    assert rc == 0, err
    for row in ("weights", "gradients", "optimizer", "reference model", "activations", "logits",
                "= training step", "= rollout", "verdict: ", "activations: ", "not counted: "):
        assert row in out
    assert "verdict: fits" in out or "verdict: does not fit by" in out


def test_a_recipe_that_does_not_fit_says_by_how_much_and_what_fits(capsys):
    recipe = os.path.join(REPO, "recipes", "qwen2_5_vl_7b", "phase1.yaml")
    rc, out, _ = plan(capsys, recipe, "--nodes", "1")
    assert rc == 0
    verdict = [line for line in out.splitlines() if line.startswith("verdict:")][0]
    assert "does not fit by" in verdict and float(verdict.split("by ")[1].split()[0]) > 0
    fixes = [line for line in out.splitlines() if line.startswith("  with ") and line.endswith("-> fits")]
    assert fixes
    # each suggestion was re-planned: applying it gives the verdict it promised
    for line in fixes:
        changes = line[len("  with "):].split(":")[0].split()
        nodes = [c.split("=")[1] for c in changes if c.startswith("--nodes=")]
        rc, again, _ = plan(capsys, recipe, *[c for c in changes if not c.startswith("--")],
                            "--nodes", nodes[0] if nodes else "1")
        assert rc == 0 and "verdict: fits" in again, again


def test_json_has_the_same_numbers(capsys):
    recipe = os.path.join(REPO, "recipes", "qwen2_5_vl_32b", "phase1.yaml")
    rc, text, _ = plan(capsys, recipe)
    rc2, js, _ = plan(capsys, recipe, "--json")
    assert rc == rc2 == 0
    p = json.loads(js)
    t = p["train"]
    for key, label in (("weights", "weights"), ("grads", "gradients"), ("optimizer", "optimizer"),
                       ("activations", "activations ("), ("train_total", "= training step")):
        line = next(x for x in text.splitlines() if x.lstrip().startswith(label))
        assert f"{t[key] / GIB:8.2f}" in line, (key, line)
    assert f"{p['rollout']['total'] / GIB:8.2f}" in next(x for x in text.splitlines() if "= rollout" in x)
    assert (p["fits"], f"{p['short_by'] / GIB:.2f}") == (False, text.split("does not fit by ")[1].split()[0])
    assert p["fixes"] and all(f["changes"] for f in p["fixes"])


@pytest.mark.parametrize("argv,says", [
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
    (["--gpu-mem-gib", "-1"], "--gpu-mem-gib must be > 0"),
    (["parallel.tp=3"], "parallel.tp=3"),
    (["no.such_key=1"], "no"),
    (["parallel.pp=4", "parallel.tp=4", "--nodes", "1"], "world size 8 is not divisible"),
], ids=["nodes", "gpus", "mem", "tp", "key", "layout"])
def test_bad_arguments_are_one_line(capsys, argv, says):
    rc, out, err = plan(capsys, os.path.join(REPO, "recipes", "qwen2_5_vl_7b", "phase1.yaml"), *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("megammr plan: error: ") and says in err, err


def test_missing_recipe_is_one_line(capsys):
    rc, out, err = plan(capsys, "no/such/recipe.yaml")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no/such/recipe.yaml" in err


def _child(code: str, env: dict) -> dict:
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=REPO, **env)
    p = subprocess.run([sys.executable, *code], capture_output=True, text=True, cwd=REPO, env=full, timeout=600)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, (p.stdout + p.stderr)[-4000:]
    return json.loads(lines[0][len("RESULT "):])


def test_static_bytes_equal_allocated_at_tp1():
    """One process, TP=1: planned weights, grad buffer and optimizer bytes == the storages megatron
    allocated (fp32 / bf16, with and without the distributed optimizer, frozen vision)."""
    from conftest import free_port
    res = _child([os.path.join(REPO, "tests", "dist", "plan_memory_worker.py")],
                 dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    bb, bad = get_backbone("tiny"), []
    assert len(res["configs"]) == 5
    for c in res["configs"]:
        st = static_bytes(bb, 1, 1, 0, 1, 0, c["precision"], c["distributed_optimizer"], c["freeze_vision"], "local")
        bad += [(c, key, getattr(st, key)) for key in ("weights", "grads", "optimizer", "params")
                if getattr(st, key) != c[key]]
    assert not bad


_META = r"""
import json, sys, torch
from megammr import runtime
from megammr.backbones import get_backbone
from megammr.config import ModelConfig, load_recipe
from megammr.models.vlm import build_model
runtime.init(load_recipe(None, []),
             environ=dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1]))
out = {}
for name in sys.argv[2:]:
    with torch.device("meta"):
        m = build_model(get_backbone(name), ModelConfig(layer_spec="local"), perform_initialization=False)
    out[name] = [[n, p.numel()] for n, p in m.named_parameters()]
print("RESULT " + json.dumps(out))
runtime.shutdown()
"""


def test_parameter_lists_equal_built_models():
    """Names, sizes and order (the order fixes megatron's buffer padding) of every backbone at TP=1."""
    from conftest import free_port
    res = _child(["-c", _META, str(free_port()), *BACKBONES], {})
    for name in BACKBONES:
        assert [[n, k] for n, k, _ in rank_parameters(get_backbone(name), 1, 1, 0)] == res[name], name


_SAVED = r"""
import json, sys, torch
from megammr import runtime
from megammr.backbones import get_backbone
from megammr.config import ModelConfig, load_recipe
from megammr.models.vlm import build_model
runtime.init(load_recipe(None, []),
             environ=dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1]))
torch.set_num_threads(1)
out = {}
for prec in ("fp32", "bf16"):
    saved = {}
    for layers in (4, 8):
        bb = get_backbone("tiny").replace(num_layers=layers)
        m = build_model(bb, ModelConfig(layer_spec="local", precision=prec), perform_initialization=True)
        seen = {}
        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(torch.randint(0, 380, (2, 96)), torch.arange(96).expand(3, 2, 96))
        weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
        saved[layers] = sum(v for k, v in seen.items() if k not in weights)
    out[prec] = (saved[8] - saved[4]) // 4  # one decoder layer's saved tensors
print("RESULT " + json.dumps(out))
runtime.shutdown()
"""


def test_activations_per_layer_equal_saved_tensors():
    """The planner's bytes per decoder layer == what autograd saves for backward in one layer of the
    built model (local spec, CPU, TP=1, 192 tokens; the difference of an 8- and a 4-layer model)."""
    from conftest import free_port
    from megammr.plan import activation_bytes_per_layer
    res = _child(["-c", _SAVED, str(free_port())], {})
    bb = get_backbone("tiny")
    assert res == {p: activation_bytes_per_layer(bb, 192, 1, b, "local") for p, b in (("fp32", 4), ("bf16", 2))}
