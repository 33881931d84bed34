"""The `contrastive` objective: symmetric InfoNCE or SigLIP loss for every modality pair, negatives from all ranks.

Across processes (gather-with-grad + local loss). Each rank scores only its own rows against
the columns of every rank, so the logits cost (local x global) instead of (global x global) memory. The loss a
rank returns is scaled so that the *mean over ranks* (what DDP's gradient averaging computes) equals the loss of
one process holding the whole global batch, in value and in gradient; ranks may hold different numbers of
samples, or none at all, for a pair.

Imports only torch and numpy so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .towers_zidong import Encoded

if TYPE_CHECKING:
    from .modeling_zidong import ZidongModel


def contrastive_objective(
    model: ZidongModel, encoded: Encoded, by_rank: RankPresence | None = None
) -> dict[str, torch.Tensor]:
    """`contrastive_<a>_<b>` for every pair some sample (on any rank) has, and `contrastive`, their mean; `by_rank`
    as in `contrastive_losses`."""
    losses = contrastive_losses(
        encoded.embeds,
        encoded.presence.host,
        model.logit_scale[0],
        model.logit_bias[0],
        model.config.contrastive_loss,
        model.config.projection_dim,
        by_rank,
    )
    if losses:
        losses["contrastive"] = torch.stack(list(losses.values())).mean()
    return losses


def distributed_world_size() -> int:
    """Processes in the default group, or 1 when none is initialised."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(tensor: torch.Tensor, counts: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` from every rank along dim 0, keeping the gradient path to each rank's own rows.

    Ranks may hold different row counts (zero included): `counts`, every rank's, when the caller knows them
    (otherwise they are gathered first, which waits for the device). Returns the concatenation and the index at
    which this rank's rows start in it; a single process returns `tensor` itself and 0.
    """
    if distributed_world_size() == 1:
        return tensor, 0
    import torch.distributed as dist

    if counts is None:
        counts = gathered_row_counts(tensor.shape[0], tensor.device)
    longest = max(counts)
    # the collective needs equal shapes; pad only when the counts differ (the pad is a copy)
    padded = tensor if tensor.shape[0] == longest else F.pad(tensor, (0, 0, 0, longest - tensor.shape[0]))
    blocks = _GatherBlocks.apply(padded)
    if longest * len(counts) != sum(counts):
        blocks = torch.cat([blocks[rank * longest : rank * longest + count] for rank, count in enumerate(counts)])
    return blocks, sum(counts[: dist.get_rank()])


def gathered_row_counts(rows: int, device: torch.device) -> list[int]:
    """Every rank's `rows` (one collective, one read)."""
    import torch.distributed as dist

    counts = torch.zeros(dist.get_world_size(), dtype=torch.long, device=device)
    dist.all_gather_into_tensor(counts, torch.tensor([rows], device=device))
    return counts.tolist()


@dataclass(frozen=True)
class RankPresence:
    """What one forward's batch holds on every rank: `masks[m]`, every rank's presence masks of `m` concatenated in
    rank order, and `counts`, every rank's row count. The contrastive loss needs it to know which gathered rows
    it may pair; the trainer exchanges it for all the micro-batches of a step at once (`exchange_presence`)."""

    masks: dict[str, np.ndarray]
    counts: list[int]


def needs_presence_by_rank(loss_weights: Mapping[str, float]) -> bool:
    """Does a forward with these weights read every rank's presence masks (`presence_by_rank`)? The contrastive
    loss does: it gathers embeddings from every rank and must know which rows each holds."""
    return bool(loss_weights.get("contrastive"))


