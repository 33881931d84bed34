"""The collectives of a training run on several processes: the contrastive loss's gather-with-grad of every
process's embeddings, and the exchange of every process's presence masks it needs.

The model folder knows nothing of processes: its contrastive loss takes an `EmbeddingGather`
(zidong/models/zidong/contrastive_zidong.py), and `ProcessGather` here is the one the trainer hands it when it
prepares the model for its launcher (`prepare_for_launcher` in zidong/train/distributed.py). The trainer
exchanges the presence masks of a whole step at once (`ProcessGather.exchange`), before its first forward; each
forward's gather then reads its batch's share without a collective of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from zidong.models.zidong.contrastive_zidong import GatheredEmbeds
from zidong.models.zidong.objectives_zidong import REGISTRY


def distributed_world_size() -> int:
    """Processes in the default group, or 1 when none is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ProcessGather:
    """The contrastive loss's `EmbeddingGather` over every process of the default group.

    `exchange(batches)` exchanges the presence masks of the forwards to come (one collective for all of them);
    each call then takes the next one, checked against its batch. A call with none waiting exchanges its own
    batch's masks first (two collectives and two reads)."""

    def __init__(self, device: torch.device, capacity: int | None = None) -> None:
        self.device = device
        self.capacity = capacity  # every process's rows per batch at most (the trainer's batch size)
        self._waiting: deque[RankPresence] = deque()

    def exchange(self, batches: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Exchange the presence masks of `batches` (this process's next forwards, in order; collective)."""
        self._waiting.extend(exchange_presence(batches, self.device, self.capacity))

    def expect(self, exchanged: Sequence[RankPresence]) -> None:
        """Use masks exchanged already (`exchange_presence`) for the next forwards, in order."""
        self._waiting.extend(exchanged)

    def __call__(
        self,
        embeds: dict[str, torch.Tensor | None],
        presence: dict[str, np.ndarray],
        width: int,
        like: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> GatheredEmbeds:
        """Each modality gathered from every process once (zeros where a process has none), in the same order on
        every process, so processes never disagree on the collectives whatever their batches lack (`like`: the
        temperature, whose dtype and device such zeros take)."""
        rank = dist.get_rank()
        if self._waiting:
            by_rank = checked_by_rank(self._waiting.popleft(), presence, rank)
        else:
            by_rank = exchange_presence([presence], self.device)[0]
        counts = by_rank.counts
        gathered = {}
        for modality, local in embeds.items():
            if local is None:
                local = like.new_zeros(counts[rank], width)
            if torch.is_grad_enabled() and not local.requires_grad:
                # the gather's backward is a collective: every process must run it, also one whose rows are
                # placeholders
                local = local.detach().requires_grad_()
            gathered[modality] = gather_with_grad(local, counts)[0]
        own = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        return GatheredEmbeds(gathered, by_rank.masks, own, len(counts))


def needs_exchange(processes: int, loss_weights: Mapping[str, float]) -> bool:
    """Does a step with these weights on `processes` processes exchange presence masks? It does when a weighted
    objective gathers embeddings from every process (the contrastive loss): it must know which rows each holds."""
    return processes > 1 and any(o.gathers_embeddings and o.weighted(loss_weights) for o in REGISTRY)


def gather_with_grad(tensor: torch.Tensor, counts: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` from every rank along dim 0, keeping the gradient path to each rank's own rows.

    Ranks may hold different row counts (zero included): `counts`, every rank's, when the caller knows them
    (otherwise they are gathered first, which waits for the device). Returns the concatenation and the index at
    which this rank's rows start in it; a single process returns `tensor` itself and 0.
    """
    if distributed_world_size() == 1:
        return tensor, 0
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


def exchange_presence(
    batches: Sequence[Mapping[str, np.ndarray]], device: torch.device, capacity: int | None = None
) -> list[RankPresence]:
    """Every rank's presence masks for each of `batches` (one rank's forwards, in order; every rank passes as many,
    with the same modalities), in one collective and one read when `capacity` bounds every rank's rows per batch
    (the trainer's batch size). Without it the largest row count is gathered first: a second collective and read.

    Each row travels as one byte: bit 0 says the row exists (ranks may hold fewer rows than `capacity`), bit i+1
    that it has the i-th modality."""
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
        block = block.contiguous()
        world, rows = dist.get_world_size(), block.shape[0]
        gathered = block.new_empty((world * rows, *block.shape[1:]))
        dist.all_gather([gathered[rank * rows : (rank + 1) * rows] for rank in range(world)], block)
        ctx.rows = rows
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, rows = dist.get_rank(), ctx.rows
        if dist.get_backend() == dist.Backend.NCCL:
            mine = grad.new_empty((rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad.contiguous())
            return mine
        summed = grad.clone(memory_format=torch.contiguous_format)  # gloo has no reduce-scatter
        dist.all_reduce(summed)
        return summed[rank * rows : (rank + 1) * rows]


def checked_by_rank(by_rank: RankPresence, host: dict[str, np.ndarray], rank: int) -> RankPresence:
    """`by_rank`, once its share for this rank is this batch's presence (a host-side check, no collective)."""
    start = sum(by_rank.counts[:rank])
    own = slice(start, start + by_rank.counts[rank])
    if by_rank.masks.keys() != host.keys() or any(
        not np.array_equal(by_rank.masks[m][own], mask) for m, mask in host.items()
    ):
        raise ValueError(
            f"the presence exchanged for this forward does not describe this batch on rank {rank}: it was "
            "exchanged for another batch"
        )
    return by_rank


__all__ = [
    "ProcessGather",
    "RankPresence",
    "checked_by_rank",
    "distributed_world_size",
    "exchange_presence",
    "gather_with_grad",
    "gathered_row_counts",
    "needs_exchange",
]
