"""slurm/phase{1,2,3}.sbatch and slurm/submit_curriculum.sh on a real Slurm started on this machine
(tests/slurm/local_slurm.sh: two nodes n1, n2 with fake GPUs, so the scripts' GPU headers are
accepted as written; the jobs run on CPU with gloo).

- The tiny curriculum through submit_curriculum.sh, from an empty directory: three jobs, all
  COMPLETED, each job's own log says its phase finished, the final HF export loads in transformers
  and generates; rerunning the submit script submits nothing.
- A failing phase 1: phases 2 and 3 are cancelled by Slurm and the failure's message is in the log.
- A job signalled mid-phase (USR1 to the batch shell, as --signal=B:USR1@T does) checkpoints,
  requeues itself, resumes and ends with weights bitwise equal to an uninterrupted run.
- Two ranks under srun form one gloo job: TP=2 on one node, DP=2 across the two nodes; the runtime
  started from Slurm's own variables (srun, no torchrun) gives torchrun's losses and grad norms.
Slurm may report COMPLETED for a job that never ran, so every check reads the job's own output.
"""
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, parse_results

pytestmark = pytest.mark.slurm
CURRICULUM = os.path.join(REPO, "recipes", "tiny", "curriculum.yaml")
SUBMIT = os.path.join(REPO, "slurm", "submit_curriculum.sh")
WORKER = os.path.join(REPO, "tests", "dist", "gpt_parallel.py")
# The scripts ask for a GPU node (8 tasks, 8 GPUs); this cluster's nodes have 4 cores and 2 fake GPUs.
SMALL = ["--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=00:30:00"]
SHORT = ["data.num_workers=0", "reward.workers=1"]


