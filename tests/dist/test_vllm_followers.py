"""The colocated vLLM engine's follower protocol across two real processes (gloo, CPU, stand-in LLM)."""
import os

import pytest

pytestmark = pytest.mark.dist
HERE = os.path.dirname(os.path.abspath(__file__))


def test_followers_generate_the_sources_calls(torchrun):
    res = {r["rank"]: r for r in torchrun(os.path.join(HERE, "vllm_follower_worker.py"), 2, timeout=240)}
    src, follower = res[0], res[1]
    assert src["extra_rounds"] == 1 and len(src["generated"]) == 2   # dynamic sampling: two generate calls
    assert follower["generated"] == src["generated"]                 # same inputs and seeds, same outputs
    assert src["groups"] == follower["groups"] == 2                  # groups broadcast as before
    assert src["asleep"] == follower["asleep"] == ["kv_cache", "weights"]  # both sleep after the step
