"""convert_checkpoint.py check resolves relative paths before handing them to torchrun workers
(which run from the repository root) and rejects a missing directory up front."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_check_rejects_missing_relative_dir(tmp_path):
    (tmp_path / "ck").mkdir()
    p = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "check",
                        "--hf", "nope", "--ckpt", "ck"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 2
    assert f"--hf {tmp_path / 'nope'} is not a directory" in p.stderr
