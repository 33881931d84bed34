"""Where a run's numbers go: `OUTPUT_DIR/metrics.jsonl` and the experiment trackers (rank 0 only).

`ThroughputWindow` accumulates what happened between two log lines (samples, tokens per modality, time spent
waiting for data, model FLOPs) and turns it into a training record. `MetricsLog` appends every record to
`metrics.jsonl` and sends its numbers to the trackers the recipe lists (`train.trackers`: `tensorboard`
writes `OUTPUT_DIR/tensorboard/`, `wandb` logs to Weights & Biases when that package is installed) through
Accelerate's tracking API, under `train/...` and `eval/...`.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from zidong.errors import UserError
from zidong.models.zidong.configuration_zidong import MODALITIES

METRICS_FILE = "metrics.jsonl"
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers(trackers: list[str]) -> None:
    """Exit-2 error for a tracker whose package is missing (before anything is started)."""
    for name in trackers:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise UserError(
                f"train.trackers lists {name}, but the {TRACKER_PACKAGES[name]} package is not installed: "
                f"pip install {TRACKER_PACKAGES[name]}, or remove it from train.trackers"
            )


class MetricsLog:
    def __init__(self, accelerator: Accelerator, output_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.accelerator = accelerator
        self.path = output_dir / METRICS_FILE
        if accelerator.trackers or accelerator.log_with:
            accelerator.init_trackers(run_name, config=_flat(config))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (`kind` is `train` or `eval`, `step` is set) on rank 0; every rank must call it."""
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")
        numbers = {
            f"{record['kind']}/{key}": value
            for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, int | float)
        }
        self.accelerator.log(numbers, step=record["step"])


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe -> `{"train.learning_rate": 0.001, ...}` with scalars only (TensorBoard hparams)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif value is not None:
            flat[name] = json.dumps(value)
    return flat


class ThroughputWindow:
    """Throughput, data-wait and model-FLOP accounting between two log lines."""

    def __init__(self, samples_per_speech_frame: int, peak_flops: float | None = None) -> None:
        self.samples_per_speech_frame = samples_per_speech_frame  # the front end's frame shift (10 ms)
        self.peak_flops = peak_flops
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0
        self.samples = 0
        self.tokens = dict.fromkeys(MODALITIES, 0)
        self.waited = 0.0
        self.flops = 0.0

    def count(self, batch: dict[str, torch.Tensor], flops: float) -> None:
        """Account one micro-batch."""
        self.samples += len(batch["text_present"])
        self.flops += flops
        if "text_attention_mask" in batch:  # numpy: the trainer counts on the host batch
            self.tokens["text"] += int(batch["text_attention_mask"].cpu().numpy().sum())
        if "speech_attention_mask" in batch:
            speech = int(batch["speech_attention_mask"].cpu().numpy().sum())
            self.tokens["speech"] += speech // self.samples_per_speech_frame
        if "pixel_values" in batch:
            self.tokens["vision"] += int(batch["pixel_values"].shape[0])  # images

    def end_step(self) -> None:
        """Account one optimizer step (for `seconds_per_step`)."""
        self.steps += 1

    def summary(self, step: int, losses: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {
            "step": step,
            **losses,
            **extra,
            "seconds_per_step": elapsed / max(self.steps, 1),
            "samples_per_s": self.samples / elapsed,
            "text_tokens_per_s": self.tokens["text"] / elapsed,
            "speech_frames_per_s": self.tokens["speech"] / elapsed,
            "images_per_s": self.tokens["vision"] / elapsed,
            "data_wait_fraction": self.waited / elapsed,
            "model_tflops_per_s": self.flops / elapsed / 1e12,
        }
        if self.peak_flops:
            record["mfu"] = self.flops / elapsed / self.peak_flops
        if torch.cuda.is_available():
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.reset()
        return record
