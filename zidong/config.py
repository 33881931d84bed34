"""Typed configs: YAML documents parsed into dataclasses, with `base:` inheritance and dotted overrides.

    recipe = load_config(PretrainRecipe, "recipes/pretrain/tiny.yaml", ["train.max_steps=100"])

The grammar, the same for every command that takes a recipe:

- A recipe is a YAML mapping whose keys are the fields of a schema dataclass; a nested dataclass is a nested
  mapping. `base: other.yaml` (relative to the file that names it) loads that recipe first and lays this one
  on top: mappings merge key by key, anything else (lists included) is replaced whole.
- Overrides `a.b.c=value` apply after all files. The value is read as YAML (`3`, `1e-4`, `true`, `null`,
  `[1, 2]`, `{path: x, weight: 2}`), except that a field typed `str` takes the text exactly as typed. A list
  element is addressed by its index: `data.train.0.weight=2`.
- Schema dataclasses check their own values in `__post_init__` and raise `InvalidValue(field, message)`.
- Every problem is collected, then reported together in one `ConfigError`: the key, where its value came from
  (file and line, or the command line), what was expected, and the closest valid key.

Only the standard library and PyYAML are imported here: a recipe is validated before any model or data is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from zidong.errors import UserError

T = TypeVar("T")

BASE_KEY = "base"
_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loading, except that `1e-4` is a number (PyYAML alone reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


class ConfigError(UserError):
    """One or more problems in a recipe or its overrides; the message lists them all."""


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


# --------------------------------------------------------------------------------------------- loading


def load_config(schema: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read the recipe at `path` (following `base:`), apply `overrides`, and build a `schema` instance.

    Raises:
        ConfigError: the file cannot be read or parsed, or any key, type or value is wrong.
    """
    raw, sources = _load_tree(Path(path), chain=())
    return _build_config(schema, raw, sources, overrides, f"recipe {path}")


def config_from_overrides(schema: type[T], overrides: Sequence[str], what: str) -> T:
    """Build `schema` from its defaults and `key=value` overrides alone (settings of a command without a file).

    Raises:
        ConfigError: a key, type or value is wrong; the message starts with "invalid {what}".
    """
    return _build_config(schema, {}, {}, overrides, what)


