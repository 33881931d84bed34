"""Measurements 6 and 7, on 2 CPU processes (gloo) started from the bench: contrastive-loss memory, Accelerate's
overhead, and gradient accumulation with synchronisation on the last micro-batch only.

6. Each rank holds 256 L2-normalised embeddings per modality (global batch 512, width 512) and runs the three
   pair losses forward and backward: zidong's local loss + gather-with-grad (`contrastive_losses`) against
   the naive global loss (`naive_contrastive_loss`). Peak allocation is replayed from the profiler's memory
   events; the losses (mean over ranks) and the gradients must agree.
7. The tiny model with the tiny recipe's objectives on a fixed batch of triplets per rank: an Accelerate-prepared
   step (the trainer's calls) against a plain `DistributedDataParallel` step on an identical copy, steps
   interleaved; then 4 micro-batches per step with `accelerator.no_sync` on the first 3 against syncing all 4.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.baseline import naive_contrastive_loss
from benchmarks.common import Result, median, peak_allocated_bytes, synthetic_batch
from zidong.models.zidong.configuration_zidong import MODALITIES, ZidongConfig
from zidong.models.zidong.contrastive_zidong import contrastive_losses
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.train.collectives import ProcessGather

WORLD = 2
MICRO = (2, 4)  # samples per micro-batch per rank; the first is the headline (see docs/PERFORMANCE.md)
TINY_LOSS_WEIGHTS = {"contrastive": 1.0, "matching": 0.1, "masked_text": 0.1}  # every kind of loss, lightly weighted


def distributed(work: Path, quick: bool) -> list[Result]:
    """Run both measurements on `WORLD` spawned processes; returns their rows."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = work / "distributed.json"
    mp.start_processes(_rank_main, args=(port, str(out), quick), nprocs=WORLD, start_method="spawn")
    found = json.loads(out.read_text())
    memory, overhead, accumulation = found["memory"], found["overhead"], found["accumulation"]
    all_reduce = accumulation["all_reduce_seconds"] = found["all_reduce_seconds"]
    # what skipping 3 of 4 synchronisations can save at most if each costs one gradient all-reduce: the ratio
    # is bounded by how much of a step communication is, not by the trainer
    headline = accumulation[f"micro_batch_{MICRO[0]}"]
    accumulation["ratio_if_each_skipped_sync_saved_one_all_reduce"] = (
        1 - 3 * all_reduce / headline["sync_every_seconds"]
    )
    return [
        Result(6, "contrastive loss peak memory, local + gather / naive", memory["ratio"], "<= 0.60", memory),
        Result(7, "step time, Accelerate / plain DDP", overhead["ratio"], "<= 1.05", overhead),
        Result(
            7,
            f"4 micro-batches of {MICRO[0]}, sync on last / sync every one",
            accumulation["ratio"],
            "<= 0.85",
            accumulation,
        ),
    ]


def _rank_main(rank: int, port: int, out: str, quick: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",  # else Accelerate sets 2 threads per process: 4 on the 2 cores of this machine
    )
    torch.set_num_threads(1)  # two processes on the cores of one machine
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    accelerator = Accelerator(
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),  # as the trainer sets it
            InitProcessGroupKwargs(backend="gloo"),
        ]
    )
    results = {
        "memory": contrastive_memory(rank, global_batch=512, width=512),
        **step_overheads(accelerator, rank, quick),
    }
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps(results, indent=2))
    accelerator.end_training()


