"""The runtime starts from Slurm's own variables (srun, no torchrun) on a real local Slurm:
a TP=2 job under `sbatch` + `srun` gives the same losses and grad norms as under torchrun."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "dist", "gpt_parallel.py")
pytestmark = pytest.mark.slurm


def test_srun_tasks_form_the_same_job_as_torchrun(slurm_cluster, tmp_path):
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
    results = [json.loads(line[7:]) for line in log.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, log[-4000:]
    slurm = results[0]
    assert slurm["launcher"] == "slurm" and slurm["world"] == 2
    (ref,) = run_torchrun(WORKER, 2, dict(TP=2, PP=1))
    assert ref["launcher"] == "torchrun"
    for key in ("losses", "grad_norms"):
        for a, b in zip(slurm[key], ref[key]):
            assert abs(a - b) <= 1e-6 * abs(b)