def _build_config(schema: type[T], raw: dict, sources: dict[str, str], overrides: Sequence[str], what: str) -> T:
    problems: list[str] = []
    for text in overrides:
        _apply_override(schema, raw, sources, text, problems)
    config = _Builder(schema, sources, problems).build(schema, raw, "")
    if problems:
        raise ConfigError(f"invalid {what}:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-data form of a built config (what `--print-config` shows and a run directory stores)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    """The config as a YAML document that `load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def _load_tree(path: Path, chain: tuple[Path, ...]) -> tuple[dict, dict[str, str]]:
    """Load one YAML file and, first, the `base:` chain under it; returns the merged data and key sources."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"recipe {path}: `base:` files form a cycle: {cycle}")
    data, lines = _read_yaml(path)
    sources = {key: f"{path}:{line}" for key, line in lines.items()}
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data, sources
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}:{lines[BASE_KEY]}: `base` must be the path of another recipe file")
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    if not base_path.is_file():
        raise ConfigError(
            f"{path}:{lines[BASE_KEY]}: `base: {base}` names {base_path}, which is not a file "
            "(a relative base is resolved from the folder of the recipe that names it)"
        )
    base_data, base_sources = _load_tree(base_path, (*chain, resolved))
    replaced = _merge_into(base_data, data, "")
    kept = {k: v for k, v in base_sources.items() if not any(_is_under(k, r) for r in replaced)}
    return base_data, {**kept, **sources}


def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """Parse a YAML mapping; also return the line of every key, by dotted path."""
    if not path.exists():
        raise ConfigError(f"recipe file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"recipe path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"cannot read recipe {path}: {err.strerror}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of keys to values, not {_describe_value(data)}")
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines, path)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int], path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = _join(prefix, str(key_node.value))
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{path}:{line}: key `{key}` appears twice (also on line {seen[key]})")
            seen[key] = lines[key] = line
            _collect_lines(value_node, key, lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = _join(prefix, str(index))
            lines[key] = item.start_mark.line + 1
            _collect_lines(item, key, lines, path)


def _merge_into(base: dict, top: dict, prefix: str) -> list[str]:
    """Lay `top` over `base` in place; return the paths whose base value was replaced rather than merged."""
    replaced = []
    for key, value in top.items():
        path = _join(prefix, str(key))
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            replaced += _merge_into(base[key], value, path)
        else:
            base[key] = value
            replaced.append(path)
    return replaced


# ------------------------------------------------------------------------------------------- overrides


def _apply_override(schema: type, raw: dict, sources: dict[str, str], text: str, problems: list[str]) -> None:
    where = f"command line `{text}`"
    key, sep, value_text = text.partition("=")
    if not sep or not _OVERRIDE_KEY.match(key):
        problems.append(f"{where}: an override must look like `section.key=value`, e.g. `train.max_steps=100`")
        return
    target = _field_type(schema, key.split("."))
    if isinstance(target, str):
        problems.append(f"{where}: {target}")
        return
    value = _parse_override_value(value_text, target)
    container: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if isinstance(container, list) and not (part.isdigit() and int(part) < len(container)):
            problems.append(f"{where}: `{here}` is not an element of the list of {len(container)} there")
            return
        if depth == len(parts) - 1:
            break
        child = container[int(part)] if isinstance(container, list) else container.get(part)
        if child is None and isinstance(container, dict):
            child = container[part] = {}
        elif not isinstance(child, dict | list):
            problems.append(f"{where}: `{here}` holds a value, not a section")
            return
        container = child
    if isinstance(container, list):
        container[int(parts[-1])] = value
    else:
        container[parts[-1]] = value
    for stale in [k for k in sources if _is_under(k, key)]:
        del sources[stale]
    sources[key] = where


def _parse_override_value(text: str, target: Any) -> Any:
    if _unwrap_optional(target) is str and not (_is_optional(target) and text in ("null", "~")):
        return text
    try:
        return yaml.load(text, Loader=_Loader) if text else ""
    except yaml.YAMLError:
        return text


def _field_type(schema: type, parts: list[str]) -> Any:
    """The declared type at a dotted path in the schema, or a message saying why the path is not valid."""
    tp: Any = schema
    for depth, part in enumerate(parts):
        tp = _unwrap_optional(tp)
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


class _Builder:
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
        if _is_optional(tp):
            return None if value is None else self.build(_unwrap_optional(tp), value, path)
        if dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, value, path)
        origin = typing.get_origin(tp)
        if origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(tp)
            return [self.build(item_type, item, _join(path, str(i))) for i, item in enumerate(value)]
        if origin is dict and isinstance(value, dict):
            item_type = typing.get_args(tp)[1]
            return {str(k): self.build(item_type, v, _join(path, str(k))) for k, v in value.items()}
        if _matches_scalar(tp, value):
            return float(value) if tp is float else value
        self.fail(path, f"expected {_describe_type(tp)}, got {_describe_value(value)}")
        return None

    def build_dataclass(self, tp: type, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            self.fail(path, f"expected {_describe_type(tp)}, got {_describe_value(value)}")
            return None
        hints = _schema_fields(tp)
        problems_before = len(self.problems)
        for key in value:
            if str(key) not in hints:
                key_path = _join(path, str(key))
                where = self.where(key_path)
                message = _unknown_key_message(self.schema, key_path, path, list(hints))
                self.problems.append(f"{where}: {message}" if where else message)
        kwargs = {}
        for name, field_type in hints.items():
            field_path = _join(path, name)
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
            self.fail(_join(path, err.field), err.message)
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


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _unwrap_optional(tp: Any) -> Any:
    if not _is_optional(tp):
        return tp
    rest = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(rest) != 1:
        raise TypeError(f"config fields may only be `X | None` unions, not {tp}")
    return rest[0]


def _matches_scalar(tp: Any, value: Any) -> bool:
    if typing.get_origin(tp) is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(tp))
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return tp in (str, bool) and isinstance(value, tp)


def _describe_type(tp: Any) -> str:
    if _is_optional(tp):
        return f"{_describe_type(_unwrap_optional(tp))} or null"
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


def _describe_value(value: Any) -> str:
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
        return _join(section, near[0])
    everywhere = list(_all_keys(schema, ""))
    leaf = key_path.rpartition(".")[2]
    same_leaf = [k for k in everywhere if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[0]
    near = difflib.get_close_matches(key_path, everywhere, n=1, cutoff=0.6)
    return near[0] if near else None


def _all_keys(tp: Any, prefix: str) -> Iterable[str]:
    tp = _unwrap_optional(tp)
    if not dataclasses.is_dataclass(tp):
        return
    for name, field_type in _schema_fields(tp).items():
        path = _join(prefix, name)
        yield path
        yield from _all_keys(field_type, path)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _is_under(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".")
