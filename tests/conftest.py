import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_results(text: str) -> list[dict]:
    """Every `RESULT {json}` object in `text`, in order.

    Ranks share one pipe, and under PYTHONUNBUFFERED print writes its text and its newline as two
    writes, so two ranks' lines can land as `RESULT {a}RESULT {b}\n\n`. Each object is therefore
    decoded from its marker, not per line.
    """
    dec, out, i = json.JSONDecoder(), [], text.find("RESULT ")
    while i >= 0:
        obj, end = dec.raw_decode(text, i + len("RESULT "))
        out.append(obj)
        i = text.find("RESULT ", end)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, nproc: int, env: dict | None = None, timeout: float = 300,
                 args: tuple | list = ()) -> list[dict]:
    """Launch `script` with torchrun (gloo on CPU); return the parsed `RESULT {json}` lines.

    The template for distributed tests: the worker prints `RESULT <json>` from the rank(s) that
    own the answer; a non-zero exit fails the test with the tail of the log.
    """
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    PYTHONWARNINGS="ignore")
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", script, *args]
    p = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        pytest.fail(f"torchrun {os.path.basename(script)} x{nproc} {env} failed (rc={p.returncode}):\n{log[-6000:]}")
    return parse_results(p.stdout)


def run_python(code: str, *args: str, timeout: float = 300) -> dict:
    """Run `python -c code args...` from the repository root (one process, its own process group);
    return its `RESULT {json}` line, parsed. A non-zero exit or no RESULT fails with the log."""
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)
    results = parse_results(p.stdout) if p.returncode == 0 else []
    if not results:
        pytest.fail(f"worker failed (rc={p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}")
    return results[0]


@pytest.fixture
def torchrun():
    return run_torchrun


SLURM_SCRIPT = os.path.join(REPO, "tests", "slurm", "local_slurm.sh")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real Slurm on this machine for the session; stopped by pid afterwards.

    Skipped (with the reason) where it cannot exist: not root, or no apt to install Slurm.
    Under CI=true it must start: a failure to start fails the tests instead of skipping them.
    """
    in_ci = os.environ.get("CI") == "true"
    if os.geteuid() != 0 or (shutil.which("slurmctld") is None and shutil.which("apt-get") is None):
        if in_ci:
            pytest.fail("CI needs a local Slurm: run as root on a Debian machine")
        pytest.skip("a local Slurm needs root and Debian's slurm packages")
    p = subprocess.run(["bash", SLURM_SCRIPT, "start"], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        (pytest.fail if in_ci else pytest.skip)(f"local Slurm did not start: {p.stderr[-2000:]}")
    conf = p.stdout.strip().splitlines()[-1]
    yield dict(os.environ, SLURM_CONF=conf)
    subprocess.run(["bash", SLURM_SCRIPT, "stop"], capture_output=True, text=True, timeout=120)
