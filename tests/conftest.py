import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str, nproc: int, env: dict | None = None, timeout: float = 300) -> list[dict]:
    """Launch `script` with torchrun (gloo on CPU); return the parsed `RESULT {json}` lines.

    The template for distributed tests: the worker prints `RESULT <json>` from the rank(s) that
    own the answer; a non-zero exit fails the test with the tail of the log.
    """
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    PYTHONWARNINGS="ignore")
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", script]
    p = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        pytest.fail(f"torchrun {os.path.basename(script)} x{nproc} {env} failed (rc={p.returncode}):\n{log[-6000:]}")
    return [json.loads(line[len("RESULT "):]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]


@pytest.fixture
def torchrun():
    return run_torchrun
