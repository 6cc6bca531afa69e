"""megammr: the Infi-MMR curriculum (three phases of GRPO) for VLMs on megatron-core."""
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

_KERNELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")


class _SourceKernelsFinder(importlib.abc.MetaPathFinder):
    """Resolves `megammr.kernels` to the repository's top-level kernels/ folder.

    An installed wheel (or an editable install) already maps it through setup.py's package_dir.
    When megammr is imported straight from a source checkout (repository root on sys.path, as
    under pytest), there is no megammr/kernels folder, so this finder supplies the same mapping.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "megammr.kernels":
            return None
        init = os.path.join(_KERNELS_DIR, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[_KERNELS_DIR])


# Appended last: any installed mapping found by the normal finders wins.
if not any(isinstance(f, _SourceKernelsFinder) for f in sys.meta_path):
    sys.meta_path.append(_SourceKernelsFinder())
