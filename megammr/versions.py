"""Version strings of installed distributions, read and compared without importing them.

Below every other module (standard library only): the TE feature checks (megammr.models.te) and
the vLLM version gate (megammr.rollout.vllm_engine) both compare versions, and transformer-engine
and vLLM cannot be imported on a machine without CUDA.
"""
from __future__ import annotations

import importlib.metadata as md
from typing import Optional


def version_tuple(v: str) -> tuple[int, ...]:
    """The leading numeric release parts: "2.3.0.dev0+5fdd7bb" -> (2, 3, 0) (TE's and vLLM's version gates)."""
    out = []
    for part in v.replace("+", ".").replace("-", ".").split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def version_at_least(v: Optional[str], minimum: str) -> bool:
    return v is not None and version_tuple(v) >= version_tuple(minimum)


def installed_version(*dists: str) -> Optional[str]:
    """The version of the first of `dists` that is installed (its metadata: nothing is imported), or None."""
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


__all__ = ["installed_version", "version_at_least", "version_tuple"]
