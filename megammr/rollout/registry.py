"""The rollout engines a recipe can name (`rollout.engine`), and what `auto` picks.

ENGINES maps each name to its RolloutEngine class as "module:Class", imported on first use: an
engine's module is loaded only when it is looked at, and its library later still (vLLM is an
optional GPU dependency: megammr.rollout.vllm_engine imports nothing of it until
VLLMEngine.build). The order is `auto`'s preference: the first engine available on this machine.
A new engine is one module implementing RolloutEngine and one line here.
"""
from __future__ import annotations

import importlib
from typing import Union

from megammr.config import RolloutConfig
from megammr.rollout.base import RolloutEngine

ENGINES: dict[str, Union[str, type[RolloutEngine]]] = {
    "vllm": "megammr.rollout.vllm_engine:VLLMEngine",
    "transformers": "megammr.rollout.hf_engine:TransformersEngine",
}


def engine_class(name: str) -> type[RolloutEngine]:
    """The class registered as `name` (imported now when registered as "module:Class")."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise ValueError(f"rollout.engine={name}: no such engine (one of auto, {', '.join(ENGINES)})") from None
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def resolve_engine(name: str, cuda: bool) -> tuple[str, str]:
    """(engine, note): `auto` is the first registered engine available on this machine (vLLM with
    CUDA and vLLM installed, else transformers); the note says why earlier ones were passed over,
    for the log. A named engine is taken as given (check_engine refuses what it cannot honour)."""
    if name != "auto":
        return name, ""
    passed_over = []
    for candidate in ENGINES:
        cls = engine_class(candidate)
        ok, why = cls.available(cuda)
        if ok:
            if not passed_over:
                return candidate, ""
            caveat = f" ({cls.caveat})" if cls.caveat else ""
            return candidate, f"rollout.engine=auto: {'; '.join(passed_over)}, using the {cls.label} engine{caveat}"
        if why:
            passed_over.append(why)
    raise RuntimeError(f"rollout.engine=auto: none of {', '.join(ENGINES)} is available on this machine")


def check_engine(recipe, name: str, cuda: bool) -> tuple[list[str], list[str]]:
    """(errors, warnings) of running `recipe` with engine `name` on this machine: the rollout.*
    settings of other engines it cannot honour, then the engine's own checks."""
    cls, defaults = engine_class(name), RolloutConfig()
    errors, seen = [], set(cls.settings)
    for other in ENGINES:
        if other == name:
            continue
        owner = engine_class(other)
        for field in owner.settings:
            if field in seen:
                continue
            seen.add(field)
            if getattr(recipe.rollout, field) != getattr(defaults, field):
                errors.append(f"rollout.{field} is a {owner.label} setting: the {cls.label} engine cannot honour it "
                              f"(remove it or set rollout.engine={other})")
    return errors + cls.check(recipe, cuda), cls.warnings(recipe, cuda)


__all__ = ["ENGINES", "check_engine", "engine_class", "resolve_engine"]
