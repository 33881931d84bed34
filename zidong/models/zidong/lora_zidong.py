"""LoRA adapters on the towers, built by peft, as the joint config's `lora` says.

`config.lora` maps a modality to the settings of its tower's adapter: `{"r", "lora_alpha", "lora_dropout",
"target_modules"}` (peft's `LoraConfig` keys). A model whose config has it gets the adapters injected into those
towers when it is built (`peft.functional.inject_adapter_in_model`, the API peft offers integrations), so a
checkpoint or an export of a LoRA fine-tune loads back as it trained: base weights under `.base_layer.`, the
adapter's under `.lora_A.default.` / `.lora_B.default.` (peft's own names).

Out of the joint model, an adapter is a plain peft folder (`write_adapter`: `adapter_config.json` +
`adapter_model.safetensors`, written by `PeftModel.save_pretrained`) that `PeftModel.from_pretrained` loads onto
the tower exported by `zidong export --towers`, with neither zidong nor its config; `unload_lora` strips the
adapters from the towers, merging them into the base weights (`--merge-lora`) or leaving the base weights as
they were.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

# The attention's query and value projections, as the towers name them: where LoRA's paper and peft's defaults
# put the adapters. The first pair a tower holds as linear layers is its default.
QUERY_VALUE_NAMES = (("query", "value"), ("q_proj", "v_proj"), ("linear_q", "linear_v"), ("q", "v"))
LORA_PARAMETER = ".lora_"  # in the name of every parameter peft's LoRA layers add


def default_target_modules(tower: nn.Module) -> list[str]:
    """The names LoRA adapts in `tower` unless told: peft's default for its architecture where peft has one, else
    its attention's query and value projections. ValueError when the tower has neither."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(tower, "config", None), "model_type", None)
    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    held = linear_layer_names(tower)
    for pair in QUERY_VALUE_NAMES:
        if set(pair) <= held:
            return list(pair)
    raise ValueError(
        f"no default LoRA target modules for a {type(tower).__name__} (no query/value projections found); "
        f"name them, among its linear layers: {', '.join(sorted(held))}"
    )


def linear_layer_names(tower: nn.Module) -> set[str]:
    """The last names of the tower's linear layers (what `target_modules` matches)."""
    return {name.rpartition(".")[2] for name, module in tower.named_modules() if isinstance(module, nn.Linear)}


def add_lora(model: PreTrainedModel, specs: dict[str, dict[str, Any]]) -> None:
    """Inject an adapter into each tower `specs` names (modality -> LoraConfig keys) and record them in
    `model.config.lora`. ValueError naming the tower when its target modules are not among its layers."""
    from peft import LoraConfig
    from peft.functional import inject_adapter_in_model

    for modality, spec in specs.items():
        tower = model.towers()[modality]
        targets = set(spec["target_modules"])
        if not targets <= linear_layer_names(tower):
            raise ValueError(
                f"LoRA target modules {', '.join(sorted(targets - linear_layer_names(tower)))} are not linear layers "
                f"of the {modality} tower ({type(tower).__name__}); it has {', '.join(sorted(linear_layer_names(tower)))}"
            )
        inject_adapter_in_model(LoraConfig(**spec), tower)
    model.config.lora = {modality: dict(spec) for modality, spec in specs.items()} or None


def lora_towers(model: PreTrainedModel) -> list[str]:
    """The modalities whose towers carry an adapter."""
    return list(getattr(model.config, "lora", None) or {})


def is_lora_parameter(name: str) -> bool:
    return LORA_PARAMETER in name


def adapter_weights(tower: nn.Module) -> dict[str, Any]:
    """The adapter's tensors of one tower under the tower's own parameter names."""
    return {name: tensor for name, tensor in tower.state_dict().items() if is_lora_parameter(name)}


def unload_lora(model: PreTrainedModel, merge: bool) -> None:
    """Replace every LoRA layer of the towers by its base layer, first adding the adapter's product into the base
    weight when `merge`; `model.config.lora` is cleared."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for modality in lora_towers(model):
        tower = model.towers()[modality]
        layers = [(name, module) for name, module in tower.named_modules() if isinstance(module, BaseTunerLayer)]
        for name, layer in layers:
            if merge:
                layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(tower.get_submodule(parent_name), child, layer.get_base_layer())
        vars(tower).pop("peft_config", None)  # what the injection recorded on the tower
    model.config.lora = None


def write_adapter(tower: PreTrainedModel, spec: dict[str, Any], weights: dict[str, Any], folder: Path) -> None:
    """Write one tower's adapter as peft writes it, for `PeftModel.from_pretrained(tower, folder)`. `tower` must be
    the base tower (adapters unloaded, not merged); it carries the adapter again afterwards."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tower, LoraConfig(**spec))
    mismatch = tower.load_state_dict(weights, strict=False)
    if mismatch.unexpected_keys:
        raise ValueError(f"adapter weights the tower has no place for: {', '.join(mismatch.unexpected_keys[:3])}")
    peft_model.save_pretrained(folder)
