"""The `matching` objective: the fusion encoder tells a matched sample from one whose text, vision or speech was
swapped for a hard negative (the most similar other sample's, drawn from the contrastive scores).

Imports only torch so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    streams = {m: model.fusion.stream(m, encoded.towers[m], encoded.presence) for m in encoded.towers}
    present = encoded.present_matrix(MODALITIES)  # (B, 3)
    eligible = present.sum(dim=1) >= 2
    with torch.no_grad():
        swapped, partner = mine_hard_negatives(encoded.embeds, present, eligible, model.logit_scale[0])
    negatives = swapped >= 0
    positive_rows, negative_rows = eligible.nonzero()[:, 0], negatives.nonzero()[:, 0]
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
    negative_target = present[negative_rows].clone()  # a pair's negative: either side counts as "swapped"
    triplets = present[negative_rows].sum(dim=1) > 2
    negative_target[triplets] = F.one_hot(swapped[negative_rows][triplets], len(MODALITIES)).bool()
    target[len(positive_rows) :, 1:] = negative_target
    return {"matching": multiway_matching_loss(logits, allowed, target)}


def mine_hard_negatives(
    embeds: dict[str, torch.Tensor | None], present: torch.Tensor, eligible: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each multi-modal sample: which modality to swap (-1: none possible) and whose to take instead.

    The partner is drawn in proportion to softmax(similarity / temperature) between the sample's other
    modalities and candidates' embeddings of the swapped one, so similar (hard) negatives dominate.
    """
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
    possible = candidate_scores.isfinite().any(dim=2)  # (B, 3): a partner exists for that swap
    choice = torch.rand(possible.shape, device=present.device).masked_fill(~possible, -1.0)
    swapped = torch.where(possible.any(dim=1), choice.argmax(dim=1), -1)
    partner = torch.zeros(batch, dtype=torch.long, device=present.device)
    rows = (swapped >= 0).nonzero()[:, 0]
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
