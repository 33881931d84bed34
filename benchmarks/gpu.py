"""The in-process measurements of the GPU check (`python -m benchmarks.gpu_check`): the `base` training step three ways, the
host synchronisations of a step, and the audio front end on the GPU.

Each returns `Result` rows (benchmarks/common.py). They need a CUDA device; on CPU they are only planned
(`python -m benchmarks.gpu_check --dry-run`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.common import Result, median, synthetic_batch, timings
from benchmarks.training import BASE_LOSS_WEIGHTS
from zidong.models.zidong.configuration_zidong import ZidongConfig
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.train.flops import StepFlops, measured_peak_flops
from zidong.train.parallelize import compile_layers

BATCH = 32  # triplets per step: 32 text tokens, a 224 px image, 4 s of speech each


def host_batch(config: ZidongConfig, size: int, device: torch.device) -> dict[str, Any]:
    """A synthetic batch as the trainer hands it to the model: tensors on the device, presence on the host."""
    batch = synthetic_batch(
        config, size, text_tokens=32, speech_seconds=4.0, generator=torch.Generator().manual_seed(0)
    )
    return {k: v.numpy() if k.endswith("_present") else v.to(device, non_blocking=True) for k, v in batch.items()}


def base_step_variants(device: torch.device, repeats: int = 10) -> list[Result]:
    """bf16 MFU of the `base` step, and its time with compiled towers and with activation checkpointing."""
    config = ZidongConfig.from_preset("base", text={"vocab_size": 32000}, mask_token_id=4)
    peak = measured_peak_flops(device, torch.bfloat16)
    seconds: dict[str, float] = {}
    memory: dict[str, float] = {}
    flops = 0.0
    for variant in ("eager", "compiled", "activation_checkpointing"):
        torch.manual_seed(0)
        model = ZidongModel(config).to(device).train()
        if variant == "compiled":
            compile_layers(model, device)  # as the trainer does: each transformer layer on its own
        if variant == "activation_checkpointing":
            model.activation_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        batch = host_batch(config, BATCH, device)
        flops = StepFlops(model).of_batch(batch, BASE_LOSS_WEIGHTS)
        step = _training_step(model, optimizer, batch, device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds[variant] = median(timings(step, 3, repeats))
        memory[variant] = torch.cuda.max_memory_allocated(device) / 2**30
        del model, optimizer, batch
        torch.cuda.empty_cache()  # between variants, not in a step
    details = {
        "device": torch.cuda.get_device_name(device),
        "batch": f"{BATCH} triplets, bf16 autocast, fused AdamW",
        "model_tflop_per_step": flops / 1e12,
        "bf16_matmul_peak_tflops": peak / 1e12,
        "seconds_per_step": seconds,
        "peak_memory_gib": memory,
    }
    return [
        Result(1, "bf16 MFU of the base step, 1 GPU", flops / seconds["eager"] / peak, ">= 0.35", details),
        Result(2, "step time, compiled towers / eager", seconds["compiled"] / seconds["eager"], "<= 0.85", details),
        Result(
            3,
            "step time, activation checkpointing / eager (recompute costs ~1/3)",
            seconds["activation_checkpointing"] / seconds["eager"],
            "<= 1.5",
            details,
        ),
    ]


def host_syncs(device: torch.device) -> list[Result]:
    """Synchronisations of one `base` training step (forward, backward, clipping, the update, the one read of
    losses and gradient norm), counted by CUDA's sync debug mode."""
    config = ZidongConfig.from_preset("base", text={"vocab_size": 32000}, mask_token_id=4)
    torch.manual_seed(0)
    model = ZidongModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = _training_step(model, optimizer, host_batch(config, 8, device), device)
    step()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    details = {"what": "one training step of `base` on 8 triplets, every objective", "warnings": syncs[:20]}
    return [Result(4, "host synchronisations in a training step", float(len(syncs)), "<= 1", details)]


def _training_step(model: ZidongModel, optimizer: torch.optim.Optimizer, batch: dict, device: torch.device) -> Callable:
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = model(**batch, return_loss=True, loss_weights=BASE_LOSS_WEIGHTS)
        output.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.stack([output.loss.detach().float(), norm.float()]).tolist()  # the trainer's one read

    return step


def front_end(speech_batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> list[Result]:
    """The batched filterbank on the GPU against per-utterance `kaldi.fbank` on one CPU thread, audio seconds per
    second, with the parity of their features."""
    from torchaudio.compliance.kaldi import fbank

    from zidong.models.zidong.feature_extraction_zidong import BatchedFbank

    batched = BatchedFbank().to(device)
    utterances = [w[:n] for waves, mask in speech_batches for w, n in zip(waves, mask.sum(dim=1).tolist(), strict=True)]
    audio_seconds = sum(len(u) for u in utterances) / batched.sampling_rate
    on_device = [(w.to(device), m.sum(dim=1).to(device)) for w, m in speech_batches]

    @torch.no_grad()
    def gpu() -> None:
        for waves, lengths in on_device:
            batched(waves, lengths)
        torch.cuda.synchronize(device)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        expected = [
            fbank(u[None] * 32768.0, num_mel_bins=batched.num_mel_bins, sample_frequency=batched.sampling_rate)
            for u in utterances
        ]
        kaldi_seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        gpu_seconds = median(timings(gpu, 2, 5))
        worst, row = 0.0, 0
        for waves, lengths in on_device:
            features, frame_mask = batched(waves, lengths)
            for values, real in zip(features.cpu(), frame_mask.cpu(), strict=True):
                reference = expected[row]
                worst = max(worst, float((values[real][: len(reference)] - reference).abs().max()))
                row += 1
    rate_gpu, rate_kaldi = audio_seconds / gpu_seconds, audio_seconds / kaldi_seconds
    details = {
        "audio_seconds": audio_seconds,
        "utterances": len(utterances),
        "gpu_audio_s_per_s": rate_gpu,
        "kaldi_1_cpu_thread_audio_s_per_s": rate_kaldi,
        "max_abs_difference_float32_log_mel": worst,
    }
    return [
        Result(5, "audio front end: GPU batched / kaldi.fbank on 1 CPU thread", rate_gpu / rate_kaldi, ">= 5", details)
    ]


def speech_batches_for_check(count: int = 8, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Padded batches of synthetic speech with ragged lengths (1-10 s; about 1,400 s of audio in all), as the
    stream buckets them (sorted)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        lengths = np.sort(rng.integers(16000, 10 * 16000, size))
        waves = torch.zeros(size, int(lengths[-1]))
        mask = torch.zeros(size, int(lengths[-1]), dtype=torch.bool)
        for row, length in enumerate(lengths):
            waves[row, :length] = torch.from_numpy(0.1 * rng.standard_normal(int(length)).astype(np.float32))
            mask[row, :length] = True
        batches.append((waves, mask))
    return batches
