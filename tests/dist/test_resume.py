"""Checkpoints, exact resume and preemption through `megammr train` (the command users run).

- SIGTERM after a random step: the step finishes, a checkpoint is written (a second SIGTERM arrives
  while it is being written), exit code 75; rerunning the same command resumes and ends with weights
  bitwise equal to an uninterrupted run (fp32, CPU).
- kill -9 twice, after a random step and in the middle of a checkpoint write (its .tmp directory
  exists), leaves `latest` loadable, and the resumed run is still bitwise equal.
- A recipe change that alters the result is refused, naming the field.
- A checkpoint written at TP=2xPP=2 resumes at TP=1 (resharded; said so, no bitwise promise).
The updates carry an entropy bonus so that weights move even though a random tiny model earns no reward.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import REPO, free_port

pytestmark = pytest.mark.dist
STEPS = 5
BASE = ["phase.init_from=null", "data.num_workers=1", "reward.workers=1", "rollout.n=2", "train.prompts_per_step=2",
        "rollout.max_new_tokens=12", "model.precision=fp32", "algo.entropy_coef=0.05", "optim.lr=3e-3",
        f"train.steps={STEPS}", "train.checkpoint_interval=1", "optim.schedule=cosine", "optim.warmup_steps=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
           PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def command(overrides, nproc=1):
    recipe = os.path.join(REPO, "recipes/tiny/phase2.yaml")
    if nproc == 1:
        return [sys.executable, "-m", "megammr", "train", recipe, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
            "--master-addr=127.0.0.1", "-m", "megammr", "train", recipe, *overrides]


def run(overrides, nproc=1, expect=0):
    p = subprocess.run(command(overrides, nproc), env=ENV, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == expect, (p.returncode, (p.stdout + p.stderr)[-5000:])
    return p


def steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def weights(out):
    d = os.path.join(out, "hf")
    tensors = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(d, f)))
    return tensors


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    diff = [k for k in a if not (a[k] == b[k]).all()]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megammr.data.synthetic import write_all
    from megammr.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("resume")
    data = write_all(str(root / "data"), n=32, seed=5, phases=(2,), progress=False)[2]["shards"]
    model = write_tiny_model(str(root / "model"), seed=7)
    base = BASE + [f"model.hf_path={model}", f"data.datasets=[{{path: {data}}}]"]
    out = root / "straight"
    run(base + [f"train.output_dir={out}"])
    return root, base, weights(str(out))


def writing_checkpoint(out) -> bool:
    """A checkpoint is being written: its step_NNNNNN.tmp directory exists (checkpoint.save)."""
    d = os.path.join(out, "checkpoints")
    return os.path.isdir(d) and any(n.endswith(".tmp") and os.path.isdir(os.path.join(d, n)) for n in os.listdir(d))


def start_and_signal(cmd, out, signals, tag):
    """Start the run; for each (condition, signal) in order, send the signal once the condition holds.
    Returns (exit code, log, how many signals were sent). Output goes to a file, not a pipe: a killed
    trainer's children must not block the test."""
    log_path = f"{out}.{tag}.log"
    sent = 0
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                             start_new_session=True)
        deadline = time.time() + 600
        for cond, sig in signals:
            while not cond() and p.poll() is None and time.time() < deadline:
                time.sleep(0.002)  # a tiny checkpoint is written in a fraction of a second
            if p.poll() is not None:
                break
            p.send_signal(sig)
            sent += 1
        rc = p.wait(timeout=600)
    if any(sig == signal.SIGKILL for _, sig in signals):
        # What a node failure does to the rest of the job: nothing of it may survive to hold files.
        time.sleep(2)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    with open(log_path) as f:
        return rc, f.read(), sent


def test_sigterm_at_a_random_step_then_resume_is_bitwise_equal(tiny):
    """SIGTERM after a random step; a second SIGTERM while the preemption checkpoint is being written."""
    root, base, ref = tiny
    out = root / "sigterm"
    at = random.Random().randint(1, STEPS - 2)
    cmd = command(base + [f"train.output_dir={out}"])
    rc, log, sent = start_and_signal(cmd, str(out), [(lambda: steps_logged(str(out)) >= at, signal.SIGTERM),
                                                     (lambda: writing_checkpoint(str(out)), signal.SIGTERM)], "term")
    assert sent == 2 and rc == 75, (at, sent, rc, log[-3000:])
    assert "checkpointed" in log and "Traceback" not in log
    assert steps_logged(str(out)) < STEPS
    p = run(base + [f"train.output_dir={out}"])
    assert "resumed from" in p.stdout
    assert steps_logged(str(out)) == STEPS  # no step logged twice
    assert_bitwise_equal(ref, weights(str(out)))