def contrastive_memory(rank: int, global_batch: int, width: int) -> dict[str, Any]:
    import torch.distributed as dist

    generator = torch.Generator().manual_seed(rank)
    rows = global_batch // dist.get_world_size()
    embeds = {
        m: F.normalize(torch.randn(rows, width, generator=generator), dim=-1).requires_grad_() for m in MODALITIES
    }
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    leaves = [*embeds.values(), logit_scale]
    pairs = list(itertools.combinations(MODALITIES, 2))
    presence = {m: torch.ones(rows, dtype=torch.bool) for m in MODALITIES}
    gather = ProcessGather(torch.device("cpu"))
    variants = {
        "zidong": lambda: list(
            contrastive_losses(embeds, presence, logit_scale, None, "softmax", width, gather).values()
        ),
        "naive": lambda: [naive_contrastive_loss(embeds[a], embeds[b], logit_scale) for a, b in pairs],
    }
    found: dict[str, Any] = {}
    for name, pair_losses in variants.items():

        def forward_backward(pair_losses=pair_losses) -> torch.Tensor:
            loss = torch.stack(pair_losses()).mean()
            loss.backward()
            return loss.detach()

        for leaf in leaves:
            leaf.grad = None
        loss = forward_backward()  # the values compared
        grads = [leaf.grad.clone() for leaf in leaves]
        peaks = []
        for _ in range(3):  # when the collectives free their buffers varies a little: the median of 3
            for leaf in leaves:
                leaf.grad = None
            peaks.append(peak_allocated_bytes(forward_backward))
        found[name] = {"peak": median(peaks), "loss": loss, "grads": grads}
    # zidong's per-rank losses (and the temperature's gradient) average to the global one over ranks
    zidong_loss = found["zidong"]["loss"].clone()
    dist.all_reduce(zidong_loss)
    scale_grad = found["zidong"]["grads"][-1].clone()
    dist.all_reduce(scale_grad)
    zidong_grads = [*found["zidong"]["grads"][:-1], scale_grad / dist.get_world_size()]
    return {
        "ratio": found["zidong"]["peak"] / found["naive"]["peak"],
        "zidong_peak_mib": found["zidong"]["peak"] / 2**20,
        "naive_peak_mib": found["naive"]["peak"] / 2**20,
        "loss_difference": abs(float(zidong_loss) / dist.get_world_size() - float(found["naive"]["loss"])),
        "max_gradient_difference": max(
            float((ours - theirs).abs().max())
            for ours, theirs in zip(zidong_grads, found["naive"]["grads"], strict=True)
        ),
        "global_batch": global_batch,
        "width": width,
        "pairs": len(pairs),
    }


def step_overheads(accelerator, rank: int, quick: bool) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    config = ZidongConfig.from_preset("tiny", text={"vocab_size": 500}, mask_token_id=4)
    torch.manual_seed(0)
    model = ZidongModel(config).train()
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(rank)
    batch = synthetic_batch(config, 16, text_tokens=24, speech_seconds=3.0, generator=generator)
    split = {size: [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(4)] for size in MICRO}
    wrapped, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    plain = DistributedDataParallel(twin, find_unused_parameters=True)
    plain_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-4)

    def accelerate_step(inputs: list[dict[str, torch.Tensor]], sync_every: bool = False) -> None:
        for index, micro in enumerate(inputs):
            last = index == len(inputs) - 1
            with contextlib.nullcontext() if last or sync_every else accelerator.no_sync(wrapped):
                loss = wrapped(**micro, return_loss=True, loss_weights=TINY_LOSS_WEIGHTS).loss
                accelerator.backward(loss / len(inputs))
        accelerator.clip_grad_norm_(wrapped.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain_step() -> None:
        plain(**batch, return_loss=True, loss_weights=TINY_LOSS_WEIGHTS).loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    variants = {"accelerate": lambda: accelerate_step([batch]), "plain": plain_step}
    for size, micro_batches in split.items():
        variants[f"sync_last_{size}"] = functools.partial(accelerate_step, micro_batches)
        variants[f"sync_every_{size}"] = functools.partial(accelerate_step, micro_batches, sync_every=True)
    warmup, repeats = (1, 3) if quick else (3, 15)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + repeats):
        for name, step in variants.items():  # interleaved, so drift in the machine hits every variant alike
            started = time.perf_counter()
            step()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - started)
    seconds = {name: median(values) for name, values in times.items()}
    return {
        "all_reduce_seconds": _all_reduce_seconds(sum(p.numel() for p in model.parameters()), repeats),
        "overhead": {
            "ratio": seconds["accelerate"] / seconds["plain"],
            "accelerate_seconds": seconds["accelerate"],
            "plain_seconds": seconds["plain"],
            "batch_per_rank": 16,
        },
        "accumulation": {
            "ratio": seconds[f"sync_last_{MICRO[0]}"] / seconds[f"sync_every_{MICRO[0]}"],
            **{
                f"micro_batch_{size}": {
                    "ratio": seconds[f"sync_last_{size}"] / seconds[f"sync_every_{size}"],
                    "sync_last_seconds": seconds[f"sync_last_{size}"],
                    "sync_every_seconds": seconds[f"sync_every_{size}"],
                }
                for size in MICRO
            },
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    }


def _all_reduce_seconds(numel: int, repeats: int) -> float:
    """Median time of one all-reduce of `numel` floats: what each extra synchronisation costs at the least."""
    import torch.distributed as dist

    gradients = torch.ones(numel)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(gradients)
        times.append(time.perf_counter() - started)
    return median(times[1:])
