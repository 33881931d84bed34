"""The `matching` objective: the fusion encoder tells a matched sample from one whose text, vision or speech was
swapped for a hard negative (the most similar other sample's, drawn from the contrastive scores).

Imports only torch and numpy so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .configuration_zidong import MODALITIES
from .lockstep_zidong import Lockstep
from .towers_zidong import Encoded

if TYPE_CHECKING:
    from .modeling_zidong import ZidongModel

MATCHING_CLASSES = ("matched", "text_swapped", "vision_swapped", "speech_swapped")


def matching_objective(model: ZidongModel, encoded: Encoded, lockstep: Lockstep) -> dict[str, torch.Tensor]:
    """`matching`: multi-way matching on each multi-modal sample and one hard negative of it (one modality
    swapped); {} when no sample has two modalities."""
    streams = {m: model.fusion.stream(m, encoded.outputs[m], encoded.presence) for m in encoded.outputs}
    present = encoded.present_matrix(MODALITIES)  # (B, 3)
    # which rows are scored, and which get a negative, follows from presence alone: decided on the host
    host_present = np.stack([encoded.presence.host[m] for m in MODALITIES], axis=1)
    host_eligible = host_present.sum(axis=1) >= 2
    host_possible = swappable(host_present)
    device = present.device
    eligible = torch.from_numpy(host_eligible).to(device, non_blocking=True)
    with torch.no_grad():
        swapped, partner = mine_hard_negatives(encoded.embeds, present, eligible, model.logit_scale[0], host_possible)
    positive_rows, negative_rows = (
        torch.from_numpy(np.flatnonzero(rows)).to(device, non_blocking=True)
        for rows in (host_eligible, host_possible.any(axis=1))
    )
    if positive_rows.numel() == 0:
        lockstep.idle(
            lambda: model.matching_head(
                model.fusion({m: (states[:1], mask[:1]) for m, (states, mask) in streams.items()}).states[:, 0]
            )
        )
        return {}
    fused_inputs = {}
    for m, (states, mask) in streams.items():
        index = torch.where(swapped == MODALITIES.index(m), partner, torch.arange(len(partner), device=partner.device))
        negative_index = index[negative_rows]
        # index_select, not states[...]: a partner can be drawn twice, and the backward of advanced indexing
        # accumulates repeated rows with atomic adds on CPU (run-to-run differences); index_add is ordered
        fused_inputs[m] = (
            torch.cat([states.index_select(0, positive_rows), states.index_select(0, negative_index)]),
            torch.cat([mask[positive_rows], mask[negative_index]]),
        )
    logits = model.matching_head(model.fusion(fused_inputs).states[:, 0])
    rows = torch.cat([positive_rows, negative_rows])
    allowed = torch.cat([torch.ones_like(rows, dtype=torch.bool)[:, None], present[rows]], dim=1)
    target = torch.zeros_like(allowed)
    target[: len(positive_rows), 0] = True
    # a pair's negative: either side counts as "swapped"; a triplet's: the swapped modality
    triplets = torch.from_numpy(host_present[host_possible.any(axis=1)].sum(axis=1) > 2).to(device, non_blocking=True)
    one_swapped = F.one_hot(swapped[negative_rows].clamp(min=0), len(MODALITIES)).bool()
    target[len(positive_rows) :, 1:] = torch.where(triplets[:, None], one_swapped, present[negative_rows])
    return {"matching": multiway_matching_loss(logits, allowed, target)}


def swappable(present: np.ndarray) -> np.ndarray:
    """(B, 3) bool on the host: which modality of which multi-modal sample can be swapped for another sample's."""
    counts = present.astype(np.int64)
    eligible = counts.sum(axis=1, keepdims=True) >= 2
    others_have = counts.sum(axis=0, keepdims=True) - counts >= 1
    return eligible & present.astype(bool) & others_have


def mine_hard_negatives(
    embeds: dict[str, torch.Tensor | None],
    present: torch.Tensor,
    eligible: torch.Tensor,
    logit_scale: torch.Tensor,
    possible: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each multi-modal sample: which modality to swap (-1: none possible) and whose to take instead.

    The partner is drawn in proportion to softmax(similarity / temperature) between the sample's other
    modalities and candidates' embeddings of the swapped one, so similar (hard) negatives dominate. `possible`:
    `swappable` of the presence on the host (computed here from `present` when not given).
    """
    if possible is None:
        possible = swappable(present.cpu().numpy())
    batch = present.shape[0]
    scale = logit_scale.exp()
    candidate_scores = torch.full((batch, len(MODALITIES), batch), float("-inf"), device=present.device)
    for index, modality in enumerate(MODALITIES):
        if embeds[modality] is None:
            continue
        similarity = torch.zeros(batch, batch, device=present.device)
        others = 0
        for other_index, other in enumerate(MODALITIES):
            if other != modality and embeds[other] is not None:
                similarity += present[:, other_index, None] * (embeds[other] @ embeds[modality].T).float()
                others = others + present[:, other_index, None].float()
        valid = eligible[:, None] & present[:, index, None] & present[None, :, index]
        valid &= ~torch.eye(batch, dtype=torch.bool, device=present.device)
        scores = scale * similarity / torch.as_tensor(others).clamp(min=1)
        candidate_scores[:, index] = scores.masked_fill(~valid, float("-inf"))
    rows = torch.from_numpy(np.flatnonzero(possible.any(axis=1))).to(present.device, non_blocking=True)
    possible = torch.from_numpy(possible).to(present.device, non_blocking=True)  # (B, 3): a partner exists
    choice = torch.rand(possible.shape, device=present.device).masked_fill(~possible, -1.0)
    swapped = torch.where(possible.any(dim=1), choice.argmax(dim=1), -1)
    partner = torch.zeros(batch, dtype=torch.long, device=present.device)
    if rows.numel():
        probabilities = candidate_scores[rows, swapped[rows]].softmax(dim=-1)
        partner[rows] = torch.multinomial(probabilities, 1)[:, 0]
    return swapped, partner


def multiway_matching_loss(logits: torch.Tensor, allowed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the classes a sample may take, with the probability of a *set* of correct classes.

    The matching head scores "matched" plus "text / vision / speech was swapped". A triplet's negative has one
    correct class; a two-modality sample's negative has two equivalent ones (swapping either side of a pair
    looks the same), so its probability is the sum over both. `allowed` and `target` are (n, classes) bool.
    """
    scores = logits.float()
    log_all = scores.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1)
    log_target = scores.masked_fill(~target, float("-inf")).logsumexp(dim=-1)
    return (log_all - log_target).mean()


__all__ = ["MATCHING_CLASSES", "matching_objective", "mine_hard_negatives", "multiway_matching_loss"]
