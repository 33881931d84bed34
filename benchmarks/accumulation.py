"""Measurement 6, second part: full-batch negatives under accumulation (`train.full_batch_negatives`), on one process.

The tiny model, the contrastive loss of every pair, 32 full triplets (16 under --quick; 16 text tokens, 64 px, 1 s;
dropout, LayerDrop and SpecAugment off so that both sides compute the same thing): one forward and backward of
the batch of 32 against the step cache over 4 micro-batches of 8 (every micro-batch embedded without gradients,
the whole step's loss solved over the cache, every micro-batch replayed with gradients), what the trainer does
with `train.batch_size=8 train.grad_accum=4 train.full_batch_negatives=true`. Peak allocation (the profiler's
memory events replayed) against the batch of 32; wall time, interleaved, against plain accumulation of the same 4
micro-batches (what the cache adds: one forward without gradients per micro-batch, by the 2 : 4 rule of forward
and backward FLOPs a third more work, and the solve), the batch of 32's in the details. The loss and the whole
gradient must agree with the batch of 32's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import Result, Settings, median, peak_allocated_bytes, synthetic_batch
from zidong.models.zidong.configuration_zidong import MODALITIES, ZidongConfig
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.train.step_cache import StepCache

BATCH, MICRO_BATCHES = 32, 4
ARGUMENTS = {"return_loss": True, "loss_weights": {"contrastive": 1.0}}


def full_batch_negatives(settings: Settings) -> list[Result]:
    torch.manual_seed(0)
    config = ZidongConfig.from_preset(
        "tiny",
        text={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        speech={"layerdrop": 0.0, "conformer_conv_dropout": 0.0},
        spec_augment_freq_mask=0,
        spec_augment_time_mask=0,
    )
    model = ZidongModel(config).train()
    batch_size = BATCH // 2 if settings.quick else BATCH  # quick: checks that it runs and agrees
    batch = synthetic_batch(config, batch_size, 16, 1.0, torch.Generator().manual_seed(0))
    size = batch_size // MICRO_BATCHES
    micro = [{key: value[k * size : (k + 1) * size] for key, value in batch.items()} for k in range(MICRO_BATCHES)]
    cache = StepCache(MICRO_BATCHES)

    def whole() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        output = model(**batch, **ARGUMENTS)
        output.loss.backward()
        return output.loss.detach()

    def plain() -> torch.Tensor:  # accumulation without the cache: each micro-batch its own negatives
        model.zero_grad(set_to_none=True)
        for part in micro:
            (model(**part, **ARGUMENTS).loss / MICRO_BATCHES).backward()

    def cached() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model.prepare_for_launcher(gather=cache)
        cache.begin([{m: part[f"{m}_present"].numpy() for m in MODALITIES} for part in micro])
        with torch.no_grad(), cache.recording():
            for index, part in enumerate(micro):
                with cache.randomness(index, [torch.device("cpu")]):
                    model(**part, **ARGUMENTS)
        cache.solve(config.contrastive_loss, config.projection_dim)
        total = torch.zeros(())
        for index, part in enumerate(micro):
            with cache.randomness(index, [torch.device("cpu")]), cache.replay(index):
                output = model(**part, **ARGUMENTS)
            (output.loss / MICRO_BATCHES).backward()  # the trainer's accumulation divides each micro-batch's loss
            total += output.loss.detach() / MICRO_BATCHES
        model.prepare_for_launcher()
        return total

    expected_loss = whole()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    got_loss = cached()
    flat = torch.cat([expected[name].flatten() for name in sorted(expected)])
    flat_got = torch.cat([dict(model.named_parameters())[name].grad.flatten() for name in sorted(expected)])
    difference = float((flat_got - flat).norm() / flat.norm())
    peaks = {"whole": peak_allocated_bytes(whole), "cached": peak_allocated_bytes(cached)}
    seconds: dict[str, list[float]] = {"whole": [], "plain": [], "cached": []}
    repeats = 1 if settings.quick else 9
    for attempt in range(repeats + 1):
        for name, step in (("whole", whole), ("plain", plain), ("cached", cached)):
            started = time.perf_counter()
            step()
            if attempt:  # the first round warms up
                seconds[name].append(time.perf_counter() - started)
    details: dict[str, Any] = {
        "batch": batch_size,
        "micro_batches": MICRO_BATCHES,
        "batch_peak_mib": peaks["whole"] / 2**20,
        "cached_peak_mib": peaks["cached"] / 2**20,
        "batch_seconds_per_step": median(seconds["whole"]),
        "plain_accumulation_seconds_per_step": median(seconds["plain"]),
        "cached_seconds_per_step": median(seconds["cached"]),
        "cached_over_batch_seconds": median(seconds["cached"]) / median(seconds["whole"]),
        "loss_difference": float((got_loss - expected_loss).abs()),
        "relative_gradient_difference": difference,  # the whole gradient's norm
        "repeats": repeats,
    }
    return [
        Result(
            6,
            f"full-batch negatives: peak memory, {MICRO_BATCHES} x {size} cached / batch {batch_size}",
            peaks["cached"] / peaks["whole"],
            "<= 0.50",
            details,
        ),
        Result(
            6,
            f"full-batch negatives: step time, {MICRO_BATCHES} x {size} cached / plain accumulation",
            details["cached_seconds_per_step"] / details["plain_accumulation_seconds_per_step"],
            "<= 1.40",
            details,
        ),
    ]
