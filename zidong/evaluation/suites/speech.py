"""`SpeechTower`: a trained model's speech tower on 16 kHz waveforms, as audio suites call encoders."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from zidong.errors import UserError
from zidong.models.zidong.towers_zidong import TowerOutput, tower_width

MODEL_VARIABLE = "ZIDONG_MODEL"  # the model folder, for suites that build an encoder without arguments


class SpeechTower(nn.Module):
    """The speech tower of the model in `source` (an export, a checkpoint or a run folder; default: the folder
    in $ZIDONG_MODEL), in eval mode.

    `width`: the tower's hidden size (its frame states' and their pooled mean's); `sampling_rate` (16 kHz for the
    presets); `hop_size_in_ms`: the time from one frame state to the next (20 ms for the presets)."""

    def __init__(self, source: str | os.PathLike | None = None) -> None:
        super().__init__()
        from zidong.export.trained import load_trained

        source = source or os.environ.get(MODEL_VARIABLE)
        if not source:
            raise UserError(f"no zidong model given: pass its folder, or set {MODEL_VARIABLE} to it")
        model, *_ = load_trained(source)
        self.model = model.base_model.eval()
        config = self.model.config
        self.sampling_rate = int(config.sampling_rate)
        self.width = tower_width(config, "speech")
        self.hop_size_in_ms = _hop_in_ms(self.model, self.sampling_rate)

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, mask: torch.Tensor | None = None) -> TowerOutput:
        """The tower on (n, samples) waveforms in [-1, 1] (`mask`: 1 on real samples; None: all real)."""
        device = next(self.model.parameters()).device
        audio = audio.to(device=device, dtype=torch.float32)
        return self.model.encode_speech(audio, None if mask is None else mask.to(device))


def _hop_in_ms(model: nn.Module, sampling_rate: int) -> float:
    """Milliseconds per frame state: the frames 10 s more audio adds (a convolutional front end's edges cancel)."""
    kind = model.tower_inputs["speech"]
    ten, twenty = (kind.tokens(np.zeros((1, seconds * sampling_rate), np.float32), None)[0] for seconds in (10, 20))
    return 10_000.0 / float(twenty - ten)
