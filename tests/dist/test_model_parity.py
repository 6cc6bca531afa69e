"""Megatron Qwen2.5-VL logits equal transformers' (fp32, max abs diff <= 1e-4) for tiny random models
with tied and untied embeddings, text-only and text + two images of different sizes, at TP=1, TP=2,
PP=2 and TP=2xPP=2. One torchrun launch per layout checks all four cases."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "megammr", "models", "parity.py")
pytestmark = pytest.mark.dist
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from megammr.models.tiny import write_tiny_model
    d = tmp_path_factory.mktemp("hf")
    return (write_tiny_model(str(d / "tied"), seed=0, tie_word_embeddings=True),
            write_tiny_model(str(d / "untied"), seed=1, tie_word_embeddings=False))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_logits_match_transformers(tiny_pair, tp, pp):
    tied, untied = tiny_pair
    (res,) = run_torchrun_args(SCRIPT, tp * pp, ["--hf", tied, "--hf", untied, "--tp", str(tp), "--pp", str(pp)])
    cases = res["cases"]
    assert set(cases) == {"tied/text", "tied/image", "untied/text", "untied/image"}
    for name, c in cases.items():
        assert c["ref_std"] > 0.3, f"{name}: reference logits near zero prove nothing"
        assert c["max_abs_diff"] <= TOL, f"TP={tp} PP={pp} {name}: {c}"
    assert cases["tied/image"]["n_images"] == 2


def run_torchrun_args(script, nproc, args, timeout=300):
    """conftest.run_torchrun with script arguments."""
    import json
    import subprocess
    import sys
    from conftest import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", script, *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}")
    return [json.loads(l[len("RESULT "):]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]
