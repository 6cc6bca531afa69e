"""`megammr plan`'s static figures equal what megatron allocates at TP=2, DP=2 and TP=2 x PP=2
(tiny backbone, gloo on CPU; the worker builds with megammr.train.setup's own functions)."""
import os

import pytest

from megammr.backbones import get_backbone
from megammr.plan import static_bytes

WORKER = os.path.join(os.path.dirname(__file__), "plan_memory_worker.py")
pytestmark = pytest.mark.dist


def planned_vs_measured(result: dict) -> list[str]:
    """Every figure where the planner and the built model differ (empty: all exact)."""
    bb, bad = get_backbone("tiny"), []
    for c in result["configs"]:
        st = static_bytes(bb, result["tp"], result["pp"], result["stage"], result["dp"], result["dp_rank"],
                          c["precision"], c["distributed_optimizer"], c["freeze_vision"], "local")
        for key in ("weights", "grads", "optimizer", "params"):
            if getattr(st, key) != c[key]:
                bad.append(f"rank {result['rank']} {c['precision']} distopt={c['distributed_optimizer']} "
                           f"freeze_vision={c['freeze_vision']}: {key} planned {getattr(st, key)} "
                           f"!= allocated {c[key]}")
    return bad


@pytest.mark.parametrize("nproc,tp,pp", [(2, 2, 1), (2, 1, 1), (4, 2, 2)], ids=["tp2", "dp2", "tp2xpp2"])
def test_static_bytes_equal_allocated(torchrun, nproc, tp, pp):
    results = torchrun(WORKER, nproc, env=dict(TP=tp, PP=pp), timeout=600)
    assert len(results) == nproc
    assert {r["stage"] for r in results} == set(range(pp))
    assert {r["dp"] for r in results} == {nproc // (tp * pp)}
    assert not [line for r in results for line in planned_vs_measured(r)]
