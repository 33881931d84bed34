"""Retrieval on held-out shards: Recall@1/5/10 and median rank for every modality pair and direction.

Every process embeds a contiguous block of the held-out samples (evaluation transforms: centre crop, audio
head); the embeddings are gathered to every process and scored there. For the pair (a, b) only samples that have
both modalities take part; `a->b` ranks all b-embeddings for each a-query, and a hit is the query's own sample.
Chance level for R@k is k / n.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from zidong.data.shards import SampleError, ShardFolder
from zidong.data.transforms import SamplePipeline
from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.utils.log import EVERY_RANK, get_logger

RECALL_AT = (1, 5, 10)
logger = get_logger(__name__)


@dataclass(frozen=True)
class HeldOut:
    """A held-out shard folder and how to read it: evaluation transforms, batch size, the processes that share
    it, and `lockstep` (DeepSpeed/FSDP: every process makes the same number of forward calls, idle ones
    included)."""

    folder: str | Path
    pipeline: SamplePipeline
    batch_size: int
    accelerator: Accelerator
    lockstep: bool = False


def retrieval(model: torch.nn.Module, held_out: HeldOut) -> dict[str, float]:
    """`{"text->vision/R@1": 0.42, ..., "samples": n}` for the held-out shard folder (collective)."""
    embeds, presence = embed_folder(model, held_out)
    return recall_at_k(embeds, presence)


@torch.no_grad()
def embed_folder(model: torch.nn.Module, held_out: HeldOut) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Embeddings (n, d) and presence (n,) of every sample of a shard folder, in shard order, on every process
    (collective). Each process embeds a contiguous block; an unreadable sample is skipped (absent everywhere)."""
    accelerator = held_out.accelerator
    total = len(ShardFolder(held_out.folder))
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = (rank + 1) * total // world - rank * total // world
    width = accelerator.unwrap_model(model).config.projection_dim
    embeds = {m: torch.zeros(mine, width) for m in MODALITIES}
    present = {m: torch.zeros(mine, dtype=torch.bool) for m in MODALITIES}
    for rows, _, output in forward_folder(model, held_out):
        for modality in MODALITIES:
            if getattr(output, f"{modality}_embeds") is not None:
                embeds[modality][rows] = getattr(output, f"{modality}_embeds").float().cpu()
            present[modality][rows] = getattr(output, f"{modality}_present").cpu()
    gathered = {m: gather_rows(accelerator, embeds[m], total) for m in MODALITIES}
    presence = {m: gather_rows(accelerator, present[m], total) for m in MODALITIES}
    return gathered, presence


@torch.no_grad()
def forward_folder(
    model: torch.nn.Module, held_out: HeldOut
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], Any]]:
    """(rows of this process's block, batch, model output) for each batch of this process's contiguous block of
    a shard folder, in eval mode; unreadable samples are skipped (collective under `lockstep`: every process makes
    the same number of forward calls, idle ones included)."""
    pipeline, batch_size, accelerator, lockstep = (
        held_out.pipeline,
        held_out.batch_size,
        held_out.accelerator,
        held_out.lockstep,
    )
    shards = ShardFolder(held_out.folder)
    refs = sample_refs(shards)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = refs[rank * len(refs) // world : (rank + 1) * len(refs) // world]
    was_training = model.training
    model.eval()
    longest = -(-len(refs) // world)  # blocks differ by at most one sample; every process runs as many batches
    for start in range(0, longest if lockstep else len(mine), batch_size):
        samples, rows = [], []
        for row, (shard, position) in enumerate(mine[start : start + batch_size], start=start):
            try:
                samples.append(pipeline.decode(shards.read(shard, position), np.random.default_rng(0)))
                rows.append(row)
            except SampleError as err:
                logger.warning("evaluation skipped an unreadable sample: %s", err, extra=EVERY_RANK)
        if not samples and not lockstep:
            continue
        batch = (
            {key: value.to(accelerator.device) for key, value in pipeline.collate(samples).items()} if samples else {}
        )
        with accelerator.autocast():
            output = model(**batch, lockstep=lockstep)
        yield rows, batch, output
    model.train(was_training)
    shards.close()


def sample_refs(shards: ShardFolder) -> list[tuple[int, int]]:
    """(shard, position) of every sample of a shard folder, in the order `embed_folder` returns them."""
    return [(shard, position) for shard, count in enumerate(shards.counts) for position in range(count)]


def gather_rows(accelerator: Accelerator, rows: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every process's block in rank order (blocks differ in size by at most one row)."""
    if accelerator.num_processes == 1:
        return rows
    longest = total // accelerator.num_processes + 1
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype)
    padded[: len(rows)] = rows
    everything = (
        accelerator.gather(padded.to(accelerator.device))
        .cpu()
        .reshape(accelerator.num_processes, longest, *rows.shape[1:])
    )
    world = accelerator.num_processes
    sizes = [(r + 1) * total // world - r * total // world for r in range(world)]
    return torch.cat([everything[r, : sizes[r]] for r in range(world)])


def recall_at_k(embeds: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> dict[str, float]:
    """Recall@k for every ordered pair of modalities from (n, d) normalised embeddings and (n,) presence."""
    metrics: dict[str, float] = {"samples": float(len(next(iter(present.values()))))}
    for query, target in permutations(MODALITIES, 2):
        both = present[query] & present[target]
        count = int(both.sum())
        if count < 2:
            continue
        similarity = embeds[query][both] @ embeds[target][both].T
        own = similarity.diagonal()[:, None]
        rank = (similarity > own).sum(dim=1)  # how many candidates beat the right one
        for k in RECALL_AT:
            metrics[f"{query}->{target}/R@{k}"] = float((rank < k).float().mean())
        metrics[f"{query}->{target}/median_rank"] = float((rank + 1).float().median())
        metrics[f"{query}->{target}/count"] = float(count)
    return metrics


def retrieval_table(metrics: dict[str, float]) -> str:
    """The retrieval metrics as a fixed-width table (R@k and median rank), with their chance levels."""
    pairs = sorted({key.split("/")[0] for key in metrics if "/R@" in key})
    count = int(metrics.get("samples", 0))
    lines = [f"{'pair':<16}" + "".join(f"{'R@' + str(k):>8}" for k in RECALL_AT) + f"{'median':>8}"]
    for pair in pairs:
        recalls = "".join(f"{metrics[f'{pair}/R@{k}']:>8.3f}" for k in RECALL_AT)
        lines.append(f"{pair:<16}{recalls}{metrics.get(f'{pair}/median_rank', float('nan')):>8.1f}")
    if count:
        chance = "".join(f"{min(1.0, k / count):>8.3f}" for k in RECALL_AT)
        lines.append(f"{'chance':<16}{chance}{(count + 1) / 2:>8.1f}")
    return "\n".join(lines)
