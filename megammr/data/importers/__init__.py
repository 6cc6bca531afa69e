"""Importers: public datasets, in their published layouts, -> megammr records (JSONL + image files).

One module per layout, each an `Importer` (base.py); `FORMATS` maps `--format` names to them;
pipeline.py runs one over its inputs (normalise, decontaminate, deduplicate images, validate,
write). Entry point: `megammr data import` (megammr/data_cli.py).
"""
from __future__ import annotations

import importlib

# --format name -> "module:Class". Order is the order of `megammr data import --help`.
FORMATS = {
    "deepscaler": "megammr.data.importers.deepscaler:DeepScaleR",
    "virl39k": "megammr.data.importers.virl39k:ViRL39K",
    "llava": "megammr.data.importers.llava:LLaVA",
    "columns": "megammr.data.importers.columns:Columns",
}


def get_importer(name: str):
    """An instance of the importer registered under `name` (KeyError naming the formats)."""
    if name not in FORMATS:
        raise KeyError(f"unknown format {name!r} (formats: {', '.join(FORMATS)})")
    module, cls = FORMATS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
