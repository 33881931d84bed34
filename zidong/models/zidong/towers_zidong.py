"""The towers: how each is built from its config (or a local pretrained folder), and what they hand to the
objectives: one tower's output, and everything the towers made of a batch.

Imports only torch and transformers so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass

import torch
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .arguments_zidong import Presence

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class TowerOutput:
    """One tower's output on the rows it ran on: text and speech pool by masked mean (independent of padding),
    vision as `vision_pooling` says (the class token for the presets' ViT)."""

    token_states: torch.Tensor  # (n, tokens, hidden)
    attention_mask: torch.Tensor  # (n, tokens) bool, True on real tokens
    pooled: torch.Tensor  # (n, hidden)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # the tower's own, when asked for
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class Encoded:
    """A batch of B samples after the towers: what every objective reads.

    `inputs[m]` holds the (values, attention mask or None) the tower of `m` ran on, `outputs[m]` its output (only
    the modalities that ran; under lockstep an absent one ran on a placeholder row), `presence[m]` which of the B
    samples have `m`, and `embeds[m]` the L2-normalised (B, projection_dim) embeddings with zero rows where a
    sample lacks `m` (None where the tower did not run)."""

    inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    outputs: dict[str, TowerOutput]  # the towers' outputs (`ZidongModel.towers()` are the modules)
    presence: Presence  # `presence[m]`: the (B,) bool mask on the device; `.host`, `.rows`, `.has(m)`
    embeds: dict[str, torch.Tensor | None]

    def present_matrix(self, modalities: tuple[str, ...]) -> torch.Tensor:
        """(B, len(modalities)) bool: which sample has which modality."""
        return torch.stack([self.presence[m] for m in modalities], dim=1)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def scatter_rows(rows: torch.Tensor, present: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of the present samples -> a tensor over the whole batch, zeros (or False) where absent.

    `index`: the indices of the present rows (`Presence.rows`), which place the rows without reading the mask on
    the host; a lockstep placeholder row (nothing present) is then left out."""
    full = rows.new_zeros((present.shape[0], *rows.shape[1:]))
    if index is None:
        full[present] = rows
        return full
    return full.index_copy(0, index, rows[: index.shape[0]])


def build_tower(config: PretrainedConfig, modality: str) -> PreTrainedModel:
    """The tower of `modality` in the joint `config`, new, without a pooler of its own: zidong pools the token
    states itself, so a BERT/ViT pooler would be computed, never trained, saved. A convolutional tower keeps its
    pooler: its pooled feature map is what zidong projects."""
    tower_config = getattr(config, f"{modality}_config")
    options = {"attn_implementation": tower_attention(config, modality)}
    if builds_without_pooler(tower_config):
        options["add_pooling_layer"] = False
    return AutoModel.from_config(tower_config, **options)


def pretrained_tower_weights(
    config: PretrainedConfig, modality: str, folder: str | os.PathLike
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """(the weights of the local pretrained tower in `folder` as its architecture, `AutoModel`, holds them, the
    names of those the checkpoint held): zidong's tower uses some, and builds no module for others (a BERT or
    ViT pooler). Torch's random state is left as it was found (the architecture initialises what the checkpoint
    lacks)."""
    with torch.random.fork_rng(devices=[]):
        tower, loading = AutoModel.from_pretrained(
            folder, attn_implementation=tower_attention(config, modality), output_loading_info=True
        )
    weights = tower.state_dict()
    return weights, set(weights) - set(loading["missing_keys"])


class KeptTowerWeights(nn.Module):
    """Weights of pretrained towers' checkpoints that zidong builds no module for (a BERT or ViT pooler), held as
    buffers: never trained nor in the optimizer, but in every checkpoint and export, so that `zidong export
    --towers` writes a loaded tower back as it came in. The joint config lists them (`kept_tower_weights`:
    modality -> name -> shape and dtype), so a model built from its config has room for them when it loads."""

    def __init__(self, listed: dict[str, dict[str, dict]] | None = None) -> None:
        super().__init__()
        for modality, weights in (listed or {}).items():
            for name, spec in weights.items():
                self.keep(modality, name, torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"])))

    def keep(self, modality: str, name: str, value: torch.Tensor) -> None:
        """Hold `value` as weight `name` of the tower of `modality` (e.g. "pooler.dense.weight")."""
        *parents, leaf = f"{modality}.{name}".split(".")
        module: nn.Module = self
        for part in parents:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_buffer(leaf, value.detach().clone())

    def of(self, modality: str) -> dict[str, torch.Tensor]:
        """The kept weights of the tower of `modality`, by their names in the tower."""
        held = self._modules.get(modality)
        return dict(held.named_buffers()) if held is not None else {}

    def listing(self) -> dict[str, dict[str, dict]]:
        """What the joint config's `kept_tower_weights` records of them."""
        return {
            modality: {
                name: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
                for name, value in self.of(modality).items()
            }
            for modality in self._modules
        }