def exchange_presence(
    batches: Sequence[Mapping[str, np.ndarray]], device: torch.device, capacity: int | None = None
) -> list[RankPresence]:
    """Every rank's presence masks for each of `batches` (one rank's forwards, in order; every rank passes as many,
    with the same modalities), in one collective and one read when `capacity` bounds every rank's rows per batch
    (the trainer's batch size). Without it the largest row count is gathered first: a second collective and read.

    Each row travels as one byte: bit 0 says the row exists (ranks may hold fewer rows than `capacity`), bit i+1
    that it has the i-th modality."""
    import torch.distributed as dist

    modalities = list(batches[0]) if batches else []
    if len(modalities) > 7:
        raise ValueError(f"at most 7 modalities fit a byte per row, got {modalities}")
    local = [np.stack([np.asarray(b[m], dtype=bool) for m in modalities], axis=1) for b in batches]
    longest = max((len(rows) for rows in local), default=0)
    if capacity is None:
        capacity = max(gathered_row_counts(longest, device))
    elif longest > capacity:
        raise ValueError(f"a batch of {longest} rows exceeds the stated capacity of {capacity}")
    packed = np.zeros((len(local), capacity), dtype=np.uint8)
    bits = (1 << np.arange(1, len(modalities) + 1)).astype(np.uint8)
    for index, rows in enumerate(local):
        packed[index, : len(rows)] = 1 | (rows * bits).sum(axis=1, dtype=np.uint8)
    world = dist.get_world_size()
    every = torch.empty(world * packed.size, dtype=torch.uint8, device=device)
    dist.all_gather_into_tensor(every, torch.from_numpy(packed).reshape(-1).to(device))
    every = every.numpy(force=True).reshape(world, len(local), capacity)  # the one read
    exchanged = []
    for index in range(len(local)):
        rows = every[:, index]  # (world, capacity)
        counts = (rows & 1).sum(axis=1).tolist()
        joined = np.concatenate([rows[rank, :count] for rank, count in enumerate(counts)])
        masks = {m: (joined & bits[column]) > 0 for column, m in enumerate(modalities)}
        exchanged.append(RankPresence(masks, counts))
    return exchanged


