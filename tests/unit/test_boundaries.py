"""One source of truth for defaults, and public entry points between modules (checked in the source).

- A library function's keyword default that equals a recipe field's default under the same name
  (e.g. `temperature=1.0` against rollout.temperature) is a second source of that default: when
  config/schema.py changes, the function silently keeps the old value. Functions take the config section,
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
SCHEMA = ROOT / "megammr" / "config" / "schema.py"  # where the defaults are stated


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
        if path == SCHEMA:
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
    assert not found, "keyword defaults that restate megammr/config/schema.py:\n" + "\n".join(found)


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


def _megammr_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The megammr modules a file imports anywhere in it (an import inside a function counts: it
    runs sooner or later), `from pkg import mod` resolved to the module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("megammr"):
            for a in node.names:
                out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("megammr"))
    return out & modules


def test_no_import_cycles():
    """A cycle makes import order matter and hides which layer owns what."""
    paths = {_module_name(p): p for p in SOURCES if p.is_relative_to(ROOT / "megammr")}
    graph = {m: _megammr_imports(p, set(paths)) - {m} for m, p in paths.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_config_imports_point_one_way():
    """load -> rules -> schema; the rules read the backbones table, which sits below config
    (so megammr.models, which builds on config, is never imported by it)."""
    allowed = {
        "megammr.backbones": set(),
        "megammr.config.schema": set(),
        "megammr.config.rules": {"megammr.backbones", "megammr.config.schema"},
        "megammr.config.load": {"megammr.config.rules", "megammr.config.schema"},
        "megammr.config": {"megammr.config.load", "megammr.config.rules", "megammr.config.schema"},
    }
    paths = {_module_name(p): p for p in SOURCES if p.is_relative_to(ROOT / "megammr")}
    found = [f"{m} imports {sorted(_megammr_imports(paths[m], set(paths)) - ok)}"
             for m, ok in allowed.items() if _megammr_imports(paths[m], set(paths)) - ok]
    assert not found, "\n".join(found)


# The layers of megammr, lowest first: a module imports only from its own unit (package or module)
# or from a strictly lower layer. Entry points (the `megammr` command's modules) sit above all,
# and only an entry point imports one.
LAYERS = [
    ("megammr", "megammr.backbones", "megammr.megatron_cpu", "megammr.kernels",  # pure data, torch only;
     "megammr.versions"),                                                   # version strings (stdlib only)
    ("megammr.config",),                                                    # recipes: schema <- rules <- load
    ("megammr.runtime",),                                                   # processes, ranks, devices, signals
    ("megammr.data", "megammr.rewards", "megammr.models", "megammr.algo", "megammr.metrics", "megammr.plot",
     "megammr.plan"),                                                       # memory planner: config + backbones
    ("megammr.rollout", "megammr.warmup"),                                  # engines run the models; SFT warm-up
    ("megammr.train", "megammr.eval", "megammr.curate"),                    # the trainer's stages; evaluation; curation
    ("megammr.trainer",),                                                   # one phase of GRPO
    ("megammr.curriculum",),                                                # the phases in order
    ("megammr.bench",),                                                     # measures everything below
]
ENTRY_POINTS = ("megammr.__main__", "megammr.cli", "megammr.config_cli", "megammr.train_cli", "megammr.version_cli",
                "megammr.eval.cli", "megammr.rewards.score_cli", "megammr.data_cli", "megammr.curate_cli",
                "megammr.plan_cli")


def _unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _layer(module: str) -> int:
    if module in ENTRY_POINTS:
        return len(LAYERS)
    for i, units in enumerate(LAYERS):
        if _unit(module) in units:
            return i
    raise AssertionError(f"{module} is in no layer of tests/unit/test_boundaries.py LAYERS: place it")


def test_imports_go_down_the_layers():
    """Entry points may import anything; nothing else imports an entry point or goes up or sideways."""
    paths = {_module_name(p): p for p in SOURCES if p.is_relative_to(ROOT / "megammr")}
    found = []
    for m, p in sorted(paths.items()):
        for d in sorted(_megammr_imports(p, set(paths))):
            if m in ENTRY_POINTS:
                continue
            if d in ENTRY_POINTS:
                found.append(f"{m} imports the entry point {d}")
            elif _unit(d) != _unit(m) and _layer(d) >= _layer(m):
                found.append(f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})")
    assert not found, "imports that go up or sideways (tests/unit/test_boundaries.py LAYERS):\n" + "\n".join(found)
