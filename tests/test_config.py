"""The recipe grammar: YAML into typed dataclasses, `base:` inheritance, dotted overrides, and every error path."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from zidong.config import ConfigError, InvalidValue, load_config, to_yaml


@dataclass
class Source:
    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise InvalidValue("weight", f"must be greater than 0, got {self.weight}")


@dataclass
class Optim:
    max_steps: int = 10
    lr: float = 1e-3
    fused: bool = False
    precision: Literal["no", "bf16"] = "no"


@dataclass
class Tower:
    pretrained: str | None = None


@dataclass
class Schema:
    name: str
    sources: list[Source] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)
    tower: Tower = field(default_factory=Tower)
    tags: dict[str, int] = field(default_factory=dict)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(schema: type, path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(schema, path, overrides or [])
    return str(caught.value)


# ------------------------------------------------------------------------------------ happy paths


def test_yaml_builds_typed_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "r.yaml",
        """
        name: demo
        sources:
          - {path: a, weight: 2}
          - {path: b}
        optim: {max_steps: 5, lr: 1, precision: bf16}
        tags: {x: 1}
    """,
    )
    config = load_config(Schema, path)
    assert config.sources == [Source("a", 2.0), Source("b", 1.0)]
    assert config.optim == Optim(max_steps=5, lr=1.0, fused=False, precision="bf16")
    assert isinstance(config.optim.lr, float)
    assert config.tags == {"x": 1}
    assert config.tower.pretrained is None


def test_overrides_parse_values_by_field_type(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\nsources: [{path: a}]\n")
    config = load_config(
        Schema,
        path,
        [
            "optim.max_steps=100",
            "optim.lr=2e-4",
            "optim.fused=true",
            "name=007",  # a str field keeps the text exactly as typed
            "tower.pretrained=/models/vit",
            "sources.0.weight=3",
            "tags.new=4",
        ],
    )
    assert config.optim.max_steps == 100
    assert config.optim.lr == pytest.approx(2e-4)
    assert config.optim.fused is True
    assert config.name == "007"
    assert config.tower.pretrained == "/models/vit"
    assert config.sources[0].weight == 3.0
    assert config.tags == {"new": 4}


def test_override_replaces_a_list_and_null_clears_an_optional(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\nsources: [{path: a}]\ntower: {pretrained: /x}\n")
    config = load_config(Schema, path, ["sources=[{path: b, weight: 2}, {path: c}]", "tower.pretrained=null"])
    assert config.sources == [Source("b", 2.0), Source("c", 1.0)]
    assert config.tower.pretrained is None


def test_later_override_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\n")
    assert load_config(Schema, path, ["optim.max_steps=1", "optim.max_steps=7"]).optim.max_steps == 7


def test_base_chain_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    write(
        tmp_path,
        "shared/root.yaml",
        """
        name: root
        sources: [{path: a}, {path: b}]
        optim: {max_steps: 1, lr: 0.5}
    """,
    )
    write(tmp_path, "shared/middle.yaml", "base: root.yaml\noptim: {max_steps: 2}\n")
    child = write(tmp_path, "recipes/child.yaml", "base: ../shared/middle.yaml\nsources: [{path: c}]\n")
    config = load_config(Schema, child, ["optim.fused=true"])
    assert config.name == "root"
    assert config.sources == [Source("c")]
    assert config.optim == Optim(max_steps=2, lr=0.5, fused=True)


def test_printed_config_loads_back_equal(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: 'x: y'\nsources: [{path: a, weight: 2}]\ntags: {k: 3}\n")
    config = load_config(Schema, path, ["optim.precision=bf16"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(to_yaml(config), encoding="utf-8")
    assert load_config(Schema, printed) == config


def test_empty_recipe_uses_defaults_but_reports_required(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "")
    message = problems_of(Schema, path)
    assert "missing required value `name` (a string)" in message
    assert load_config(Schema, path, ["name=x"]).optim == Optim()


# ------------------------------------------------------------------------------------ error paths


def test_unknown_key_in_file_names_file_line_and_closest_key(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\noptim:\n  max_step: 3\n")
    message = problems_of(Schema, path)
    assert f"{path}:3" in message
    assert "unknown key `optim.max_step`" in message
    assert "Did you mean `optim.max_steps`?" in message
    assert "max_steps, lr, fused, precision" in message


def test_unknown_key_in_wrong_section_suggests_where_it_lives(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\nmax_steps: 3\n")
    assert "Did you mean `optim.max_steps`?" in problems_of(Schema, path)


def test_unknown_override_names_the_whole_key(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\n")
    message = problems_of(Schema, path, ["not.a.key=1"])
    assert "command line `not.a.key=1`" in message
    assert "unknown key `not.a.key`" in message
    assert "valid keys at the top level: name, sources, optim, tower, tags" in message


def test_misspelt_override_section_suggests_the_section(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\n")
    assert "Did you mean `optim`?" in problems_of(Schema, path, ["optm.lr=1"])


def test_wrong_type_in_file_names_expected_type_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\noptim:\n  lr: fast\n  max_steps: 2.5\n  fused: 1\n")
    message = problems_of(Schema, path)
    assert f"{path}:3: `optim.lr`: expected a number, got the string 'fast'" in message
    assert f"{path}:4: `optim.max_steps`: expected an integer, got the number 2.5" in message
    assert f"{path}:5: `optim.fused`: expected true or false, got the number 1" in message


def test_wrong_type_in_override(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\n")
    message = problems_of(Schema, path, ["optim.max_steps=many"])
    assert "command line `optim.max_steps=many`: `optim.max_steps`: expected an integer" in message


def test_literal_lists_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\noptim: {precision: fp8}\n")
    assert "expected one of 'no', 'bf16', got the string 'fp8'" in problems_of(Schema, path)


def test_yaml_words_read_as_booleans_still_name_a_literal_choice(tmp_path: Path) -> None:
    # YAML 1.1 reads a bare `no` (and `off`) as false: `precision: no` and `optim.precision=no` mean "no"
    path = write(tmp_path, "r.yaml", "name: demo\noptim: {precision: no}\n")
    assert load_config(Schema, path, []).optim.precision == "no"
    assert load_config(Schema, path, ["optim.precision=bf16", "optim.precision=no"]).optim.precision == "no"
    path = write(tmp_path, "r.yaml", "name: demo\noptim: {precision: yes}\n")
    assert "expected one of 'no', 'bf16', got true" in problems_of(Schema, path)


def test_section_given_a_scalar(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\noptim: 3\n")
    assert "`optim`: expected a section with keys max_steps, lr, fused, precision" in problems_of(Schema, path)


def test_list_of_sections_given_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\nsources: data/x\n")
    message = problems_of(Schema, path)
    assert "`sources`: expected a list of sections with keys path, weight, got the string 'data/x'" in message


def test_invalid_value_names_the_nested_key_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\nsources:\n  - path: a\n    weight: -1\n")
    message = problems_of(Schema, path)
    assert f"{path}:4: `sources.0.weight`: must be greater than 0, got -1.0" in message


def test_missing_required_key_inside_a_list_item(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\nsources: [{weight: 2}]\n")
    assert "missing required value `sources.0.path` (a string)" in problems_of(Schema, path)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "optim: {lr: x}\nbogus: 1\n")
    message = problems_of(Schema, path, ["optim.max_steps=y"])
    assert message.count("\n  - ") == 4  # bogus, lr, max_steps, missing name


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("max_steps", "an override must look like `section.key=value`"),
        ("=3", "an override must look like `section.key=value`"),
        ("optim..lr=3", "an override must look like `section.key=value`"),
        ("optim.lr.x=3", "`optim.lr` is a single value (a number), not a section"),
        ("sources.x=3", "`sources` is a list: address an element by its index"),
        ("sources.5.weight=3", "`sources.5` is not an element of the list of 1 there"),
    ],
)
def test_malformed_overrides(tmp_path: Path, override: str, expected: str) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\nsources: [{path: a}]\n")
    assert expected in problems_of(Schema, path, [override])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed\n", "YAML syntax error"),
        ("- a\n- b\n", "a recipe must be a YAML mapping of keys to values, not a list of 2"),
        ("name: a\nname: b\n", "key `name` appears twice (also on line 1)"),
        ("base: 3\nname: a\n", "`base` must be the path of another recipe file"),
        ("base: nowhere.yaml\nname: a\n", "`base: nowhere.yaml` names"),
    ],
)
def test_unreadable_recipes(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems_of(Schema, write(tmp_path, "r.yaml", text))


def test_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\noptim: {lr: 1\n")
    assert f"{path}:3:1: YAML syntax error" in problems_of(Schema, path)


def test_base_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "base: b.yaml\nname: a\n")
    b = write(tmp_path, "b.yaml", "base: a.yaml\n")
    assert "`base:` files form a cycle" in problems_of(Schema, b)


def test_missing_file_folder_and_non_utf8(tmp_path: Path) -> None:
    assert "recipe file not found" in problems_of(Schema, tmp_path / "nope.yaml")
    assert "recipe path is not a file" in problems_of(Schema, tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in problems_of(Schema, latin1)


def test_error_in_base_file_points_at_the_base_file(tmp_path: Path) -> None:
    root = write(tmp_path, "root.yaml", "name: demo\noptim:\n  lr: fast\n")
    child = write(tmp_path, "child.yaml", "base: root.yaml\n")
    assert f"{root}:3: `optim.lr`" in problems_of(Schema, child)


def test_error_in_value_replaced_by_override_points_at_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, "r.yaml", "name: demo\nsources: [{path: a}]\n")
    message = problems_of(Schema, path, ["sources=[{path: b, weight: 0}]"])
    assert "command line `sources=[{path: b, weight: 0}]`: `sources.0.weight`: must be greater than 0" in message


def test_names_spelled_out_for_light_imports_match_their_owners() -> None:
    # the recipe schema, the CLI and `zidong report` list these without importing the model or trainer
    from dataclasses import fields

    from zidong.cli import EXPORT_DTYPES, FINETUNE_TASKS
    from zidong.export.folders import DTYPES
    from zidong.modalities import MODALITIES
    from zidong.models.zidong import configuration_zidong
    from zidong.models.zidong.modeling_zidong import OBJECTIVES
    from zidong.models.zidong.objectives_zidong import objective_names
    from zidong.objectives import OBJECTIVE_NAMES
    from zidong.train.finetune import TASKS
    from zidong.train.recipe import LossSection
    from zidong.train.report import LOSS_KEYS

    assert tuple(field.name for field in fields(LossSection)) == OBJECTIVES
    assert ("loss", *OBJECTIVES) == LOSS_KEYS
    assert OBJECTIVE_NAMES == objective_names() == OBJECTIVES  # the model registry's names, spelled out torch-free
    assert tuple(TASKS) == FINETUNE_TASKS
    assert tuple(DTYPES) == EXPORT_DTYPES
    assert MODALITIES == configuration_zidong.MODALITIES  # the model folder's own copy (it ships as remote code)
