"""The documented entry points, run the way users run them: cwd = the repository root, no PYTHONPATH,
with Hugging Face's `kernels` installed (transformers >= 5.25 imports it for every model).

`python -m` and torchrun's workers put the current directory first on sys.path, so anything the
repository root provides as a top-level module shadows an installed one of that name. A top-level
`kernels/` package did exactly that and broke every Qwen2.5-VL import from the root while the
`megammr` console script (sys.path[0] = the venv's bin/) kept working. These tests fail when such a
module is put back: the first directly, the others through the real commands.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.dist
RECIPE = os.path.join("recipes", "tiny", "phase1.yaml")
# One small step of the shipped tiny phase-1 recipe; only its size and where it writes are changed.
SMALL = ["train.steps=1", "rollout.n=2", "train.prompts_per_step=2", "rollout.max_new_tokens=8",
         "data.num_workers=0", "reward.workers=1", "train.checkpoint_interval=1", "train.export_hf=false"]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _run(cmd, timeout=600):
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} (cwd={REPO}) failed rc={p.returncode}:\n{(p.stdout + p.stderr)[-5000:]}"
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megammr.data.synthetic import write_all
    from megammr.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("entry")
    shards = write_all(str(root / "data"), n=16, seed=3, phases=(1,), progress=False)[1]["shards"]
    model = write_tiny_model(str(root / "model"), seed=3)
    return root, [f"model.hf_path={model}", f"data.datasets=[{{path: {shards}}}]"]


def _steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def test_hf_kernels_resolves_outside_the_repository():
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)"
    origin = _run([sys.executable, "-c", code]).stdout.strip()
    assert origin != "None", "Hugging Face's kernels is not installed here (megammr[dev] pulls it)"
    # The venv may live inside the checkout (.ci/run puts it there), so "outside the repository"
    # means: the installed distribution's own file, not a module the checkout provides.
    from importlib.metadata import distribution
    dist = distribution("kernels")
    installed = os.path.realpath(str(dist.locate_file("kernels/__init__.py")))
    assert os.path.realpath(origin) == installed, \
        f"`import kernels` from the repository root resolves to {origin}, not the installed {installed}"


def test_python_m_megammr_version():
    from megammr import __version__
    assert _run([sys.executable, "-m", "megammr", "--version"]).stdout.strip() == f"megammr {__version__}"


def test_python_m_megammr_train_one_step(tiny):
    root, data = tiny
    out = root / "python_m"
    _run([sys.executable, "-m", "megammr", "train", RECIPE, *data, *SMALL, f"train.output_dir={out}"])
    assert _steps(out) == [1]


def test_torchrun_megammr_train_tp2_one_step(tiny):
    root, data = tiny
    out = root / "torchrun"
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    launch = [launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]
    _run([*launch, "--nproc-per-node=2", f"--master-port={free_port()}", "--master-addr=127.0.0.1",
          "-m", "megammr", "train", RECIPE, *data, *SMALL, "parallel.tp=2", f"train.output_dir={out}"])
    assert _steps(out) == [1]
