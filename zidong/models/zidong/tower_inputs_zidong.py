"""The kinds of input a tower reads: one `TowerInput` per kind, in `TOWER_INPUTS` (`register_tower_input` adds one).

A kind says which towers it serves (`serves(tower_config)`, for its modality), how such a tower runs on a batch's
rows and what comes out for the objectives (`encode` -> `TowerOutput`), the one short valid row lockstep runs
where a batch lacks the modality (`placeholder`), and how many tokens each row gives the tower (`tokens`, on the
collated batch on the host: model FLOPs and MFU are counted from it). Each tower of a `ZidongModel` gets the last
registered kind that serves it when the model is built (`model.tower_inputs`).

The kinds that ship: token ids (text), pixel values (a vision transformer; a convolutional network, whose tokens
are the equivalent of its forward FLOPs), waveforms and filterbank steps (a speech tower whose main input is
`input_values` or `input_features`; both read 16 kHz waveforms, the second through the model's batched
filterbank).

Imports only torch, numpy and transformers so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import MODEL_MAPPING, AutoModel, PretrainedConfig

from .arguments_zidong import given_switches
from .feature_extraction_zidong import frame_shift_samples
from .towers_zidong import TowerOutput, is_convolutional, masked_mean, vision_patch_size

if TYPE_CHECKING:
    from .modeling_zidong import ZidongModel


class TowerInput:
    """One kind of tower input. Subclass it, set `modality`, say which tower configs it serves, and write
    `encode`, `placeholder` and `tokens`; then `register_tower_input(MyKind)` before the model is built."""

    modality: ClassVar[str]

    def __init__(self, config: PretrainedConfig) -> None:
        self.config = config  # the joint model's config

    @classmethod
    def serves(cls, tower_config: PretrainedConfig) -> bool:
        """Whether this kind feeds a tower built from `tower_config` (of its modality)."""
        return True

    def encode(
        self, model: ZidongModel, values: torch.Tensor, mask: torch.Tensor | None = None, **switches: bool | None
    ) -> TowerOutput:
        """The tower on `values` (n rows) and their padding `mask` (None: all real); `switches`: the tower's
        `output_hidden_states` / `output_attentions`."""
        raise NotImplementedError

    def placeholder(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One short, valid input row: (values, mask or None)."""
        raise NotImplementedError

    def tokens(self, values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """(n,) tokens each row gives the tower (for model FLOPs: 6 x parameters x tokens)."""
        raise NotImplementedError


class TokenIds(TowerInput):
    """Text: token ids and their padding mask; pooled by the masked mean (independent of padding)."""

    modality = "text"

    def encode(self, model, values, mask=None, **switches) -> TowerOutput:
        mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
        output = model.text_model(input_ids=values, attention_mask=mask.long(), **given_switches(switches))
        states = output.last_hidden_state
        return TowerOutput(states, mask, masked_mean(states, mask), output.hidden_states, output.attentions)

    def placeholder(self, device, dtype):
        token = self.config.text_config.pad_token_id or 0
        return torch.full((1, 2), token, dtype=torch.long, device=device), None

    def tokens(self, values, mask):
        return (np.ones(values.shape[:2], dtype=np.int64) if mask is None else mask).sum(axis=1)


class PixelValues(TowerInput):
    """Vision: (n, channels, height, width) pixel values; pooled as `model.vision_pooling` says. A vision
    transformer gives one token per patch after its class token."""

    modality = "vision"

    def encode(self, model, values, mask=None, **switches) -> TowerOutput:
        output = model.vision_model(pixel_values=values, **given_switches(switches))
        states = output.last_hidden_state
        if states.dim() == 4:  # a convolutional tower's feature map: one token per position
            states = states.flatten(2).transpose(1, 2)
        if model.vision_pooling == "pooler":
            pooled = output.pooler_output.flatten(1)
        elif model.vision_pooling == "cls":
            pooled = states[:, 0]
        else:
            pooled = states.mean(dim=1)
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return TowerOutput(states, mask, pooled, output.hidden_states, getattr(output, "attentions", None))

    def placeholder(self, device, dtype):
        vision = self.config.vision_config
        size = getattr(vision, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(vision, "num_channels", 3)
        return torch.zeros(1, channels, height, width, dtype=dtype, device=device), None

    def tokens(self, values, mask):
        patch_size = vision_patch_size(self.config)
        height, width = values.shape[-2:]
        per_image = (height // patch_size) * (width // patch_size) + 1 if patch_size else 0
        return np.full(values.shape[0], per_image, dtype=np.int64)


class FeatureMapPixels(PixelValues):
    """Vision through a convolutional network (ConvNeXt, ResNet...): it has no tokens, so a row counts as the
    tokens that give its forward FLOPs under the 6 x parameters x tokens rule (forward FLOPs / (2 x parameters)),
    counted once per image size on the meta device."""

    @classmethod
    def serves(cls, tower_config):
        return is_convolutional(tower_config)

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self._tokens_by_size: dict[tuple[int, int], int] = {}

    def tokens(self, values, mask):
        size = (int(values.shape[-2]), int(values.shape[-1]))
        if size not in self._tokens_by_size:
            tower_config = self.config.vision_config
            parameters = sum(p.numel() for p in meta_tower(tower_config).parameters())  # it has no embedding table
            flops = convolutional_forward_flops(tower_config, *size)
            self._tokens_by_size[size] = round(flops / (2 * parameters))
        return np.full(values.shape[0], self._tokens_by_size[size], dtype=np.int64)


class Waveforms(TowerInput):
    """Speech: 16 kHz waveforms and their padding mask, read as they are (wav2vec2, HuBERT: `input_values`; any
    speech tower that does not read filterbanks);
    pooled by the masked mean. A row gives one token per 20 ms step of `speech_frame_stack` filterbank frames."""

    modality = "speech"

    def encode(self, model, values, mask=None, **switches) -> TowerOutput:
        mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
        return model.run_speech_tower(values, mask, **switches)

    def placeholder(self, device, dtype):
        samples = self.config.sampling_rate // 2  # half a second of silence
        return torch.zeros(1, samples, device=device), torch.ones(1, samples, dtype=torch.long, device=device)

    def tokens(self, values, mask):
        samples_per_step = frame_shift_samples(self.config.sampling_rate) * self.config.speech_frame_stack
        return (np.ones(values.shape, dtype=np.int64) if mask is None else mask).sum(axis=1) // samples_per_step


class Filterbanks(Waveforms):
    """Speech through a tower that reads filterbank features (`input_features`: Wav2Vec2-BERT, the presets): the
    model computes them batched on its device (`speech_steps`, SpecAugment while training)."""

    @classmethod
    def serves(cls, tower_config):
        return MODEL_MAPPING[type(tower_config)].main_input_name == "input_features"

    def encode(self, model, values, mask=None, **switches) -> TowerOutput:
        mask = torch.ones_like(values, dtype=torch.long) if mask is None else mask
        steps, step_mask = model.speech_steps(values, mask, augment=model.training)
        return model.run_speech_tower(steps, step_mask, **switches)


TOWER_INPUTS: list[type[TowerInput]] = [TokenIds, PixelValues, FeatureMapPixels, Waveforms, Filterbanks]


def register_tower_input(kind: type[TowerInput]) -> None:
    """Make `kind` serve the towers it says it serves (ahead of the kinds registered before it)."""
    if kind in TOWER_INPUTS:
        raise ValueError(f"{kind.__name__} is registered already")
    TOWER_INPUTS.append(kind)


def tower_input(config: PretrainedConfig, modality: str) -> TowerInput:
    """The kind of input the tower of `modality` in the joint `config` reads: the last registered that serves it."""
    tower_config = getattr(config, f"{modality}_config")
    for kind in reversed(TOWER_INPUTS):
        if kind.modality == modality and kind.serves(tower_config):
            return kind(config)
    raise ValueError(
        f"no kind of tower input serves the {modality} tower ({type(tower_config).__name__}); register one with "
        "register_tower_input (tower_inputs_zidong.py)"
    )


def convolutional_forward_flops(tower_config: PretrainedConfig, height: int, width: int) -> float:
    """Forward FLOPs of one image through a convolutional tower built from `tower_config`, counted on the meta
    device (shapes only: nothing is allocated or computed)."""
    tower = meta_tower(tower_config)
    with torch.device("meta"):
        pixels = torch.empty(1, getattr(tower_config, "num_channels", 3), height, width)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tower(pixel_values=pixels)
    return float(counter.get_total_flops())


def meta_tower(tower_config: PretrainedConfig) -> torch.nn.Module:
    """A tower built from `tower_config` on the meta device (its shapes, without memory or initialisation)."""
    with torch.device("meta"):
        return AutoModel.from_config(tower_config, attn_implementation="eager")


__all__ = [
    "TOWER_INPUTS",
    "FeatureMapPixels",
    "Filterbanks",
    "PixelValues",
    "TokenIds",
    "TowerInput",
    "Waveforms",
    "convolutional_forward_flops",
    "meta_tower",
    "register_tower_input",
    "tower_input",
]