def test_kill_9_twice_then_resume_is_bitwise_equal(tiny):
    """kill -9 after a random step, then kill -9 in the middle of a checkpoint write."""
    root, base, ref = tiny
    out = root / "kill9"
    ckpts = os.path.join(out, "checkpoints")
    cmd = command(base + [f"train.output_dir={out}"])
    at = random.Random().randint(1, STEPS - 2)
    kills = ([(lambda: steps_logged(str(out)) >= at, signal.SIGKILL)],
             [(lambda: steps_logged(str(out)) > at and writing_checkpoint(str(out)), signal.SIGKILL)])
    for i, signals in enumerate(kills):
        _, log, sent = start_and_signal(cmd, str(out), signals, f"kill{i}")
        assert sent == 1, (at, i, log[-3000:])
        if os.path.exists(os.path.join(ckpts, "latest")):
            name = open(os.path.join(ckpts, "latest")).read().strip()
            assert os.path.isfile(os.path.join(ckpts, name, "megammr.json"))
    assert os.path.exists(os.path.join(ckpts, "latest"))  # the second kill came after at least one save
    p = run(base + [f"train.output_dir={out}"])
    assert "resumed from" in p.stdout
    assert_bitwise_equal(ref, weights(str(out)))


def test_only_the_newest_checkpoints_are_kept(tiny):
    """A checkpoint every step, train.keep_checkpoints=2 (the default): the uninterrupted run ends with
    its last two, `latest` naming the newest, and no half-written .tmp directory."""
    root, _, _ = tiny
    ckpts = root / "straight" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", f"step_{STEPS - 1:06d}", f"step_{STEPS:06d}"]
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:06d}"


def test_recipe_change_is_refused_naming_the_field(tiny):
    root, base, _ = tiny
    out = root / "straight"
    p = run(base + [f"train.output_dir={out}", "optim.lr=1e-3"], expect=2)
    assert "optim.lr: checkpoint 0.003, now 0.001" in p.stderr
    assert "train.allow_recipe_change=true" in p.stderr


def test_tp2pp2_checkpoint_resumes_at_tp1(tiny):
    root, base, _ = tiny
    out = root / "reshard"
    run(base + [f"train.output_dir={out}", "train.steps=2", "parallel.tp=2", "parallel.pp=2",
                "train.allow_recipe_change=true"], nproc=4)
    p = run(base + [f"train.output_dir={out}", "train.steps=3", "train.allow_recipe_change=true"])
    assert "resharded to tp=1 pp=1" in p.stdout and "not bitwise" in p.stdout
    assert steps_logged(str(out)) == 3
    with open(os.path.join(out, "checkpoints", "step_000003", "megammr.json")) as f:
        assert json.load(f)["layout"]["tp"] == 1


def test_another_data_parallel_size_is_refused_with_the_fix(tiny):
    """A DP=1 checkpoint resumed by two DP ranks: each rank's loader position cannot be split, so the
    run stops at once with a one-line error naming both sizes (each rank exits 2, no traceback)."""
    import shutil
    root, base, _ = tiny
    out = root / "dp-change"
    shutil.copytree(root / "straight", out)
    # Each rank exits 2; torchrun reports any failed worker as 1 (srun passes the ranks' code on).
    p = run(base + [f"train.output_dir={out}", f"train.steps={STEPS + 1}", "train.allow_recipe_change=true"],
            nproc=2, expect=1)
    assert "saved with data-parallel size 1, this launch has 2" in p.stderr, p.stderr[-3000:]
    assert "megammr/" not in "".join(ln for ln in p.stderr.splitlines(True) if ln.lstrip().startswith("File "))
    assert re.search(r"exitcode\s*:\s*2 ", p.stderr)  # torchrun's report of each rank's own exit code
    assert steps_logged(str(out)) == STEPS
