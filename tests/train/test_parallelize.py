"""The `parallel` section: what FSDP2 shards, and every setting that cannot run as written is refused before any
work (the multi-process runs themselves are in tests/train/test_parity.py)."""

from __future__ import annotations

import pytest
import torch

from zidong.config import ConfigError, load_config
from zidong.errors import UserError
from zidong.models.zidong.configuration_zidong import ZidongConfig
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.train.parallelize import shard_units
from zidong.train.recipe import PretrainRecipe
from zidong.train.strategies import chosen_strategy

TINY = "recipes/pretrain/tiny.yaml"


def recipe(*overrides: str) -> PretrainRecipe:
    return load_config(PretrainRecipe, TINY, list(overrides))


def test_every_transformer_layer_is_a_shard_unit_and_nothing_else() -> None:
    with torch.device("meta"):
        model = ZidongModel(ZidongConfig.from_preset("tiny"))
    units = shard_units(model)
    names = {module: name for name, module in model.named_modules()}
    expected = [
        *(f"text_model.encoder.layer.{i}" for i in range(model.config.text_config.num_hidden_layers)),
        *(f"vision_model.layers.{i}" for i in range(model.config.vision_config.num_hidden_layers)),
        *(f"speech_model.encoder.layers.{i}" for i in range(model.config.speech_config.num_hidden_layers)),
        *(f"fusion.layers.{i}" for i in range(model.config.fusion_num_layers)),
    ]
    assert sorted(names[unit] for unit in units) == sorted(expected)
    # the root keeps the rest: embeddings, front end, projections, heads (no parameter is in two units)
    in_units = {id(p) for unit in units for p in unit.parameters()}
    assert sum(p.numel() for unit in units for p in unit.parameters()) == sum(
        p.numel() for p in model.parameters() if id(p) in in_units
    )
    assert any(name.endswith("embeddings.word_embeddings.weight") for name, p in model.named_parameters()
               if id(p) not in in_units)  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "world_size", "deepspeed", "message"),
    [
        (
            ["parallel.strategy=fsdp"],
            2,
            True,
            "parallel.strategy=fsdp, but the launcher's Accelerate config chose DeepSpeed",
        ),
        (
            ["parallel.strategy=ddp"],
            2,
            True,
            "parallel.strategy=ddp, but the launcher's Accelerate config chose DeepSpeed",
        ),
        (
            ["parallel.strategy=hsdp", "parallel.shard_size=3"],
            4,
            False,
            "HSDP needs the 4 processes in whole groups of 3",
        ),
        (["parallel.strategy=fsdp", "parallel.param_dtype=bf16"], 2, False, "Set train.mixed_precision=bf16 too"),
    ],
    ids=["deepspeed-and-fsdp", "deepspeed-and-ddp", "hsdp-groups", "bf16-layers-in-float32"],
)
def test_settings_that_cannot_run_as_written_are_refused(
    overrides: list[str], world_size: int, deepspeed: bool, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        chosen_strategy(recipe(*overrides), world_size, deepspeed)


@pytest.mark.parametrize(
    ("overrides", "world_size", "deepspeed"),
    [
        ([], 2, True),  # auto: the launcher's DeepSpeed
        (["parallel.strategy=fsdp"], 1, False),  # one process: a mesh of 1
        (["parallel.strategy=hsdp", "parallel.shard_size=2"], 4, False),
        (["parallel.strategy=fsdp", "parallel.param_dtype=bf16", "train.mixed_precision=bf16"], 2, False),
    ],
)
def test_settings_that_can_run_pass(overrides: list[str], world_size: int, deepspeed: bool) -> None:
    chosen_strategy(recipe(*overrides), world_size, deepspeed)


def test_hsdp_groups_default_to_the_processes_of_a_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(UserError, match="whole groups of 3; use a shard size that divides 8"):
        chosen_strategy(recipe("parallel.strategy=hsdp"), 8, deepspeed=False)


def test_fsdp_asked_of_accelerate_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match=r"set parallel\.strategy=fsdp in the recipe"):
        chosen_strategy(recipe(), 2, deepspeed=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("parallel.shard_size=2", "only applies to parallel.strategy=hsdp"),
        ("parallel.param_dtype=bf16", "only applies to parallel.strategy=fsdp or hsdp"),
        ("parallel.reduce_dtype=bf16", "only applies to parallel.strategy=fsdp or hsdp"),
        ("parallel.reshard_after_forward=false", "only applies to parallel.strategy=fsdp or hsdp"),
        ("parallel.strategy=zero", "fsdp"),
        ("parallel.param_dtype=fp16", "bf16"),
    ],
)
def test_bad_parallel_keys_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        recipe(override)
    assert override.split("=")[0] in str(error.value)
