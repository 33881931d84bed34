"""Model FLOPs of a training step, and the matmul peak they are compared with (MFU).

Model FLOPs count what the model needs for the real (unpadded) content of each batch, the usual
"6 x parameters x tokens" rule per pass (2 for the forward, 4 for the backward; a tower frozen for the whole run
has no backward, so 2):
- each tower over its real tokens, as its kind of input counts them (`TowerInput.tokens`,
  zidong/models/zidong/tower_inputs_zidong.py: text tokens, image patches + 1, 20 ms speech steps; a
  convolutional vision tower's forward FLOPs as tokens), once more for each pass a weighted objective adds
  (`Objective.extra_tower_passes`: the masked pass of a masked objective);
- the fusion encoder over the real tokens of the samples it reads, as each weighted objective declares
  (`Objective.fusion_tokens`): twice the multi-modal samples' tokens for `matching` (positives and their hard
  negatives), and every sample's tokens for the masked objectives.
Embedding tables are excluded, and so is attention's quadratic term, so MFU is slightly understated for long
sequences. Padding is compute the model does not need: it lowers MFU, which is the point.

The peak is `train.peak_tflops` when the recipe gives it (the accelerator's datasheet figure for the
precision trained in), otherwise measured at start-up: the median rate of large square matmuls in the training
precision (fp32 on CPU, bf16 on GPU under bf16) on this process's device.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from zidong.models.zidong.arguments_zidong import modality_inputs
from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.models.zidong.objectives_zidong import REGISTRY

# the collated batch's inputs, in the order of `modality_inputs`
INPUT_KEYS = ("input_ids", "text_attention_mask", "pixel_values", "input_values", "speech_attention_mask")


def _non_embedding(module: torch.nn.Module) -> tuple[int, bool]:
    """(parameters outside embedding tables, whether any of them trains)."""
    embedded = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    parameters = [p for p in module.parameters() if id(p) not in embedded]
    count = sum(getattr(p, "ds_numel", p.numel()) for p in parameters)  # ZeRO-3 keeps the full size in ds_numel
    return count, any(p.requires_grad for p in parameters)


class StepFlops:
    """Model FLOPs of the batches a step trains on (built from the unwrapped model before `prepare`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.towers = {m: _non_embedding(tower) for m, tower in model.towers().items()}
        self.fusion = _non_embedding(model.fusion)[0]
        self.tower_inputs = model.tower_inputs  # each tower's kind of input counts its tokens
        self.samples_per_speech_frame = model.fbank.window_shift

    def of_batch(self, batch: dict[str, torch.Tensor | np.ndarray], weights: dict[str, float]) -> float:
        """Model FLOPs of one training micro-batch with objective `weights` (its real, unpadded tokens), counted
        on the collated batch while it is on the host."""
        return self.of_tokens(self._tokens_per_sample(batch), weights)

    def of_tokens(self, tokens: dict[str, np.ndarray], weights: dict[str, float]) -> float:
        """Model FLOPs of training on samples with `tokens[modality]` (samples,) tokens each (0: absent)."""
        passes = dict.fromkeys(MODALITIES, 1)
        fusion_tokens = 0.0
        for objective in REGISTRY:  # what each weighted objective adds (zidong/models/zidong/objectives_zidong.py)
            if objective.weighted(weights):
                for modality, extra in objective.extra_tower_passes(weights).items():
                    passes[modality] += extra
                fusion_tokens += objective.fusion_tokens(tokens, weights)
        flops = 0.0
        for modality, (parameters, trains) in self.towers.items():
            flops += (6 if trains else 2) * parameters * float(tokens[modality].sum()) * passes[modality]
        return flops + 6 * self.fusion * fusion_tokens

    def _tokens_per_sample(self, batch: dict[str, torch.Tensor | np.ndarray]) -> dict[str, np.ndarray]:
        # the trainer's batch is on the host: a no-op there (presence may already be arrays)
        host = {key: value.cpu().numpy() if torch.is_tensor(value) else value for key, value in batch.items()}
        inputs = modality_inputs(*(host.get(key) for key in INPUT_KEYS))
        tokens = {m: np.zeros(len(host["text_present"]), dtype=np.int64) for m in MODALITIES}
        for modality, (values, mask) in inputs.items():
            if values is not None:
                tokens[modality][host[f"{modality}_present"]] = self.tower_inputs[modality].tokens(values, mask)
        return tokens

    def tokens_at_caps(
        self, text_tokens: int, image_size: tuple[int, int], speech_seconds: float, sampling_rate: int
    ) -> dict[str, np.ndarray]:
        """(1,) token counts per modality of one sample that reaches every cap (`zidong pretrain --dry-run`)."""
        vision = self.tower_inputs["vision"].config.vision_config
        at_caps = {  # the shapes of such a sample (token counts read shapes and masks only)
            "text": np.ones((1, text_tokens), dtype=np.int64),
            "vision": np.broadcast_to(np.float32(0), (1, getattr(vision, "num_channels", 3), *image_size)),
            "speech": np.ones((1, int(speech_seconds * sampling_rate)), dtype=np.int64),
        }
        return {m: self.tower_inputs[m].tokens(values, None) for m, values in at_caps.items()}


def measured_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of `size` x `size` matmuls on `device` in `dtype` (median of `repeats` after a warm-up).

    Without `size`: 8192 on CUDA; on CPU at most 2048, smaller where a 256 probe shows that one matmul would take
    more than `CPU_MATMUL_SECONDS` (a CPU without bf16 instructions emulates bf16 ~40x slower than float32, and
    six 2048 matmuls then took two minutes of every bf16 run's start-up)."""
    if size is None:
        size = 8192 if device.type == "cuda" else cpu_matmul_size(_matmul_rates(device, dtype, 256, 1)[0])
    return statistics.median(_matmul_rates(device, dtype, size, repeats))


CPU_MATMUL_SECONDS = 0.5


def cpu_matmul_size(rate: float, largest: int = 2048, smallest: int = 256) -> int:
    """The side of a square matmul that takes about `CPU_MATMUL_SECONDS` at `rate` FLOP/s, a multiple of 64
    within [smallest, largest]."""
    side = (rate * CPU_MATMUL_SECONDS / 2) ** (1 / 3)
    return int(min(largest, max(smallest, side // 64 * 64)))


def _matmul_rates(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> list[float]:
    generator = torch.Generator(device=device).manual_seed(0)  # the global RNG is the training run's
    first = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    second = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    rates = []
    for attempt in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        torch.mm(first, second)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:  # the first is the warm-up
            rates.append(2 * size**3 / (time.perf_counter() - started))
    return rates
