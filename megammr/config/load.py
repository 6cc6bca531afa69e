"""Reading recipes: YAML files with `extends:`, `key=value` overrides, types checked against the schema.

A recipe is a YAML file under recipes/ that overrides some fields. `extends: base.yaml`
(relative to the file) inherits another recipe: mappings merge key by key, lists and scalars
are replaced. Command-line overrides `section.field=value` are applied last and typed the same
way. An unknown key is an error naming the file, the dotted key and the closest valid key;
a value of the wrong type is an error naming the expected type; rules between fields (the
backbone name, TP/PP against it, ranges) are megammr.config.rules. Every problem of a file and its
overrides is reported in one run, as a compiler does.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
import warnings
from typing import Any, Literal, Optional

import yaml

from megammr.config.rules import cross_checks
from megammr.config.schema import Recipe, RecipeError, RecipeWarning


class _Problems(list):
    """Error lines collected while a recipe is built, and the dotted keys they are about: a
    cross-field rule that reads one of those keys is skipped (the value there is a default, not
    the user's, so a verdict on it would mislead)."""

    def __init__(self):
        super().__init__()
        self.keys: set[str] = set()

    def add(self, key: str, err: RecipeError) -> None:
        self.extend(err.errors)
        self.keys.add(key)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, src: str, raw: Optional[str] = None):
    """Check (and minimally convert) one value against a field type.

    `key` is the dotted key, `src` the file (or "command line") it came from; errors name both.
    `raw` is the command-line text, so that str and Literal fields take it verbatim.
    """
    where = f"{src}: {key}" if src else key
    origin = typing.get_origin(tp)
    bad = RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        try:
            return _coerce(value, inner, key, src, raw)
        except RecipeError:
            raise bad from None
    if origin is Literal:
        choices = typing.get_args(tp)
        if raw is not None and raw in choices:
            return raw
        if value in choices and type(value) is type(choices[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        out, errors = [], []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, inner, f"{key}[{i}]", src))
            except RecipeError as e:
                errors.extend(e.errors)
        if errors:
            raise RecipeError(errors)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key, {}, src)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-6" (no dot) as a string; accept what float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if raw is not None:
            return raw
        if isinstance(value, str):
            return value
        raise bad
    raise RecipeError(f"{where}: unsupported field type {tp!r}")


def _hints(cls):
    return typing.get_type_hints(cls)


def _build(cls, data: dict, prefix: str, origins: dict[str, str], default_src: str = "",
           problems: Optional[_Problems] = None):
    """cls(**data) with every value checked. A bad value is recorded in `problems` and its field
    keeps the default, so one run reports every problem; without `problems` they are raised
    together at the end."""
    own = problems is None
    problems = _Problems() if own else problems
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        src = origins.get(dotted, origins.get(prefix, default_src))
        where = f"{src}: {dotted}" if src else dotted
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            stem = re.sub(r"\[\d+\]", "", prefix)  # suggest the schema key, not the list index
            hint = f"; did you mean '{(stem + '.') if stem else ''}{close[0]}'?" if close else \
                f"; valid keys: {', '.join(names)}"
            problems.add(dotted, RecipeError(f"{where}: unknown key{hint}"))
            continue
        tp = hints[key]
        try:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
                kwargs[key] = _build(tp, value, dotted, origins, src, problems)
            else:
                kwargs[key] = _coerce(value, tp, dotted, src)
        except RecipeError as e:
            problems.add(dotted, e)
    obj = cls(**kwargs)
    if own and problems:
        raise RecipeError(list(problems))
    return obj


