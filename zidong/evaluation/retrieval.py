"""Retrieval on held-out shards: Recall@1/5/10 and median rank for every modality pair and direction.

Every process embeds a contiguous block of the held-out samples (evaluation transforms: centre crop, audio
head); the embeddings are gathered to every process and scored there. For the pair (a, b) only samples that have
both modalities take part; `a->b` ranks all b-embeddings for each a-query, and a hit is the query's own sample.
Chance level for R@k is k / n.

Captions often repeat (the demo's 240 held-out samples carry 196 distinct ones; COCO gives each image five), and a
model cannot tell apart two images whose only link to the query is the same caption. So next to the strict R@k
the metrics give its ceiling (the best a model can reach on these captions) and the duplicate-aware R@k, where any
candidate with the query's caption is a hit (COCO's convention of several right answers). Tied scores count in
expectation over a random order, never in the query's favour.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from zidong.data.remote import ShardCache
from zidong.data.shards import SampleError, ShardFolder
from zidong.data.transforms import SamplePipeline
from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.utils.log import EVERY_RANK, get_logger

RECALL_AT = (1, 5, 10)
QUERY_BLOCK = 1024  # queries scored at once
logger = get_logger(__name__)


@dataclass(frozen=True)
class HeldOut:
    """A held-out shard folder and how to read it: evaluation transforms, batch size, the processes that share
    it, and `collective_forward` (DeepSpeed/FSDP gather parameters inside the forward: every process makes the
    same number of forward calls, idle ones included)."""

    folder: str | Path
    pipeline: SamplePipeline
    batch_size: int
    accelerator: Accelerator
    collective_forward: bool = False
    cache: ShardCache | None = None  # where a folder at a URL is fetched to (None: the user's default cache)


def retrieval(model: torch.nn.Module, held_out: HeldOut) -> dict[str, float]:
    """`{"text->vision/R@1": 0.42, ..., "samples": n}` for the held-out shard folder (collective)."""
    embeds, presence = embed_folder(model, held_out)
    return recall_at_k(embeds, presence, folder_captions(held_out.folder, held_out.cache))


@torch.no_grad()
def embed_folder(model: torch.nn.Module, held_out: HeldOut) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Embeddings (n, d) and presence (n,) of every sample of a shard folder, in shard order, on every process
    (collective). Each process embeds a contiguous block; an unreadable sample is skipped (absent everywhere)."""
    accelerator = held_out.accelerator
    total = len(ShardFolder(held_out.folder, held_out.cache))
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
    a shard folder, in eval mode; unreadable samples are skipped (under `collective_forward` every process makes
    the same number of forward calls, idle ones included)."""
    pipeline, batch_size, accelerator, collective = (
        held_out.pipeline,
        held_out.batch_size,
        held_out.accelerator,
        held_out.collective_forward,
    )
    shards = ShardFolder(held_out.folder, held_out.cache)
    refs = sample_refs(shards)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = refs[rank * len(refs) // world : (rank + 1) * len(refs) // world]
    was_training = model.training
    model.eval()
    longest = -(-len(refs) // world)  # blocks differ by at most one sample; every process runs as many batches
    for start in range(0, longest if collective else len(mine), batch_size):
        samples, rows = [], []
        for row, (shard, position) in enumerate(mine[start : start + batch_size], start=start):
            try:
                samples.append(pipeline.decode(shards.read(shard, position), np.random.default_rng(0)))
                rows.append(row)
            except SampleError as err:
                logger.warning("evaluation skipped an unreadable sample: %s", err, extra=EVERY_RANK)
        if not samples and not collective:
            continue
        batch = (
            {key: value.to(accelerator.device) for key, value in pipeline.collate(samples).items()} if samples else {}
        )
        with accelerator.autocast():
            output = model(**batch)
        yield rows, batch, output
    model.train(was_training)
    shards.close()


def folder_captions(folder: str | Path, cache: ShardCache | None = None) -> list[str | None]:
    """Every sample's caption (its text member) in `embed_folder` order; None where a sample has none or it
    cannot be read."""
    shards = ShardFolder(folder, cache)
    captions: list[str | None] = []
    for shard, position in sample_refs(shards):
        try:
            text = shards.read(shard, position, only=("txt",)).files.get("txt")
            captions.append(text.decode("utf-8") if text is not None else None)
        except (SampleError, UnicodeDecodeError):
            captions.append(None)
    shards.close()
    return captions


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


def recall_at_k(
    embeds: dict[str, torch.Tensor], present: dict[str, torch.Tensor], captions: Sequence[str | None] | None = None
) -> dict[str, float]:
    """Recall@k for every ordered pair of modalities from (n, d) normalised embeddings and (n,) presence.

    `{pair}/R@k` (strict: only the query's own sample is a hit) and `{pair}/median_rank`; with `captions` (one per
    sample, None for a sample without one) also `{pair}/dup_R@k` (any candidate with the query's caption is a
    hit) and `{pair}/ceiling_R@k` (the best strict R@k possible: a model that ranks every candidate with the
    query's caption first still cannot tell them apart when the caption is all the two sides share). Scores
    that tie are ordered at random; the numbers are the expectation over that order.
    """
    count_all = len(next(iter(present.values())))
    metrics: dict[str, float] = {"samples": float(count_all)}
    groups = caption_groups(captions, count_all)
    if captions is not None:
        metrics["distinct_captions"] = float(len({text for text in captions if text is not None}))
    for query, target in permutations(MODALITIES, 2):
        both = present[query] & present[target]
        count = int(both.sum())
        if count < 2:
            continue
        pair = f"{query}->{target}"
        queries, candidates, group = embeds[query][both], embeds[target][both], groups[both]
        strict: list[dict[int, torch.Tensor]] = []
        duplicate: list[dict[int, torch.Tensor]] = []
        ranks = []
        for start in range(0, count, QUERY_BLOCK):  # (block, count) scores at a time bound the memory
            rows = torch.arange(start, min(start + QUERY_BLOCK, count))
            similarity = queries[rows] @ candidates.T
            hits, rank = expected_hits(similarity, rows[:, None] == torch.arange(count)[None, :])
            strict.append(hits)
            ranks.append(rank)
            if captions is not None:
                duplicate.append(expected_hits(similarity, group[rows][:, None] == group[None, :])[0])
        for k in RECALL_AT:
            metrics[f"{pair}/R@{k}"] = float(torch.cat([hits[k] for hits in strict]).mean())
        metrics[f"{pair}/median_rank"] = float(torch.cat(ranks).median())
        metrics[f"{pair}/count"] = float(count)
        if captions is None:
            continue
        _, which, sizes = torch.unique(group, return_inverse=True, return_counts=True)
        group_size = sizes[which].double()  # candidates with the query's caption, its own included
        for k in RECALL_AT:
            metrics[f"{pair}/dup_R@{k}"] = float(torch.cat([hits[k] for hits in duplicate]).mean())
            metrics[f"{pair}/ceiling_R@{k}"] = float((group_size.clamp(max=k) / group_size).mean())
    return metrics


def caption_groups(captions: Sequence[str | None] | None, count: int) -> torch.Tensor:
    """(count,) group ids: equal captions share one; a sample without a caption (or no captions) is alone."""
    if captions is None:
        return torch.arange(count)
    if len(captions) != count:
        raise ValueError(f"{len(captions)} captions for {count} samples")
    ids: dict[str, int] = {}
    return torch.tensor(
        [ids.setdefault(text, len(ids)) if text is not None else count + row for row, text in enumerate(captions)]
    )


def expected_hits(similarity: torch.Tensor, relevant: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per query (row): the probability that a relevant candidate is among the first k, for every k of
    RECALL_AT, and the expected rank (1-based) of the first relevant candidate, when tied scores are put in a
    random order. `relevant` (queries, candidates) marks the right answers; every row has at least one."""
    best = similarity.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    above = (similarity > best).sum(dim=1).double()  # only wrong candidates can beat the best right one
    at_best = similarity == best
    tied_wrong = (at_best & ~relevant).sum(dim=1).double()
    tied_right = (at_best & relevant).sum(dim=1).double()
    hits = {}
    for k in RECALL_AT:
        # places left for the tie after the `above` candidates: the tie misses them all only if its first
        # `places` members are all wrong, with probability prod_{i < places} (wrong - i) / (wrong + right - i)
        places = k - above
        all_wrong = torch.ones_like(above)
        for i in range(k):
            factor = torch.where(tied_wrong > i, (tied_wrong - i) / (tied_wrong + tied_right - i).clamp(min=1), 0.0)
            all_wrong = torch.where(places > i, all_wrong * factor, all_wrong)
        hits[k] = torch.where(places > 0, 1.0 - all_wrong, 0.0)
    # among w wrong and r right candidates in random order, w / (r + 1) wrong ones come first on average
    rank = above + 1 + tied_wrong / (tied_right + 1)
    return hits, rank


def retrieval_table(metrics: dict[str, float]) -> str:
    """The retrieval metrics as a fixed-width table (R@k and median rank), with their chance levels; when the
    metrics have them, the strict R@1 ceiling and the duplicate-aware R@k, with a legend."""
    pairs = sorted({key.split("/")[0] for key in metrics if "/R@" in key})
    count = int(metrics.get("samples", 0))
    captions = "distinct_captions" in metrics
    extra = ["ceil@1", *(f"dup@{k}" for k in RECALL_AT)] if captions else []
    lines = [f"{'pair':<16}" + "".join(f"{name:>8}" for name in [*(f"R@{k}" for k in RECALL_AT), "median", *extra])]
    for pair in pairs:
        row = "".join(f"{metrics[f'{pair}/R@{k}']:>8.3f}" for k in RECALL_AT)
        row += f"{metrics.get(f'{pair}/median_rank', float('nan')):>8.1f}"
        if captions:
            row += f"{metrics[f'{pair}/ceiling_R@1']:>8.3f}"
            row += "".join(f"{metrics[f'{pair}/dup_R@{k}']:>8.3f}" for k in RECALL_AT)
        lines.append(f"{pair:<16}{row}")
    if count:
        chance = "".join(f"{min(1.0, k / count):>8.3f}" for k in RECALL_AT)
        lines.append(f"{'chance':<16}{chance}{(count + 1) / 2:>8.1f}")
    if captions:
        lines.append(
            f"({count} samples, {int(metrics['distinct_captions'])} distinct captions. R@k: the query's own sample "
            "is in the first k. ceil@1: the best R@1 possible when samples share a caption. dup@k: a sample with "
            "the query's caption is in the first k.)"
        )
    return "\n".join(lines)
