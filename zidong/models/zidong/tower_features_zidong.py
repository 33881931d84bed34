"""The features API of `ZidongModel`: one tower's embedding at a time, as transformers 5's CLIP and CLAP give it.

Each method returns a `BaseModelOutputWithPooling` whose `pooler_output` is the embedding (L2-normalised, as in
`forward`) and `last_hidden_state` the tower's token states, a tuple under `return_dict=False`, and the tower's
hidden states and attentions when asked. Each also takes a whole processor batch (`features_arguments`).

Imports only torch and transformers so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import can_return_tuple

from .arguments_zidong import features_arguments
from .outputs_zidong import tower_model_output
from .towers_zidong import TowerOutput


class ZidongTowerFeatures:
    """Mixed into `ZidongModel`, whose `encode_text` / `encode_vision` / `encode_speech` and `_embed` it calls."""

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **batch: Any
    ) -> BaseModelOutputWithPooling:
        mask, switches = features_arguments("text", attention_mask, batch)
        return self._features("text", self.encode_text(input_ids, mask, **switches))

    @can_return_tuple
    def get_vision_features(self, pixel_values: torch.Tensor, **batch: Any) -> BaseModelOutputWithPooling:
        _, switches = features_arguments("vision", None, batch)
        return self._features("vision", self.encode_vision(pixel_values, **switches))

    @can_return_tuple
    def get_speech_features(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **batch: Any
    ) -> BaseModelOutputWithPooling:
        mask, switches = features_arguments("speech", attention_mask, batch)
        return self._features("speech", self.encode_speech(input_values, mask, **switches))

    # The names evaluation tools call on CLIP (images) and CLAP (audio) models.

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **batch: Any) -> BaseModelOutputWithPooling:
        """`get_vision_features` under CLIP's name."""
        return self.get_vision_features(pixel_values, return_dict=True, **batch)

    @can_return_tuple
    def get_audio_features(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **batch: Any
    ) -> BaseModelOutputWithPooling:
        """`get_speech_features` under CLAP's name (the waveform, as `input_values`)."""
        return self.get_speech_features(input_values, attention_mask, return_dict=True, **batch)

    def _features(self, modality: str, tower_output: TowerOutput) -> BaseModelOutputWithPooling:
        return tower_model_output(tower_output, self._embed(modality, tower_output))


__all__ = ["ZidongTowerFeatures"]
