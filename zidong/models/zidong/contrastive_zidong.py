"""The `contrastive` objective: symmetric InfoNCE or SigLIP loss for every modality pair.

A loss of features: this process's L2-normalised embeddings and, when the model was prepared for several
processes, every process's, gathered with gradient by an `EmbeddingGather` the training side hands the model
(zidong/train/collectives.py; `ZidongModel.prepare_for_launcher`). Each process then scores only its own rows
against the columns of every process (local loss), so the logits cost (local x global) instead of
(global x global) memory, and the loss it returns is scaled so that the *mean over processes* (what DDP's gradient
averaging computes) equals the loss of one process holding the whole global batch, in value and in gradient.
Without a gather (one process, or a model used outside zidong's trainer) the negatives are this batch's rows, as
in CLIP's own `return_loss`.

Imports only torch and numpy so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .towers_zidong import Encoded

if TYPE_CHECKING:
    from .modeling_zidong import ZidongModel


@dataclass
class GatheredEmbeds:
    """The rows the contrastive loss scores: every process's embeddings of each modality, in process order,
    which of those rows have it (host masks), which rows are this process's, and over how many processes the
    loss is averaged (DDP divides the summed gradient by it)."""

    embeds: dict[str, torch.Tensor]
    presence: dict[str, np.ndarray]
    own: slice
    processes: int = 1
    # added to the contrastive loss, 0 in value: how a gather that scores cached rows (the trainer's step cache
    # under `train.full_batch_negatives`) hands this batch's rows the gradient of the whole step
    gradient_term: torch.Tensor | float = 0.0


class EmbeddingGather(Protocol):
    """The rows this batch's contrastive loss scores (collective across processes): the training side's,
    zidong/train/collectives.py and zidong/train/step_cache.py. `logit_scale` and `logit_bias` are the
    temperature and bias the loss uses (the gather may need their values, dtype and device)."""

    def __call__(
        self,
        embeds: dict[str, torch.Tensor | None],
        presence: dict[str, np.ndarray],
        width: int,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> GatheredEmbeds: ...


def local_rows(embeds: dict[str, torch.Tensor | None], presence: dict[str, np.ndarray]) -> GatheredEmbeds:
    """This batch's rows only (one process): the modalities no sample has are left out."""
    size = len(next(iter(presence.values()))) if presence else 0
    return GatheredEmbeds({m: e for m, e in embeds.items() if e is not None}, presence, slice(0, size))


def contrastive_objective(model: ZidongModel, encoded: Encoded) -> dict[str, torch.Tensor]:
    """`contrastive_<a>_<b>` for every pair some sample (on any process) has, and `contrastive`, their mean."""
    scale, bias = model.logit_scale[0], model.logit_bias[0]
    rows = gathered_rows(encoded.embeds, encoded.presence.host, scale, bias, model.config.projection_dim,
                         model.launch.gather)  # fmt: skip
    losses = pair_losses(rows, scale, bias, model.config.contrastive_loss)
    if losses:
        losses["contrastive"] = torch.stack(list(losses.values())).mean() + rows.gradient_term
    return losses


def gathered_rows(
    embeds: dict[str, torch.Tensor | None],
    presence: Mapping[str, np.ndarray | torch.Tensor],
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    width: int,
    gather: EmbeddingGather | None = None,
) -> GatheredEmbeds:
    """The rows the loss scores: `gather`'s (every process's), or this batch's only."""
    host = {m: np.asarray(presence[m], dtype=bool) for m in embeds}
    return local_rows(embeds, host) if gather is None else gather(embeds, host, width, logit_scale, logit_bias)


def contrastive_losses(
    embeds: dict[str, torch.Tensor | None],
    presence: Mapping[str, np.ndarray | torch.Tensor],
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    kind: str,
    width: int,
    gather: EmbeddingGather | None = None,
) -> dict[str, torch.Tensor]:
    """`contrastive_<a>_<b>` for every pair of modalities some sample (on any process) has both of, in `embeds`
    order.

    `embeds[m]` holds this process's L2-normalised embeddings over the whole batch (zeros where a sample lacks
    `m`; None when no sample has it), `presence[m]` which samples have it, on the host (a bool array, or a CPU
    tensor). Which pairs exist and which rows each reads is decided on the host, so the loss never waits for the
    device. `gather`: every process's rows (None: this batch's only).
    """
    rows = gathered_rows(embeds, presence, logit_scale, logit_bias, width, gather)
    return pair_losses(rows, logit_scale, logit_bias, kind)


def pair_losses(
    rows: GatheredEmbeds, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None, kind: str
) -> dict[str, torch.Tensor]:
    """The loss of every pair of `rows`' modalities that some row has both of: `rows.own` against every row."""
    device = logit_scale.device
    losses = {}
    for first, second in itertools.combinations(rows.embeds, 2):
        both = rows.presence[first] & rows.presence[second]
        if not both.any():
            continue
        all_first, all_second = rows.embeds[first], rows.embeds[second]
        if not both.all():  # keep the samples that have both (a copy; a batch of full triplets needs none)
            index = torch.from_numpy(np.flatnonzero(both)).to(device, non_blocking=True)
            all_first, all_second = all_first.index_select(0, index), all_second.index_select(0, index)
        start = int(both[: rows.own.start].sum())
        mine = slice(start, start + int(both[rows.own].sum()))
        losses[f"contrastive_{first}_{second}"] = contrastive_pair_loss(
            all_first, all_second, mine, logit_scale, logit_bias, kind, rows.processes
        )
    return losses


def contrastive_pair_loss(
    all_a: torch.Tensor,
    all_b: torch.Tensor,
    mine: slice,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    kind: str,
    processes: int = 1,
) -> torch.Tensor:
    """Symmetric InfoNCE ("softmax") or SigLIP ("sigmoid") loss between matched rows of `all_a` and `all_b`.

    `all_a` and `all_b` hold every process's L2-normalised embeddings of the samples that have both modalities,
    gathered with gradient over `processes` processes; this process's rows are `mine`. Negatives are every other
    row.
    """
    # The (local x global) logits and their softmax are recomputed in backward instead of kept until then: they
    # grow with the global batch, and across three pairs they were most of what the loss held.
    # In float32 whatever the autocast: bf16 logits would round similarities of 0.99 and 0.995 to the same value.
    with torch.autocast(all_a.device.type, enabled=False):
        a, b = all_a.float(), all_b.float()
        summed = checkpoint(_summed_pair_loss, a, b, mine, logit_scale, logit_bias, kind, use_reentrant=False)
    total = all_a.shape[0]
    return summed * processes / (total if kind == "sigmoid" else 2 * total)


def _summed_pair_loss(
    all_a: torch.Tensor,
    all_b: torch.Tensor,
    mine: slice,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    kind: str,
) -> torch.Tensor:
    """The loss of this process's rows against every process's, summed over them (not yet averaged)."""
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
    "EmbeddingGather",
    "GatheredEmbeds",
    "contrastive_losses",
    "contrastive_objective",
    "contrastive_pair_loss",
    "gathered_rows",
    "local_rows",
    "pair_losses",
]