def _shown(path: str) -> str:
    """A path as the user would type it: relative to the current directory when below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _dir_hint(path: str) -> str:
    names = sorted(f for f in os.listdir(path) if f.endswith((".yaml", ".yml")))
    if not names:
        return f"{path}: is a directory, not a recipe file (it holds no .yaml files)"
    first = next((n for n in names if n.startswith("phase")), names[0])
    return (f"{path}: is a directory, not a recipe file; pass one of its files, e.g. "
            f"{os.path.join(path, first)} (there: {', '.join(names)})")


def _read_yaml(path: str, shown: Optional[str] = None) -> dict:
    shown = shown or path
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {shown}") from None
    except IsADirectoryError:
        raise RecipeError(_dir_hint(shown)) from None
    except UnicodeDecodeError:
        raise RecipeError(f"{shown}: not UTF-8 text (a recipe is a YAML file)") from None
    except OSError as e:
        raise RecipeError(f"{shown}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{shown}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{shown}: a recipe must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict, origins: dict, src: str, prefix: str = "") -> dict:
    out = dict(base)
    for k, v in top.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            origins.setdefault(dotted, src)
            out[k] = _merge(out[k], v, origins, src, dotted)
        else:
            out[k] = v
            origins[dotted] = src
            if isinstance(v, dict):
                for sub in _walk_keys(v, dotted):
                    origins[sub] = src
    return out


def _walk_keys(d: dict, prefix: str):
    for k, v in d.items():
        dotted = f"{prefix}.{k}"
        yield dotted
        if isinstance(v, dict):
            yield from _walk_keys(v, dotted)


def _load_chain(path: str, origins: dict, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    shown = _shown(path)
    if path in seen:
        raise RecipeError(f"{shown}: circular extends: {' -> '.join(map(_shown, seen + (path,)))}")
    data = _read_yaml(path, shown)
    if "curriculum" in data and not seen:
        raise RecipeError(f"{shown}: a curriculum file, not a recipe: `megammr train {shown}` runs its phases, "
                          f"`megammr config show {shown}` shows them")
    parent = data.pop("extends", None)
    merged: dict = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(f"{shown}: extends: expected a path (str), got {parent!r}")
        target = os.path.join(os.path.dirname(path), parent)
        if not os.path.isfile(target):
            what = "is a directory" if os.path.isdir(target) else "not found"
            raise RecipeError(f"{shown}: extends: {parent}: {what} (looked for {_shown(os.path.abspath(target))}; "
                              "the path is relative to the extending file)")
        merged = _load_chain(target, origins, seen + (path,))
    return _merge(merged, data, origins, shown)


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {text!r}: empty key")
    return key, raw


def _apply_override(data: dict, key: str, raw: str, origins: dict):
    """Set data[key] from a command-line string, typed against the schema at that key."""
    parts = key.split(".")
    cls, node, prefix = Recipe, data, ""
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        dotted = f"{prefix}.{part}" if prefix else part
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else \
                f"; valid keys: {', '.join(names)}"
            raise RecipeError(f"command line: {dotted}: unknown key{hint}")
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            node[part] = _coerce(value, tp, dotted, "command line", raw=raw)
            if dataclasses.is_dataclass(node[part]):
                node[part] = dataclasses.asdict(node[part])
            elif isinstance(node[part], list):
                node[part] = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in node[part]]
            origins[dotted] = "command line"
            return
        if not dataclasses.is_dataclass(tp):
            raise RecipeError(f"command line: {dotted} is a {_type_name(tp)}, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"command line: {dotted} is not a mapping in the recipe")
        cls, prefix = tp, dotted


def load_recipe(path: Optional[str] = None, overrides: list[str] = (), *, world_size: Optional[int] = None,
                base: Optional[tuple[dict, str]] = None) -> Recipe:
    """Load a recipe file (following `extends:`), or `base` = (a recipe as a dict, e.g. the one a
    checkpoint saved; a label naming it in errors), apply key=value overrides, check everything.

    Every problem found (unknown keys, types, overrides, cross-field rules) is raised together in
    one RecipeError. With `world_size` the data-parallel split is checked too (layout_errors).
    What runs but is likely not meant is a RecipeWarning."""
    origins: dict[str, str] = {}
    data = _load_chain(path, origins) if path else {}
    if base is not None and not path:
        data = _merge({}, base[0], origins, base[1])
    on_command_line = _Problems()
    for text in overrides:
        try:
            key, raw = parse_override(text)
            _apply_override(data, key, raw, origins)
        except RecipeError as e:
            on_command_line.add(text.split("=", 1)[0].strip(), e)
    problems = _Problems()
    recipe = _build(Recipe, data, "", origins, problems=problems)
    problems.extend(on_command_line)  # in reading order: the files, then the command line
    errors, notes = cross_checks(recipe, origins, problems.keys | on_command_line.keys, world_size)
    problems.extend(errors)
    if problems:
        raise RecipeError(list(problems))
    for note in notes:
        warnings.warn(note, RecipeWarning, stacklevel=2)
    return recipe


def validate(r: Recipe, world_size: Optional[int] = None) -> None:
    """Cross-field checks that a type cannot express; RecipeError listing every failure."""
    errors, _ = cross_checks(r, {}, set(), world_size)
    if errors:
        raise RecipeError(errors)


def to_dict(r: Recipe) -> dict:
    return dataclasses.asdict(r)


def to_yaml(r: Recipe) -> str:
    return yaml.safe_dump(to_dict(r), sort_keys=False, default_flow_style=False)


def field_docs(cls=Recipe, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field, for `megammr config fields`."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, dotted))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((dotted, _type_name(tp), default, f.metadata.get("help", "")))
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):  # an optional section (data.curate): its keys
            rows.extend(field_docs(inner[0], dotted))
    return rows
