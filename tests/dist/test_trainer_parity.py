"""A GRPO update of the Qwen2.5-VL model is the same at every parallel layout.

Rollouts of phase-3 data (every prompt has an image) are recorded by `megammr train` at TP=1 with
train.save_rollouts, then replayed by `megammr train rollout.replay=DIR` at TP=1, TP=2, PP=2,
TP=2xPP=2 and DP=2 (all through torchrun, the path users run). Per step and per update the loss
and grad norm must match TP=1 within 1e-5 relative.

The recorded rollouts of a random tiny model all score 0, which would make every advantage 0: the
test writes seeded random rewards into the replay files (the rewards are replay input, like the
token ids) and cuts the responses of every second group short, so that at DP=2 the two ranks hold
different token counts in every update and the global token normaliser matters. KL (k3), an entropy bonus, two
updates per step (off-policy ratios, so the clip bounds act) and truncated importance sampling
are on, so every term of the loss is exercised; vision-tower gradients are part of the grad norm.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port, parse_results

pytestmark = pytest.mark.dist
STEPS = 3
COMMON = ["phase.init_from=null", "data.num_workers=0", "reward.workers=1", "rollout.n=4", "train.prompts_per_step=4",
          "rollout.max_new_tokens=24", "model.precision=fp32", f"train.steps={STEPS}",
          "optim.warmup_steps=0"]  # this test's own update settings (below), not phase 3's lr warm-up
# adam_eps: with the default 1e-8, gradient entries that are ~0 up to fp32 rounding (which differs
# between layouts and between CPU models: another summation order) get Adam updates of +-lr from
# the sign of that noise. 1e-6 keeps those entries' updates small (see also `noise_floor`).
UPDATE = ["algo.kl_coef=0.05", "algo.entropy_coef=0.01", "train.updates_per_step=2", "algo.clip_low=0.05",
          "algo.clip_high=0.08", "algo.tis_cap=2.0", "optim.lr=3e-3", "train.micro_batch_size=3",
          "optim.adam_eps=1e-6"]


def megammr_train(nproc: int, overrides: list[str], timeout: float = 600) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if nproc == 1:
        cmd = [sys.executable, "-m", "megammr", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "--master-addr=127.0.0.1", "-m", "megammr", "train"]
    p = subprocess.run(cmd + [os.path.join(REPO, "recipes/tiny/phase3.yaml")] + overrides, env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} {overrides} failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}")
    return p.stdout


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from megammr.data.synthetic import write_all
    from megammr.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("parity")
    data = write_all(str(root / "data"), n=32, seed=3, phases=(3,), progress=False)[3]["shards"]
    model = write_tiny_model(str(root / "model"), seed=5)
    base = COMMON + [f"model.hf_path={model}", f"data.datasets=[{{path: {data}}}]"]
    megammr_train(1, base + [f"train.output_dir={root / 'record'}", "train.save_rollouts=true"])
    rollouts = root / "record" / "rollouts"
    rng = random.Random(0)
    for step in range(1, STEPS + 1):
        path = rollouts / f"step_{step:06d}.dp0-of-1.pt"
        saved = torch.load(path, weights_only=False)
        assert saved["groups"] and all(g["pixel_values"] is not None for g in saved["groups"])
        for gi, g in enumerate(saved["groups"]):
            g["rewards"] = [rng.choice([0.0, 0.5, 1.0, 1.5]) + 0.01 * k for k in range(len(g["rewards"]))]
            # Replay splits the step's 4 groups into 2 updates of 2 and each update over the DP ranks
            # (experience.load_replay): group 2u + r goes to rank r in update u. Odd groups get short
            # responses, so at DP=2 the second rank has fewer tokens than the first in every update
            # and the global (all-reduced) token normaliser differs from either rank's own count.
            if gi % 2 == 1:
                keep = [rng.randint(3, 10) for _ in g["token_ids"]]
                g["token_ids"] = [t[:n] for t, n in zip(g["token_ids"], keep)]
                g["logprobs"] = [lp[:n] for lp, n in zip(g["logprobs"], keep)]
                g["finish_reasons"] = ["length"] * len(keep)
        torch.save(saved, path)
    return root, base + [f"rollout.replay={rollouts}"] + UPDATE


_RUNS = {}


def replay(recorded, name, nproc, layout):
    """The metrics of a replay at this layout (each layout runs once per session)."""
    root, base = recorded
    if (root, name) not in _RUNS:
        out = root / name
        megammr_train(nproc, base + layout + [f"train.output_dir={out}"])
        _RUNS[root, name] = read_metrics(str(out))
    return _RUNS[root, name]


@pytest.fixture(scope="module")
def reference(recorded):
    return replay(recorded, "tp1", 1, [])


@pytest.fixture(scope="module")
def noise_floor(recorded, reference):
    """What fp32 rounding alone does to these numbers: TP=1 again with another micro-batch size (the
    same arithmetic in another summation order; padding differs and is masked). Adam amplifies such
    rounding update after update, so after step 1 two runs that are mathematically one part by
    ~1e-6 on one CPU model and not on another. Per step: the largest difference seen up to then."""
    other = replay(recorded, "tp1-mb2", 1, ["train.micro_batch_size=2"])
    floor, worst = [], {}
    for ref, m in zip(reference, other):
        for key in KEYS:
            worst[key] = max([worst.get(key, 0.0)] + [abs(a - b) for a, b in zip(ref[key], m[key])])
        floor.append(dict(worst))
    floor[0]["first update"] = {key: abs(reference[0][key][0] - other[0][key][0]) for key in KEYS}
    return floor


KEYS = ("loss/per_update", "grad_norm/per_update")


def test_reference_is_not_trivial(reference):
    assert len(reference) == STEPS
    for m in reference:
        assert m["grad_norm"] > 1e-3 and abs(m["loss"]) > 1e-3, m
        assert m["samples"] >= 12 and not m["step_skipped"]  # a sampled <|image_pad|> drops its sample
    assert any(m["policy/clip_frac"] > 0 for m in reference), "the clip bounds never acted"
    assert any(m["kl"] > 0 for m in reference)


@pytest.mark.parametrize("name,nproc,layout", [
    ("tp2", 2, ["parallel.tp=2"]),
    ("pp2", 2, ["parallel.pp=2"]),
    ("tp2pp2", 4, ["parallel.tp=2", "parallel.pp=2"]),
    ("dp2", 2, []),
    # THD packing (train.pack_sequences): one row of whole sequences per micro-batch, the same update
    ("packed", 1, ["train.pack_sequences=true"]),
    ("packed-tp2pp2", 4, ["parallel.tp=2", "parallel.pp=2", "train.pack_sequences=true"]),
])
def test_update_matches_tp1(recorded, reference, noise_floor, name, nproc, layout):
    got = replay(recorded, name, nproc, layout)
    assert len(got) == STEPS
    for ref, m, floor in zip(reference, got, noise_floor):
        for key in KEYS:
            for a, b in zip(ref[key], m[key]):
                # The loss is a sum of O(0.1) terms (policy, KL, entropy) that can cancel to ~1e-3:
                # relative to that term scale, not to a near-zero total. Beyond 1e-5 of it, a layout
                # may differ by what rounding alone does at TP=1 (4x the measured floor); at step 1,
                # from the same weights, the floor is ~0 and 1e-5 is the whole bound.
                scale = max(abs(a), 0.1) if key.startswith("loss") else abs(a)
                bound = 1e-5 * scale + 4 * floor[key]
                assert abs(a - b) <= bound, (f"{name} step {m['step']} {key}: {b} vs TP=1 {a} (bound {bound:.3g}, "
                                             f"rounding floor {floor[key]:.3g})")
        assert m["samples"] == ref["samples"]
    if "train.pack_sequences=true" in layout:  # packed for real: fewer padded positions than the padded path
        if "parallel.pp=2" not in layout:
            assert all(m["batch/pad_frac"] == 0 < ref["batch/pad_frac"] for m, ref in zip(got, reference))
        else:  # under PP every micro-batch has one shape: packs of one length, padded rows of one width
            padded = replay(recorded, "pp2", 2, ["parallel.pp=2"])
            assert all(0 < m["batch/pad_frac"] < p["batch/pad_frac"] for m, p in zip(got, padded)), (got, padded)


def test_offload_during_rollout_leaves_every_update_bitwise_equal(recorded, reference):
    """train.offload_during_rollout frees the grad buffers (and, on a GPU, moves the optimizer state
    to the CPU) around the rollout stage: the updates are exactly those of the run without it."""
    got = replay(recorded, "offload", 1, ["train.offload_during_rollout=true"])
    for ref, m in zip(reference, got):
        for key in KEYS:
            assert m[key] == ref[key], (m["step"], key, m[key], ref[key])
        assert m["memory/offloaded_mb"] > 0 and ref["memory/offloaded_mb"] == 0, (m, ref)


def test_rounding_floor_is_small_from_the_same_weights(reference, noise_floor):
    """The first update starts every run from the same weights: there rounding must stay far below
    the 1e-5 bound, or the comparison would be loose where nothing has amplified it yet."""
    for key in KEYS:
        a = reference[0][key][0]
        scale = max(abs(a), 0.1) if key.startswith("loss") else abs(a)
        assert noise_floor[0]["first update"][key] <= 1e-6 * scale, (key, noise_floor[0])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loss_and_gradient_match_float64_transformers(recorded, packed):
    """The megatron loss of an off-policy update equals a float64 GRPO loss computed from
    transformers' Qwen2.5-VL on the same weights (clip bounds, k3 KL, TIS, entropy, token_mean over
    the update), and so do the gradients of a vision, an attention and an MLP weight; with padded
    rows and with packed (THD) micro-batches."""
    root, base = recorded
    base = base + [f"train.pack_sequences={str(packed).lower()}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = os.path.join(REPO, "tests", "dist", "trainer_reference_worker.py")
    p = subprocess.run([sys.executable, worker, os.path.join(REPO, "recipes/tiny/phase3.yaml"), *base,
                        "optim.clip_grad=0", f"train.output_dir={root / ('reference-packed' if packed else 'reference')}"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    (res,) = parse_results(p.stdout)
    assert res["clipped_tokens"] > 0 and res["kl_mean"] > 1e-4, res  # the terms under test act
    assert res["megatron_tokens"] == res["tokens"]
    assert res["packed"] == packed, res
    assert abs(res["megatron_loss"] - res["reference_loss"]) <= 1e-5 * abs(res["reference_loss"]), res
    for name, err in res["grad_rel_err"].items():
        assert err <= 1e-4, (name, res)


def _poisoned_replay(recorded, name, steps):
    """A copy of the recorded rollouts whose engine log-probs are NaN at `steps` (a broken engine)."""
    import shutil
    root, base = recorded
    src = [b.split("=", 1)[1] for b in base if b.startswith("rollout.replay=")][0]
    dst = root / name
    shutil.copytree(src, dst)
    for step in steps:
        path = dst / f"step_{step:06d}.dp0-of-1.pt"
        saved = torch.load(path, weights_only=False)
        for g in saved["groups"]:
            g["logprobs"] = [[float("nan")] * len(lp) for lp in g["logprobs"]]
        torch.save(saved, path)
    return [b for b in base if not b.startswith("rollout.replay=")] + [f"rollout.replay={dst}"]


def test_non_finite_step_is_skipped_and_counted(recorded):
    """NaN engine log-probs under truncated importance sampling make the loss NaN: that step's
    optimizer update is skipped and counted, and the run goes on."""
    root, _ = recorded
    base = _poisoned_replay(recorded, "nan_once", [2])
    megammr_train(1, base + ["train.steps=3", f"train.output_dir={root / 'nan_once_run'}"])
    m = read_metrics(str(root / "nan_once_run"))
    assert [x["step_skipped"] for x in m] == [False, True, False]
    assert [x["skipped_steps"] for x in m] == [0, 2, 2]  # both updates of step 2 were skipped
    assert m[1]["loss"] is None  # NaN is written as null: the JSON stays valid


def test_too_many_bad_steps_stop_the_run(recorded):
    root, _ = recorded
    base = _poisoned_replay(recorded, "nan_twice", [1, 2])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "megammr", "train", os.path.join(REPO, "recipes/tiny/phase3.yaml"),
                        *base, "train.max_bad_steps=2", f"train.output_dir={root / 'nan_twice_run'}"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 3, (p.stdout + p.stderr)[-3000:]
    assert "2 steps in a row had a non-finite loss or grad norm" in p.stderr
    assert "Traceback" not in p.stderr
    assert len(read_metrics(str(root / "nan_twice_run"))) == 2
