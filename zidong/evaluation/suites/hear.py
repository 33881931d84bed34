"""The HEAR 2021 API over a zidong model's speech tower (https://hearbenchmark.com, "Common API").

    python -m heareval.embeddings.runner zidong.evaluation.suites.hear --model runs/tiny/model --tasks-dir TASKS

- `load_model(model_file_path)`: the model folder (export, checkpoint or run; "" reads $ZIDONG_MODEL), with
  `sample_rate`, `scene_embedding_size` and `timestamp_embedding_size`.
- `get_timestamp_embeddings(audio, model)`: (n_sounds, n_samples) float32 audio in [-1, 1] -> the last layer's
  frame states (n_sounds, n_timestamps, timestamp_embedding_size) and each frame's centre in milliseconds
  (n_sounds, n_timestamps), one frame every `hop_size_in_ms` (20 ms for the presets).
- `get_scene_embeddings(audio, model)`: (n_sounds, scene_embedding_size), the mean of those frame states: what
  the speech projection reads to embed into the shared space.
"""

from __future__ import annotations

import torch

from zidong.evaluation.suites.speech import SpeechTower


def load_model(model_file_path: str = "") -> SpeechTower:
    model = SpeechTower(model_file_path or None)
    model.sample_rate = model.sampling_rate
    model.scene_embedding_size = model.timestamp_embedding_size = model.width
    return model


def get_timestamp_embeddings(audio: torch.Tensor, model: SpeechTower) -> tuple[torch.Tensor, torch.Tensor]:
    states = model.encode(audio).token_states.float()
    centres = (torch.arange(states.shape[1], device=states.device) + 0.5) * model.hop_size_in_ms
    return states, centres.expand(states.shape[0], -1)


def get_scene_embeddings(audio: torch.Tensor, model: SpeechTower) -> torch.Tensor:
    return model.encode(audio).pooled.float()
