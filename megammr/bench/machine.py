"""What every benchmark records beside its figures: the machine's load and the package versions."""
from __future__ import annotations

import os
import platform
from typing import Optional


def loadavg() -> Optional[list[float]]:
    """1, 5 and 15-minute load averages (a shared machine inflates wall times: say how much)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("torch", "transformers", "megatron-core", "trl", "accelerate", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    import torch
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **versions()}
