"""The speech tower as an X-ARES audio encoder (xares 0.1: `xares.audio_encoder_checker.check_audio_encoder`).

X-ARES imports the module it is given and builds the one class in it whose name ends in `Encoder`, without
arguments, so the model comes from $ZIDONG_MODEL:

    ZIDONG_MODEL=runs/tiny/model python -m xares.run --max-jobs 1 zidong.evaluation.suites.xares src/tasks/esc50_task.py

or from a module of your own whose only `...Encoder` name is a subclass that names it (import this module, not
the class, so that `ZidongEncoder` is not a second match):

    import zidong.evaluation.suites.xares as zidong_xares

    class TinyEncoder(zidong_xares.ZidongEncoder):
        def __init__(self):
            super().__init__("runs/tiny/model")
"""

from __future__ import annotations

import torch

from zidong.evaluation.suites.speech import SpeechTower


class ZidongEncoder(SpeechTower):
    """(B, samples) 16 kHz waveforms -> (B, frames, output_dim) frame states of the speech tower's last layer."""

    def __init__(self, source: str | None = None) -> None:
        super().__init__(source)
        self.output_dim = self.width

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.encode(audio).token_states
