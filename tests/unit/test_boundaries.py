"""One source of truth for defaults, and public entry points between modules (checked in the source).

- A library function's keyword default that equals a recipe field's default under the same name
  (e.g. `temperature=1.0` against rollout.temperature) is a second source of that default: when
  config.py changes, the function silently keeps the old value. Functions take the config section,
  or the value without a default.
- A module importing another module's private name (`from megammr.x import _y`) or reaching
  into it (`x._y`) depends on what that module may change freely; each has a public entry point.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib

import megammr.config as config

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("megammr", "tools") for p in (ROOT / d).rglob("*.py"))


def _recipe_defaults() -> dict[str, set]:
    out: dict[str, set] = {}
    for obj in vars(config).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                if isinstance(f.default, (bool, int, float, str)):
                    out.setdefault(f.name, set()).add((type(f.default), f.default))
    return out


def _constant(node):
    """The value of a default made only of literals and arithmetic (56 * 56), else None."""
    if not all(isinstance(n, (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop, ast.Expression))
               for n in ast.walk(node)):
        return None
    return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})


def test_no_function_restates_a_recipe_default():
    recipe = _recipe_defaults()
    found = []
    for path in SOURCES:
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults))
            pairs += [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, default in pairs:
                v = _constant(default)
                if v is not None and (type(v), v) in recipe.get(arg.arg, ()):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({arg.arg}={v!r})")
    assert not found, "keyword defaults that restate megammr/config.py:\n" + "\n".join(found)


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_no_module_uses_another_modules_private_names():
    found = []
    for path in SOURCES:
        here = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}  # local name -> megammr module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.startswith("megammr"):
                for a in node.names:
                    private = a.name.startswith("_") and not a.name.startswith("__")
                    if private and node.module != here:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {a.name}")
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("megammr") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and aliases[node.value.id] != here:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr} "
                             f"({aliases[node.value.id]})")
    assert not found, "private names used across modules:\n" + "\n".join(found)
