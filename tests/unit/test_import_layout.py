"""What the repository puts on `sys.path`, and how `megammr.kernels` is found.

- `import megammr.kernels` works from a regular (wheel) install, the editable install and the
  repository root (this process), and the installed wheel carries the kernel files.
- Nothing in the repository shadows another module. Every folder that lands on `sys.path` when a
  user runs something the documented way (the repository root for `python -m megammr`, `torchrun -m
  megammr`, `srun` from the submit directory and pytest; tools/ for `python tools/x.py`; slurm/;
  each test folder under pytest's rootdir insertion) holds no module or regular package named like
  an installed distribution's top-level module, a standard-library module, or a PyPI package we know
  to collide (a top-level `kernels/` package once shadowed Hugging Face's `kernels`, which
  transformers >= 5.25 imports, and every Qwen2.5-VL import failed from the repository root).
  Folders without `__init__.py` (tools/, slurm/, tests/) are PEP 420 namespace portions: a regular
  package of the same name anywhere on `sys.path` wins over them, so they cannot shadow one.
"""
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = "import megammr, megammr.kernels as k; print(megammr.__file__); print(k.__file__)"
KERNELS = os.path.join(REPO, "megammr", "kernels")
# PyPI projects whose import names are generic enough to collide with a script or folder name here
# (checked by hand against the PyPI index on 2026-12-04; installed ones are found automatically).
KNOWN_PYPI = {"kernels", "helpers", "tools", "tests", "data_helpers", "test_packaging", "utils", "common", "scripts"}


def test_import_from_repository_root():
    import megammr.kernels as k
    assert os.path.realpath(k.__file__) == os.path.realpath(os.path.join(KERNELS, "__init__.py"))


def test_import_from_wheel_install(tmp_path):
    pytest.importorskip("setuptools")
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), REPO], check=True, capture_output=True, cwd=tmp_path)
    (whl,) = wheel_dir.glob("megammr-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    kernel_files = sorted(f for f in os.listdir(KERNELS) if f.endswith(".py"))
    assert kernel_files
    for f in kernel_files:
        assert f"megammr/kernels/{f}" in names, f"{f} missing from the wheel"
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"megammr"}, f"the wheel installs other top-level modules: {sorted(top - {'megammr'})}"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(whl)],
                   check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert all(p.startswith(str(site)) for p in out), out


def test_import_from_editable_or_installed_outside_repo(tmp_path):
    """Whatever install the test environment has (CI: editable) resolves outside the repo root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    if p.returncode != 0 and "No module named 'megammr'" in p.stderr:
        pytest.skip("megammr is not installed in this environment")
    assert p.returncode == 0, p.stderr
    assert os.path.realpath(os.path.dirname(p.stdout.split()[1])) == os.path.realpath(KERNELS)


def _path_folders() -> list[pathlib.Path]:
    """The repository's folders that land on sys.path: the root, tools/, slurm/ and every test folder."""
    root = pathlib.Path(REPO)
    tests = {p.parent for p in (root / "tests").rglob("*.py") if "fixtures" not in p.parts}
    return [root, root / "tools", root / "slurm", *sorted(tests)]


def _importable_names(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Top-level modules and regular packages a folder on sys.path provides (namespace folders cannot shadow)."""
    out = {}
    for p in folder.iterdir():
        if p.suffix == ".py":
            out[p.stem] = p
        elif p.is_dir() and (p / "__init__.py").is_file():
            out[p.name] = p
    return out


def _taken_names() -> set[str]:
    installed = set(importlib.metadata.packages_distributions())
    return installed | set(sys.stdlib_module_names) | KNOWN_PYPI


def test_no_repository_module_shadows_another_module():
    taken = _taken_names()
    assert "kernels" in taken  # Hugging Face's kernels, the collision this test exists for
    clashes = []
    for folder in _path_folders():
        for name, path in _importable_names(folder).items():
            if name == "megammr" and folder == pathlib.Path(REPO):
                continue
            if name in taken and name != "conftest":  # conftest is pytest's own name for these files
                clashes.append(os.path.relpath(path, REPO))
    assert not clashes, ("modules of the repository named like an installed, standard-library or known PyPI "
                         f"module (rename them; they shadow it whenever their folder is on sys.path): {clashes}")


def test_repository_root_provides_only_megammr():
    names = set(_importable_names(pathlib.Path(REPO)))
    assert names == {"megammr"}, f"the repository root provides other top-level modules: {sorted(names - {'megammr'})}"
