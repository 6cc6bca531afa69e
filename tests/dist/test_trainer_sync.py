"""Weight sync and rollout consistency, through the trainer's own stages and `megammr train`.

- After k updates and a sync, the transformers engine's logits on a text and a two-image probe
  equal the Megatron model's (fp32, <= 1e-5 abs) at TP=1 and TP=2xPP=2.
- `megammr train` at TP=2xPP=2: the engine's log-probs equal the trainer's every step
  (logp_diff/rollout_vs_train <= 1e-4), and the rollouts of the first step are token for token
  those of TP=1 (same recipe and seed).
The updates use an entropy bonus: a random tiny model scores 0 reward, and without it the weights
would not move between syncs.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port, parse_results
from test_trainer_parity import megammr_train, read_metrics

pytestmark = pytest.mark.dist
TRAIN = ["phase.init_from=null", "data.num_workers=0", "reward.workers=1", "rollout.n=2", "train.prompts_per_step=2",
         "rollout.max_new_tokens=16", "model.precision=fp32", "algo.entropy_coef=0.05", "optim.lr=3e-3",
         "train.steps=2", "optim.warmup_steps=0"]  # full-lr updates from step 1 (the recipe warms up over 5)


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    from megammr.data.synthetic import write_all
    from megammr.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("sync")
    data = write_all(str(root / "data"), n=16, seed=4, phases=(3,), progress=False)[3]["shards"]
    model = write_tiny_model(str(root / "model"), seed=6)
    return root, TRAIN + [f"model.hf_path={model}", f"data.datasets=[{{path: {data}}}]"]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_engine_logits_equal_megatron_after_updates(setup_dirs, tp, pp):
    root, base = setup_dirs
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp * pp}", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", os.path.join(REPO, "tests", "dist", "sync_worker.py"),
           os.path.join(REPO, "recipes/tiny/phase3.yaml"), *base, f"parallel.tp={tp}", f"parallel.pp={pp}",
           f"train.output_dir={root / f'worker{tp}{pp}'}", "train.sync_bucket_mb=1"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    (res,) = parse_results(p.stdout)
    assert res["weights_moved"] > 1e-4, res  # the updates changed the weights
    assert set(res["cases"]) == {"text", "image"}
    for name, c in res["cases"].items():
        assert c["ref_std"] > 0.3 and c["max_abs_diff"] <= 1e-5, (name, res)


def test_rollouts_and_logprobs_agree_across_layouts(setup_dirs):
    root, base = setup_dirs
    runs = {}
    layouts = (("tp1", 1, []), ("tp2", 2, ["parallel.tp=2"]), ("pp2", 2, ["parallel.pp=2"]),
               ("tp2pp2", 4, ["parallel.tp=2", "parallel.pp=2"]))
    for name, nproc, layout in layouts:  # the same DP size (1) everywhere
        out = root / f"train_{name}"
        megammr_train(nproc, base + layout + [f"train.output_dir={out}", "train.save_rollouts=true"])
        runs[name] = out
        for m in read_metrics(str(out)):
            assert m["logp_diff/rollout_vs_train"] <= 1e-4, (name, m)
    first = {n: torch.load(runs[n] / "rollouts" / "step_000001.dp0-of-1.pt", weights_only=False) for n in runs}
    tokens = {n: [g["token_ids"] for g in r["groups"]] for n, r in first.items()}
    for name in ("tp2", "pp2", "tp2pp2"):
        assert tokens[name] == tokens["tp1"], name  # the same rollouts at every layout
