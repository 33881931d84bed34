"""Checking YAML data against a schema dataclass: types, required fields, allowed values, and messages that
name the key, where its value came from and the closest valid key. Used by zidong/config.py.

Only the standard library is imported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, Union


class InvalidValue(ValueError):
    """Raised by a schema's `__post_init__` for a value of the right type that is not allowed.

    Args:
        field: the offending field, relative to the dataclass raising it (dots reach into sub-sections).
        message: what is wrong and what is allowed, e.g. "must be at least 1, got 0".
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def field_type(schema: type, parts: list[str]) -> Any:
    """The declared type at a dotted path in the schema, or a message saying why the path is not valid."""
    tp: Any = schema
    for depth, part in enumerate(parts):
        tp = unwrap_optional(tp)
        here = ".".join(parts[:depth])
        if dataclasses.is_dataclass(tp):
            hints = _schema_fields(tp)
            if part not in hints:
                return _unknown_key_message(schema, ".".join(parts), here, list(hints))
            tp = hints[part]
        elif typing.get_origin(tp) is list:
            if not part.isdigit():
                return f"`{here}` is a list: address an element by its index, e.g. `{here}.0`"
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif tp is Any:
            return Any
        else:
            return f"`{here}` is a single value ({_describe_type(tp)}), not a section: set it as `{here}=...`"
    return tp


# -------------------------------------------------------------------------------------------- building


class SchemaBuilder:
    """Turns merged YAML data into schema instances, collecting every problem instead of stopping at one."""

    def __init__(self, schema: type, sources: dict[str, str], problems: list[str]):
        self.schema = schema
        self.sources = sources
        self.problems = problems

    def fail(self, path: str, message: str) -> None:
        where = self.where(path)
        self.problems.append(f"{where}: `{path}`: {message}" if where else f"`{path}`: {message}")

    def where(self, path: str) -> str:
        """The source of the nearest key at or above `path` (its own line, else its section's)."""
        while path:
            if path in self.sources:
                return self.sources[path]
            path = path.rpartition(".")[0]
        return ""

    def build(self, tp: Any, value: Any, path: str) -> Any:
        if tp is Any:
            return value
        if is_optional(tp):
            return None if value is None else self.build(unwrap_optional(tp), value, path)
        if dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, value, path)
        origin = typing.get_origin(tp)
        if origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(tp)
            return [self.build(item_type, item, join_path(path, str(i))) for i, item in enumerate(value)]
        if origin is dict and isinstance(value, dict):
            item_type = typing.get_args(tp)[1]
            return {str(k): self.build(item_type, v, join_path(path, str(k))) for k, v in value.items()}
        value = _unread_yaml_boolean(tp, value)
        if _matches_scalar(tp, value):
            return float(value) if tp is float else value
        self.fail(path, f"expected {_describe_type(tp)}, got {describe_value(value)}")
        return None

    def build_dataclass(self, tp: type, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            self.fail(path, f"expected {_describe_type(tp)}, got {describe_value(value)}")
            return None
        hints = _schema_fields(tp)
        problems_before = len(self.problems)
        for key in value:
            if str(key) not in hints:
                key_path = join_path(path, str(key))
                where = self.where(key_path)
                message = _unknown_key_message(self.schema, key_path, path, list(hints))
                self.problems.append(f"{where}: {message}" if where else message)
        kwargs = {}
        for name, field_type in hints.items():
            field_path = join_path(path, name)
            if name in value:
                kwargs[name] = self.build(field_type, value[name], field_path)
            elif _is_required(tp, name):
                self.problems.append(
                    f"missing required value `{field_path}` ({_describe_type(field_type)}): "
                    f"set it in the recipe or pass `{field_path}=...`"
                )
        if len(self.problems) > problems_before:
            return None
        try:
            return tp(**kwargs)
        except InvalidValue as err:
            self.fail(join_path(path, err.field), err.message)
        except (TypeError, ValueError) as err:
            self.fail(path or tp.__name__, str(err))
        return None


# ------------------------------------------------------------------------------------ type inspection


def _schema_fields(tp: type) -> dict[str, Any]:
    hints = typing.get_type_hints(tp)
    return {f.name: hints[f.name] for f in dataclasses.fields(tp) if f.init}


def _is_required(tp: type, name: str) -> bool:
    field = next(f for f in dataclasses.fields(tp) if f.name == name)
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def unwrap_optional(tp: Any) -> Any:
    if not is_optional(tp):
        return tp
    rest = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(rest) != 1:
        raise TypeError(f"config fields may only be `X | None` unions, not {tp}")
    return rest[0]


# the words YAML 1.1 (PyYAML) reads as booleans
_YAML_BOOLEAN_WORDS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}


def _unread_yaml_boolean(tp: Any, value: Any) -> Any:
    """A bare `no` (or `off`, ...) for a choice among strings that include it: YAML 1.1 read the word as a boolean,
    so `mixed_precision: no` arrives as false; give back the word it was."""
    if not isinstance(value, bool) or typing.get_origin(tp) is not Literal:
        return value
    words = [choice for choice in typing.get_args(tp) if choice in _YAML_BOOLEAN_WORDS[value]]
    return words[0] if len(words) == 1 else value


def _matches_scalar(tp: Any, value: Any) -> bool:
    if typing.get_origin(tp) is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp))
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return tp in (str, bool) and isinstance(value, tp)


def _describe_type(tp: Any) -> str:
    if is_optional(tp):
        return f"{_describe_type(unwrap_optional(tp))} or null"
    if dataclasses.is_dataclass(tp):
        return "a section with keys " + ", ".join(_schema_fields(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_plural(_describe_type(args[0]))}"
    if origin is dict:
        return f"a mapping of names to {_plural(_describe_type(args[1]))}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(description: str) -> str:
    for article in ("an ", "a "):
        if description.startswith(article):
            rest = description[len(article) :]
            head, _, tail = rest.partition(" ")
            return f"{head}s {tail}".strip()
    return description


def describe_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "a mapping with keys " + ", ".join(str(k) for k in value)
    return type(value).__name__


# ---------------------------------------------------------------------------------------- suggestions


def _unknown_key_message(schema: type, key_path: str, section: str, valid: list[str]) -> str:
    place = f"in section `{section}`" if section else "at the top level"
    message = f"unknown key `{key_path}`; valid keys {place}: {', '.join(valid)}"
    suggestion = _closest_key(schema, key_path, section, valid)
    return f"{message}. Did you mean `{suggestion}`?" if suggestion else message


def _closest_key(schema: type, key_path: str, section: str, valid: list[str]) -> str | None:
    """The valid key the user most likely meant: a near spelling in the same section, else anywhere."""
    misspelt = key_path[len(section) :].lstrip(".").split(".")[0]
    near = difflib.get_close_matches(misspelt, valid, n=1, cutoff=0.6)
    if near:
        return join_path(section, near[0])
    everywhere = list(_all_keys(schema, ""))
    leaf = key_path.rpartition(".")[2]
    same_leaf = [k for k in everywhere if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[0]
    near = difflib.get_close_matches(key_path, everywhere, n=1, cutoff=0.6)
    return near[0] if near else None


def _all_keys(tp: Any, prefix: str) -> Iterable[str]:
    tp = unwrap_optional(tp)
    if not dataclasses.is_dataclass(tp):
        return
    for name, field_type in _schema_fields(tp).items():
        path = join_path(prefix, name)
        yield path
        yield from _all_keys(field_type, path)


def join_path(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def is_under(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".")
