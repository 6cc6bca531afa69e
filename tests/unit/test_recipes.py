"""The bundled recipes write only what differs from what they inherit (megammr/config/schema.py's
defaults, or the file they extend): a value restated there would silently stop following the
default when it changes."""
import glob
import os

import pytest
import yaml

from megammr.config import Recipe, load_recipe, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, "recipes", "*", "*.yaml"))
                 if not p.endswith("curriculum.yaml"))
# Every phase file names its phase and its prompt style, even where they equal a default:
# they define the phase (the curriculum's directory names, text/caption/image prompts).
PHASE_IDENTITY = {"phase.name", "data.prompt_style"}


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def test_every_backbone_has_its_recipes():
    names = {os.path.relpath(p, os.path.join(REPO, "recipes")) for p in RECIPES}
    for b in ("tiny", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b"):
        assert {f"{b}/{f}.yaml" for f in ("base", "phase1", "phase2", "phase3")} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, REPO))
def test_recipe_restates_nothing_it_inherits(path):
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    parent = raw.pop("extends", None)
    inherited = to_dict(load_recipe(os.path.join(os.path.dirname(path), parent)) if parent else Recipe())
    restated = [f"{k}: {v!r}" for k, v in _leaves(raw) if k not in PHASE_IDENTITY and _get(inherited, k) == v]
    assert not restated, f"{os.path.relpath(path, REPO)} restates inherited values: {restated}"
