"""Megatron Qwen2.5-VL logits equal transformers' (fp32, max abs diff <= 1e-4) for tiny random models
with tied and untied embeddings, text-only and text + two images of different sizes, at TP=1, TP=2,
PP=2 and TP=2xPP=2. One torchrun launch per layout checks all four cases."""
import os

import pytest

from conftest import run_torchrun

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
    (res,) = run_torchrun(SCRIPT, tp * pp, args=["--hf", tied, "--hf", untied, "--tp", str(tp), "--pp", str(pp)])
    cases = res["cases"]
    assert set(cases) == {"tied/text", "tied/image", "untied/text", "untied/image"}
    for name, c in cases.items():
        assert c["ref_std"] > 0.3, f"{name}: reference logits near zero prove nothing"
        assert c["max_abs_diff"] <= TOL, f"TP={tp} PP={pp} {name}: {c}"
    assert cases["tied/image"]["n_images"] == 2