def builds_without_pooler(tower_config: PretrainedConfig) -> bool:
    """Whether zidong builds this tower without its pooler (`add_pooling_layer=False`): a transformer whose class
    has that switch (BERT, ViT, DeiT, Swin...). A convolutional tower, and a class without the switch (CLIP's
    and SigLIP's vision towers, DINOv2), keep their own pooling."""
    takes_switch = "add_pooling_layer" in inspect.signature(MODEL_MAPPING[type(tower_config)].__init__).parameters
    return takes_switch and not is_convolutional(tower_config)


def vision_pooling(tower: PreTrainedModel) -> str:
    """How a vision tower's states become the one vector zidong projects:

    - "pooler": the tower's own `pooler_output`, where it keeps one: CLIP's post-layernorm of the class token,
      DINOv2's normalised class token, SigLIP's attention-pooling head, a convolutional tower's normalised mean;
    - "cls": the first (class) token, for a tower built without its pooler that has a class token (ViT, DeiT:
      their pooler is a dense layer on that token, which zidong leaves out);
    - "mean": the mean over all tokens, for a tower built without its pooler and without a class token (Swin,
      whose own pooler is that mean)."""
    config = tower.config
    keeps_pooler = not builds_without_pooler(config) and returns_pooler_output(type(tower))
    if keeps_pooler and getattr(config, "vision_use_head", True):  # SigLIP may be configured without its head
        return "pooler"
    class_token = any(
        name.rsplit(".", 1)[-1] in ("cls_token", "class_embedding") for name, _ in tower.named_parameters()
    )
    return "cls" if class_token else "mean"


def returns_pooler_output(tower_class: type[PreTrainedModel]) -> bool:
    """Whether the class's `forward` is annotated to return an output with a `pooler_output` field (ViTMAE's,
    for one, has none); False where the annotation does not say."""
    annotation = inspect.signature(tower_class.forward).return_annotation
    if isinstance(annotation, str):  # an unresolved annotation: judge by the output class's name
        return "Pooling" in annotation
    candidates = typing.get_args(annotation) or (annotation,)
    return any("pooler_output" in getattr(candidate, "__dataclass_fields__", {}) for candidate in candidates)


def tower_attention(config: PretrainedConfig, modality: str) -> str:
    """The tower's own attention implementation (its config's, as `from_pretrained(attn_implementation={...})`
    sets it per sub-config), else the joint config's, else SDPA; "eager" for a tower class without SDPA (a
    convolutional tower has no attention to dispatch)."""
    tower_config = getattr(config, f"{modality}_config")
    chosen = tower_config._attn_implementation_internal or config._attn_implementation_internal or "sdpa"
    return "eager" if chosen == "sdpa" and not MODEL_MAPPING[type(tower_config)]._supports_sdpa else chosen


def tower_width(config: PretrainedConfig, modality: str) -> int:
    """The width of the states the tower hands on (after its adapter, if it has one)."""
    tower_config = getattr(config, f"{modality}_config")
    if getattr(tower_config, "add_adapter", False) and getattr(tower_config, "output_hidden_size", None):
        return tower_config.output_hidden_size
    if is_convolutional(tower_config):
        return tower_config.hidden_sizes[-1]
    return tower_config.hidden_size


def is_convolutional(tower_config: PretrainedConfig) -> bool:
    """Whether the tower is a convolutional network (ConvNeXt, ResNet, RegNet...): stages of `hidden_sizes`
    channels ending in a feature map, rather than a transformer of `hidden_size`-wide tokens."""
    if dataclasses.is_dataclass(tower_config):  # transformers' own configs: the class's fields, not extra kwargs
        fields = {field.name for field in dataclasses.fields(tower_config)}
    else:
        fields = set(vars(tower_config))
    return "hidden_sizes" in fields and "hidden_size" not in fields


def vision_patch_size(config: PretrainedConfig) -> int | None:
    """The patch size of a vision transformer that hands on one token per patch (after a CLS token), which masked
    vision modelling and the patch count of FLOPs need; None for a convolutional tower."""
    tower_config = config.vision_config
    patch_size = getattr(tower_config, "patch_size", None)
    return None if is_convolutional(tower_config) or not isinstance(patch_size, int) else patch_size


def pretrained_tower_config(modality: str, folder: str | os.PathLike):
    """The config of a local pretrained tower folder, after checking that the folder holds a model."""
    field = f"model.{modality}.pretrained"
    if not os.path.isdir(folder):
        raise ValueError(f"{field}: {folder} is not a folder (give a local Hugging Face model folder)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{field}: {folder} holds no config.json, so it is not a Hugging Face model folder")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise ValueError(f"{field}: {folder} holds no model weights (expected one of {', '.join(WEIGHT_FILES)})")
    return AutoConfig.from_pretrained(folder)


__all__ = [
    "Encoded",
    "KeptTowerWeights",
    "TowerOutput",
    "build_tower",
    "builds_without_pooler",
    "masked_mean",
    "pretrained_tower_config",
    "pretrained_tower_weights",
    "scatter_rows",
    "tower_attention",
    "tower_width",
    "vision_patch_size",
    "vision_pooling",
]
