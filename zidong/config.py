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
The checks against the schema (types, required keys, messages) are zidong/schema.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from zidong.errors import UserError
from zidong.schema import (
    InvalidValue,
    SchemaBuilder,
    describe_value,
    field_type,
    is_optional,
    is_under,
    join_path,
    unwrap_optional,
)

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
    config = SchemaBuilder(schema, sources, problems).build(schema, raw, "")
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
    kept = {k: v for k, v in base_sources.items() if not any(is_under(k, r) for r in replaced)}
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
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of keys to values, not {describe_value(data)}")
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines, path)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int], path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = join_path(prefix, str(key_node.value))
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{path}:{line}: key `{key}` appears twice (also on line {seen[key]})")
            seen[key] = lines[key] = line
            _collect_lines(value_node, key, lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = join_path(prefix, str(index))
            lines[key] = item.start_mark.line + 1
            _collect_lines(item, key, lines, path)


def _merge_into(base: dict, top: dict, prefix: str) -> list[str]:
    """Lay `top` over `base` in place; return the paths whose base value was replaced rather than merged."""
    replaced = []
    for key, value in top.items():
        path = join_path(prefix, str(key))
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
    target = field_type(schema, key.split("."))
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
    for stale in [k for k in sources if is_under(k, key)]:
        del sources[stale]
    sources[key] = where


def _parse_override_value(text: str, target: Any) -> Any:
    if unwrap_optional(target) is str and not (is_optional(target) and text in ("null", "~")):
        return text
    try:
        return yaml.load(text, Loader=_Loader) if text else ""
    except yaml.YAMLError:
        return text


__all__ = [
    "ConfigError",
    "InvalidValue",
    "config_from_overrides",
    "load_config",
    "to_dict",
    "to_yaml",
]
