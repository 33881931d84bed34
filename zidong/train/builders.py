"""What a task builds its model from: the demo corpus, the tokenizer, the model config a recipe describes, a new
model, and the training settings `setup` applies to whatever model a task built.

A leaf: imported by the tasks (zidong/train/task.py, zidong/train/finetune.py), by `setup` and by `--dry-run`,
it imports none of them.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

from zidong.errors import UserError
from zidong.models.zidong.configuration_zidong import MODALITIES, ZidongConfig
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.models.zidong.towers_zidong import build_tower, pretrained_tower_config, vision_patch_size
from zidong.train.recipe import PretrainRecipe
from zidong.utils.log import get_logger

logger = get_logger(__name__)


def ensure_demo_corpus(recipe: PretrainRecipe, accelerator: Accelerator) -> None:
    """`data.demo`: build the demo corpus there on the first run (the main process; the others wait)."""
    if recipe.data.demo is None:
        return
    from zidong.data.demo import ensure_demo

    with accelerator.main_process_first():
        if accelerator.is_main_process:
            ensure_demo(Path(recipe.data.demo))


def load_tokenizer(recipe: PretrainRecipe):
    source = recipe.model.tokenizer or recipe.model.text.pretrained
    if source is None:
        raise UserError("model.tokenizer is not set: give a tokenizer folder (see `zidong tokenizer train`)")
    if not Path(source).is_dir():
        raise UserError(f"model.tokenizer={source}: no such folder (train one with `zidong tokenizer train`)")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"model.tokenizer={source}: cannot load a tokenizer there ({err})") from None


def model_config(recipe: PretrainRecipe, tokenizer=None) -> ZidongConfig:
    """The model config a recipe describes: its preset with the recipe's tower config keys, the configs of its
    pretrained towers and, given the tokenizer, its mask token and (for a from-scratch text tower) its
    vocabulary."""
    overrides: dict[str, Any] = {}
    try:
        for modality in MODALITIES:
            tower = getattr(recipe.model, modality)
            if tower.pretrained and tower.config:
                raise ValueError(
                    f"model.{modality}: give `pretrained` or `config`, not both (a pretrained tower brings its own "
                    "config.json)"
                )
            if tower.pretrained:
                overrides[f"{modality}_config"] = pretrained_tower_config(modality, tower.pretrained).to_dict()
            elif tower.config:
                overrides[modality] = dict(tower.config)
    except ValueError as err:
        raise UserError(str(err)) from None
    if tokenizer is not None:
        overrides["mask_token_id"] = tokenizer.mask_token_id
        if "text_config" not in overrides:
            vocabulary = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
            overrides["text"] = {**overrides.get("text", {}), **vocabulary}
    overrides.update(_model_fields(recipe.model.config))
    configured = [m for m in MODALITIES if getattr(recipe.model, m).config]
    try:
        config = ZidongConfig.from_preset(recipe.model.preset, **overrides)
    except (ValueError, TypeError) as err:
        given = ", ".join(["model.config"] * bool(recipe.model.config) + [f"model.{m}.config" for m in configured])
        raise UserError(f"the model config is not valid{f' (check {given})' if given else ''}: {err}") from None
    for modality in configured:
        _check_tower_builds(config, modality)
    if recipe.loss.masked_vision.weight and vision_patch_size(config) is None:
        raise UserError(
            f"loss.masked_vision.weight={recipe.loss.masked_vision.weight}: masked vision modelling needs a vision "
            f"transformer (one token per image patch); this {config.vision_config.model_type} vision tower is "
            "convolutional: set loss.masked_vision.weight=0"
        )
    return config


def _model_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """`model.config`, checked against the top-level fields of ZidongConfig a recipe may set (the towers have
    their own sections, the tokenizer sets the mask token, fine-tuning the classified modality)."""
    set_elsewhere = {"text_config", "vision_config", "speech_config", "mask_token_id", "classification_modality"}
    own = (f.name for f in dataclasses.fields(ZidongConfig) if f.name in ZidongConfig.__annotations__)
    allowed = sorted(set(own) - set_elsewhere)
    defaults = {f.name: f.default for f in dataclasses.fields(ZidongConfig)}
    for key, value in fields.items():
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" Did you mean `model.config.{near[0]}`?" if near else ""
            raise UserError(
                f"model.config.{key}: not a field of the model config; "
                f"the fields a recipe may set: {', '.join(allowed)}.{hint}"
            )
        default = defaults[key]
        if isinstance(default, int | float) and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise UserError(f"model.config.{key}: expected a number (default {default!r}), got {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise UserError(f"model.config.{key}: expected text (default {default!r}), got {value!r}")
    return dict(fields)


def _check_tower_builds(config: ZidongConfig, modality: str) -> None:
    """Build the tower a recipe configured on the meta device (shapes only), so that a config its architecture
    cannot be built from fails here with the key to fix, before any data or weights are touched."""
    try:
        with torch.device("meta"):
            build_tower(config, modality)
    except Exception as err:  # the architecture's own code: any failure comes from the given config
        raise UserError(
            f"model.{modality}.config: a {getattr(config, f'{modality}_config').model_type} tower cannot be built "
            f"from it ({type(err).__name__}: {err}); check its keys against that architecture's config class"
        ) from None


def new_model(recipe: PretrainRecipe, tokenizer) -> ZidongModel:
    """A new model as the recipe describes it, its pretrained towers loaded."""
    config = model_config(recipe, tokenizer)
    try:
        model = ZidongModel(config)
        model.load_pretrained_towers({m: getattr(recipe.model, m).pretrained for m in MODALITIES})
    except ValueError as err:
        raise UserError(str(err)) from None
    return model


def apply_train_settings(model: torch.nn.Module, recipe: PretrainRecipe) -> torch.nn.Module:
    """Activation checkpointing as the recipe says."""
    if recipe.train.activation_checkpointing:
        model.base_model.activation_checkpointing_enable()  # a classifier wraps the joint model
    return model