class _GatherBlocks(torch.autograd.Function):
    """Every rank's equally shaped block, concatenated; backward sums every rank's gradient for this rank's block.

    Written here rather than taken from `torch.distributed.nn.all_gather`, whose list of pieces must then be
    concatenated (a second copy) and whose backward on gloo emulates reduce-scatter with an all-to-all holding
    about 3.5 gathered sizes at once; this holds the gathered tensor, and one gradient-sized buffer in backward."""

    @staticmethod
    def forward(ctx, block: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        block = block.contiguous()
        world, rows = dist.get_world_size(), block.shape[0]
        gathered = block.new_empty((world * rows, *block.shape[1:]))
        dist.all_gather([gathered[rank * rows : (rank + 1) * rows] for rank in range(world)], block)
        ctx.rows = rows
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        rank, rows = dist.get_rank(), ctx.rows
        if dist.get_backend() == dist.Backend.NCCL:
            mine = grad.new_empty((rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad.contiguous())
            return mine
        summed = grad.clone(memory_format=torch.contiguous_format)  # gloo has no reduce-scatter
        dist.all_reduce(summed)
        return summed[rank * rows : (rank + 1) * rows]


def contrastive_losses(
    embeds: dict[str, torch.Tensor | None],
    presence: Mapping[str, np.ndarray | torch.Tensor],
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    kind: str,
    width: int,
    by_rank: RankPresence | None = None,
) -> dict[str, torch.Tensor]:
    """`contrastive_<a>_<b>` for every pair of modalities some sample (on any rank) has both of, in `embeds` order.

    `embeds[m]` holds this rank's L2-normalised embeddings over the whole batch (zeros where a sample lacks `m`;
    None when no sample has it), `presence[m]` which samples have it, on the host (a bool array, or a CPU tensor).
    Which pairs exist and which rows each reads is decided on the host, so the loss never waits for the device
    (with several processes, after an exchange of the presence masks: `by_rank` when the caller exchanged them
    already, as the trainer does once per step; otherwise two collectives and two reads here). Each modality is
    gathered from every rank once and every pair reads those: one collective per modality, whichever pairs the
    batches hold. Every rank gathers every modality in the same order, so ranks never disagree on the collectives
    whatever their batches lack.
    """
    host = {m: np.asarray(presence[m], dtype=bool) for m in embeds}
    distributed = distributed_world_size() > 1
    device = logit_scale.device
    if distributed:
        import torch.distributed as dist

        rank = dist.get_rank()
        by_rank = checked_by_rank(by_rank, host, rank) if by_rank is not None else exchange_presence([host], device)[0]
        host, counts = by_rank.masks, by_rank.counts
    else:
        counts, rank = [len(next(iter(host.values())))] if host else [0], 0
    own = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    gathered: dict[str, torch.Tensor] = {}
    for modality, local in embeds.items():
        if local is None:
            if not distributed:
                continue
            local = logit_scale.new_zeros(counts[rank], width)
        if distributed and torch.is_grad_enabled() and not local.requires_grad:
            # the gather's backward is a collective: every rank must run it, also one whose rows are placeholders
            local = local.detach().requires_grad_()
        gathered[modality] = gather_with_grad(local, counts)[0]
    losses = {}
    for first, second in itertools.combinations(gathered, 2):
        both = host[first] & host[second]
        if not both.any():
            continue
        all_first, all_second = gathered[first], gathered[second]
        if not both.all():  # keep the samples that have both (a copy; a batch of full triplets needs none)
            index = torch.from_numpy(np.flatnonzero(both)).to(device, non_blocking=True)
            all_first, all_second = all_first.index_select(0, index), all_second.index_select(0, index)
        start = int(both[: own.start].sum())
        mine = slice(start, start + int(both[own].sum()))
        losses[f"contrastive_{first}_{second}"] = contrastive_pair_loss(
            all_first, all_second, mine, logit_scale, logit_bias, kind
        )
    return losses


def checked_by_rank(by_rank: RankPresence, host: dict[str, np.ndarray], rank: int) -> RankPresence:
    """`by_rank`, once its share for this rank is this batch's presence (a host-side check, no collective)."""
    start = sum(by_rank.counts[:rank])
    own = slice(start, start + by_rank.counts[rank])
    if by_rank.masks.keys() != host.keys() or any(
        not np.array_equal(by_rank.masks[m][own], mask) for m, mask in host.items()
    ):
        raise ValueError(
            f"presence_by_rank does not describe this batch on rank {rank}: it was exchanged for another batch"
        )
    return by_rank


def contrastive_pair_loss(
    all_a: torch.Tensor,
    all_b: torch.Tensor,
    mine: slice,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    kind: str,
) -> torch.Tensor:
    """Symmetric InfoNCE ("softmax") or SigLIP ("sigmoid") loss between matched rows of `all_a` and `all_b`.

    `all_a` and `all_b` hold every rank's L2-normalised embeddings of the samples that have both modalities,
    gathered with gradient (`gather_with_grad`); this rank's rows are `mine`. Negatives are every other row.
    """
    # The (local x global) logits and their softmax are recomputed in backward instead of kept until then: they
    # grow with the global batch, and across three pairs they were most of what the loss held.
    # In float32 whatever the autocast: bf16 logits would round similarities of 0.99 and 0.995 to the same value.
    with torch.autocast(all_a.device.type, enabled=False):
        a, b = all_a.float(), all_b.float()
        summed = checkpoint(_summed_pair_loss, a, b, mine, logit_scale, logit_bias, kind, use_reentrant=False)
    total = all_a.shape[0]
    return summed * distributed_world_size() / (total if kind == "sigmoid" else 2 * total)


def _summed_pair_loss(
    all_a: torch.Tensor,
    all_b: torch.Tensor,
    mine: slice,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    kind: str,
) -> torch.Tensor:
    """The loss of this rank's rows against every rank's, summed over them (not yet averaged)."""
    scale = logit_scale.exp()
    logits_ab = scale * all_a[mine] @ all_b.T
    rows = torch.arange(logits_ab.shape[0], device=all_a.device)
    if kind == "sigmoid":
        targets = -torch.ones_like(logits_ab)
        targets[rows, rows + mine.start] = 1.0
        return -F.logsigmoid(targets * (logits_ab + logit_bias)).sum()
    logits_ba = scale * all_b[mine] @ all_a.T
    summed = F.cross_entropy(logits_ab, rows + mine.start, reduction="sum")
    return summed + F.cross_entropy(logits_ba, rows + mine.start, reduction="sum")


__all__ = [
    "RankPresence",
    "checked_by_rank",
    "contrastive_losses",
    "contrastive_objective",
    "contrastive_pair_loss",
    "distributed_world_size",
    "exchange_presence",
    "gather_with_grad",
    "gathered_row_counts",
]
