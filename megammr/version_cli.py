"""`megammr version`: the package and the versions of the stack it runs on."""
from importlib.metadata import PackageNotFoundError, version

import megammr


def add_arguments(p):
    pass


def run(args) -> int:
    print(f"megammr {megammr.__version__}")
    for dist in ("torch", "megatron-core", "megatron-energon", "transformers", "triton", "math-verify"):
        try:
            print(f"  {dist} {version(dist)}")
        except PackageNotFoundError:
            print(f"  {dist} (not installed)")
    return 0
