"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

Every component owns one small config dataclass next to its code; `launch/schema.py` assembles them into the
run's root config. Field documentation is the attribute docstring written under each field (the string literal
after the annotated assignment): `--help` reads it from the source, so there is no second copy to drift.

Validation happens once, at load time, before anything runs (and before any privacy is spent):
  * unknown keys are errors that list the allowed keys;
  * values are converted to the annotated type (int, float, str, bool, Literal[...], Optional[...], list[...],
    nested dataclasses) or rejected with the field's dotted name and the expected type;
  * each dataclass may define ``check(self)`` that raises :class:`ConfigError` for out-of-range values.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from dpalign.config import ConfigError, config_hash, require, to_dict

__all__ = ["ConfigError", "require", "to_dict", "config_hash", "load_config", "dump_yaml", "field_docs",
           "format_help", "describe_fields", "check_tree", "parse_override"]

T = TypeVar("T")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: ``{field_name: doc}``, read from the class source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:] + [None], strict=True):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ConfigError naming ``name``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{name}: got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{name}: must not be null; expected {_describe(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{name}: got {value!r}; expected {_describe(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: got {value!r}; expected {_describe(tp)}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_convert(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: got {value!r}; expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: got {value!r}; expected a mapping of {tp.__name__} fields")
        return _build(tp, value, name)
    if value is None:
        raise ConfigError(f"{name}: must not be null; expected {_describe(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: got {value!r}; expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{name}: got {value!r}; expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: got {value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: got {value!r}; expected a string")
        return value
    if isinstance(value, tp):
        return value
    raise ConfigError(f"{name}: got {value!r}; expected {_describe(tp)}")


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    where = f"{prefix}." if prefix else ""
    if unknown:
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key in {cls.__name__}; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for fname in fields:
        if fname in data:
            kwargs[fname] = _convert(data[fname], hints[fname], f"{where}{fname}")
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None
    check_tree(obj, prefix)
    return obj


def check_tree(obj: Any, prefix: str = "") -> None:
    """Run ``check()`` on a config dataclass and, recursively, on its nested dataclasses."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_tree(value, f"{prefix}.{f.name}" if prefix else f.name)
    checker = getattr(obj, "check", None)
    if callable(checker):
        try:
            checker()
        except ConfigError as err:
            msg = str(err)
            raise ConfigError(f"{prefix}.{msg}" if prefix and not msg.startswith(prefix + ".") else msg) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a dotted path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like section.field=value (for example sft.epochs=2)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{text}: an override must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> T:
    """Load ``cls`` from a YAML file (or defaults) and apply ``key=value`` overrides, then validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {p}: file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {p}: not valid YAML ({err})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {p}: the top level must be a mapping of sections")
        data = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value)
    return _build(cls, data)


def dump_yaml(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config (what actually ran) as YAML."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return p


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Rows ``(dotted_name, type, default, doc)`` for every leaf field; the source of ``--help``."""
    rows: list[tuple[str, str, Any, str]] = []
    hints = _type_hints(cls)
    docs = field_docs(cls)
    defaults = cls()  # every shipped config class has defaults for every field
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, name + "."))
        else:
            rows.append((name, _describe(tp), getattr(defaults, f.name), docs.get(f.name, "")))
    return rows


def format_help(cls: type) -> str:
    """Human help text listing every field with its type, default and docstring."""
    lines = []
    section = None
    for name, tp, default, doc in describe_fields(cls):
        head = name.split(".")[0] if "." in name else ""
        if head != section:
            section = head
            lines.append(f"\n[{head or 'top level'}]")
        lines.append(f"  {name}  ({tp}; default {default!r})")
        if doc:
            lines.extend("      " + line for line in textwrap.wrap(doc, 96))
    return "\n".join(lines).lstrip("\n")