@pytest.fixture
def env(slurm_cluster, tmp_path):
    """The job environment: this Python, the repository importable, quiet warnings; the cluster's config."""
    e = dict(slurm_cluster, MEGAMMR_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("MEGAMMR_RECIPE", "MEGAMMR_RUN_DIR", "MEGAMMR_OVERRIDES", "MEGAMMR_SBATCH_ARGS", "MASTER_ADDR",
              "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    yield e
    # A failed test must not leave its jobs running into the next one.
    mine = subprocess.run(["squeue", "-h", "-o", "%i %Z"], env=e, capture_output=True, text=True).stdout
    ids = [line.split()[0] for line in mine.splitlines() if str(tmp_path) in line]
    if ids:
        subprocess.run(["scancel", *ids], env=e)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model and a small phase-1 data set: cheap starts for the single-phase jobs."""
    from megammr.data.synthetic import write_all
    from megammr.models.tiny import write_tiny_model
    root = tmp_path_factory.mktemp("slurm-tiny")
    data = write_all(str(root / "data"), n=32, seed=5, phases=(1,), progress=False)[1]["shards"]
    model = write_tiny_model(str(root / "model"), seed=7)
    # The entropy bonus moves the weights although a random model earns no reward.
    return SHORT + [f"model.hf_path={model}", f"data.datasets=[{{path: {data}}}]", "rollout.n=2",
                    "train.prompts_per_step=2", "rollout.max_new_tokens=12", "algo.entropy_coef=0.05",
                    "optim.lr=3e-3", "train.checkpoint_interval=1"]


def sh(env, *cmd, cwd=None, check=True, timeout=120):
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"{cmd} failed rc={p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def sbatch(env, cwd, phase, overrides, extra=SMALL):
    p = sh(env, "sbatch", "--parsable", *extra, os.path.join(REPO, "slurm", f"phase{phase}.sbatch"), *overrides,
           cwd=cwd)
    return p.stdout.strip().split(";")[0]


def job(env, jid) -> dict:
    out = sh(env, "scontrol", "show", "job", "-o", jid).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(what, timeout, poll=2.0):
    end = time.time() + timeout
    while time.time() < end:
        got = what()
        if got:
            return got
        time.sleep(poll)
    return None


def wait_gone(env, ids, timeout=900):
    def gone():
        return not sh(env, "squeue", "-h", "-j", ",".join(ids), check=False).stdout.strip()
    assert wait_until(gone, timeout), f"jobs {ids} still queued after {timeout}s: " + str([job(env, j) for j in ids])


def log(cwd, phase, jid):
    path = os.path.join(cwd, f"megammr-phase{phase}-{jid}.out")
    return open(path).read() if os.path.exists(path) else ""


def controller_log(jid: str) -> str:
    """slurmctld's lines about job `jid` (why a job failed to start is only written there)."""
    path = os.path.join(os.environ.get("MEGAMMR_LOCAL_SLURM", "/tmp/megammr-slurm"), "log", "slurmctld.log")
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(line for line in f if re.search(rf"\bJ(ob)?Id={jid}\b|\bjob {jid}\b|JobId={jid}_", line))[-4000:]


def hf_weights(path):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def test_submit_curriculum_runs_the_tiny_curriculum_as_three_chained_jobs(env, tmp_path):
    env = dict(env, MEGAMMR_SBATCH_ARGS=" ".join(SMALL))
    p = sh(env, "bash", SUBMIT, os.path.join(REPO, "recipes", "tiny"), "run", "train.steps=2", *SHORT, cwd=tmp_path)
    ids = p.stdout.strip().splitlines()[-1].split()
    assert len(ids) == 3, p.stdout
    for i, jid in enumerate(ids[1:]):
        assert job(env, jid)["Dependency"].startswith(f"afterok:{ids[i]}"), job(env, jid)
    wait_gone(env, ids, timeout=1500)
    for k, jid in enumerate(ids, 1):
        text = log(tmp_path, k, jid)
        assert job(env, jid)["JobState"] == "COMPLETED", text[-3000:]
        assert f"phase {k} phase{k} done: run/phase{k}" in text and f"step 2/2" in text, text[-3000:]
        assert (tmp_path / "run" / f"phase{k}" / "DONE").exists()
    assert "preparing the tiny model" in log(tmp_path, 1, ids[0])  # job 1 prepared it from nothing
    assert "initial weights from run/phase2/checkpoints/step_000002" in log(tmp_path, 3, ids[2])

    from transformers import Qwen2_5_VLForConditionalGeneration

    from megammr.models.processor import load_processor
    hf = str(tmp_path / "run" / "phase3" / "hf")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
    ids_in = load_processor(hf).tokenizer("Compute 2 + 3.", return_tensors="pt").input_ids
    assert model.generate(ids_in, max_new_tokens=4, do_sample=False).shape[1] > ids_in.shape[1]

    again = sh(env, "bash", SUBMIT, os.path.join(REPO, "recipes", "tiny"), "run", "train.steps=2", *SHORT,
               cwd=tmp_path)
    assert again.stdout.count("done already") == 3 and "every phase is done" in again.stdout


def test_a_failed_phase_cancels_the_phases_after_it(env, tmp_path):
    broken = tmp_path / "broken"  # a data directory that is not a shard set
    broken.mkdir()
    env = dict(env, MEGAMMR_SBATCH_ARGS=" ".join(SMALL))
    p = sh(env, "bash", SUBMIT, CURRICULUM, "run", f"data.datasets=[{{path: {broken}}}]", *SHORT, cwd=tmp_path)
    ids = p.stdout.strip().splitlines()[-1].split()
    assert len(ids) == 3
    wait_gone(env, ids, timeout=600)
    first = job(env, ids[0])
    text = log(tmp_path, 1, ids[0])
    assert first["JobState"] == "FAILED" and first["ExitCode"] == "2:0", (first, text[-3000:])
    assert f"{broken}: not a prepared shard directory" in text and "phase 1 phase1 failed: exit 2" in text, text
    for jid in ids[1:]:
        st = job(env, jid)
        assert st["JobState"] == "CANCELLED" and st["Reason"] == "DependencyNeverSatisfied", st
        assert not log(tmp_path, 2, jid) and not log(tmp_path, 3, jid)  # never started


def test_phase_2_without_phase_1_fails_at_once_with_the_reason(env, tmp_path, tiny):
    jid = sbatch(dict(env, MEGAMMR_RECIPE=CURRICULUM, MEGAMMR_RUN_DIR="run"), tmp_path, 2, tiny)
    wait_gone(env, [jid], timeout=300)
    text = log(tmp_path, 2, jid)
    assert job(env, jid)["JobState"] == "FAILED", text
    assert "run/phase1/DONE does not exist" in text and "run phase 1 first" in text, text
    assert "launch:" not in text  # it failed before launching any rank


def test_signalled_job_requeues_and_ends_bitwise_equal_to_an_uninterrupted_run(env, tmp_path, tiny):
    # enough steps that the signal (sent once step 2 is logged) lands mid-phase on a fast machine too
    steps = ["train.steps=30"]
    # the uninterrupted reference: the same command a user would run on one machine, no Slurm
    ref = sh(env, sys.executable, "-m", "megammr", "train", "--phase", "1", CURRICULUM, *tiny, *steps,
             "train.output_dir=ref", cwd=tmp_path, timeout=900)
    assert (tmp_path / "ref" / "phase1" / "hf").is_dir(), ref.stdout + ref.stderr

    jenv = dict(env, MEGAMMR_RECIPE=CURRICULUM, MEGAMMR_RUN_DIR="run")
    jid = sbatch(jenv, tmp_path, 1, tiny + steps)
    assert wait_until(lambda: "step 2/30" in log(tmp_path, 1, jid), 600, poll=0.5), log(tmp_path, 1, jid)[-3000:]
    sh(env, "scancel", "--signal=USR1", "--batch", jid)  # what --signal=B:USR1@T delivers before the limit
    assert wait_until(lambda: int(job(env, jid).get("Restarts", 0)) >= 1, 300), log(tmp_path, 1, jid)[-3000:]
    # Slurm holds a requeued job for ~2 minutes (BeginTime); let it start now, once the first run has
    # fully ended (moving the start of a job still COMPLETING races its cleanup on the node)
    assert wait_until(lambda: job(env, jid)["JobState"] == "PENDING", 300), job(env, jid)
    sh(env, "scontrol", "update", f"JobId={jid}", "StartTime=now", check=False)
    wait_gone(env, [jid], timeout=900)
    text = log(tmp_path, 1, jid)
    assert job(env, jid)["JobState"] == "COMPLETED", (job(env, jid), text[-3000:], controller_log(jid))
    assert "USR1: asking the ranks to checkpoint and stop" in text and "requeueing job" in text, text[-3000:]
    assert "restart 1: phase 1 phase1 (started)" in text and "resumed from run/phase1/checkpoints" in text, text
    assert "phase 1 phase1 done" in text
    a, b = hf_weights(tmp_path / "ref" / "phase1" / "hf"), hf_weights(tmp_path / "run" / "phase1" / "hf")
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ after the requeue, e.g. {diff[:3]}"
    start = hf_weights(tiny[2].split("=", 1)[1])
    assert any(not torch.equal(start[k], b[k]) for k in b)  # and training moved them


@pytest.mark.parametrize("layout", ["tp2-one-node", "dp2-two-nodes"])
def test_two_ranks_under_srun_form_one_gloo_job(env, tmp_path, tiny, layout):
    if layout == "tp2-one-node":
        extra, over = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"], ["parallel.tp=2"]
    else:
        extra, over = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"], []
    jid = sbatch(dict(env, MEGAMMR_RECIPE=CURRICULUM, MEGAMMR_RUN_DIR="run"), tmp_path, 1,
                 tiny + over + ["train.steps=2"], extra=extra + ["--time=00:20:00"])
    wait_gone(env, [jid], timeout=600)
    text = log(tmp_path, 1, jid)
    assert job(env, jid)["JobState"] == "COMPLETED", text[-3000:]
    # one node: whichever of the two Slurm picked (another test's job may hold n1)
    nodes = r"nodes 1 \[n[12]\]" if layout == "tp2-one-node" else r"nodes 2 \[n1 n2\]"
    assert re.search(nodes + ", 2 ranks", text), text[-3000:]
    assert "0: megammr train: phase 1/3" in text and "1: megammr train: phase 1/3" in text, text[-3000:]
    assert "step 2/2" in text and "phase 1 phase1 done" in text, text[-3000:]
    assert (tmp_path / "run" / "phase1" / "hf").is_dir()


def test_srun_tasks_form_the_same_job_as_torchrun(slurm_cluster, tmp_path):
    """The runtime starts from Slurm's own variables (srun, no torchrun): a TP=2 job under `sbatch` +
    `srun` gives the same losses and grad norms as under torchrun."""
    from conftest import run_torchrun
    out = tmp_path / "job.out"
    batch = tmp_path / "job.sbatch"
    batch.write_text(f"""#!/bin/bash
#SBATCH --job-name=megammr-runtime
#SBATCH --ntasks=2
#SBATCH --output={out}
#SBATCH --time=00:05:00
set -e
cd {REPO}
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
export PYTHONPATH={REPO} OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore TP=2 PP=1
srun {sys.executable} {WORKER}
""")
    p = subprocess.run(["sbatch", "--wait", "--parsable", str(batch)], env=slurm_cluster, capture_output=True,
                       text=True, timeout=400)
    log = out.read_text() if out.exists() else ""
    assert p.returncode == 0, f"sbatch failed rc={p.returncode}: {p.stderr}\n{log[-4000:]}"
    # Slurm can report a job COMPLETED that never ran: the job's own output is the evidence.
    results = parse_results(log)
    assert len(results) == 1, log[-4000:]
    slurm = results[0]
    assert slurm["launcher"] == "slurm" and slurm["world"] == 2
    (ref,) = run_torchrun(WORKER, 2, dict(TP=2, PP=1))
    assert ref["launcher"] == "torchrun"
    for key in ("losses", "grad_norms"):
        for a, b in zip(slurm[key], ref[key]):
            assert abs(a - b) <= 1e-6 * abs(b)
