"""What the towers hand to the objectives: one tower's output, and everything the towers made of a batch.

Imports only torch so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TowerOutput:
    """One tower's output on the rows it ran on: text and speech pool by masked mean (independent of padding),
    vision takes its first (CLS) token."""

    token_states: torch.Tensor  # (n, tokens, hidden)
    attention_mask: torch.Tensor  # (n, tokens) bool, True on real tokens
    pooled: torch.Tensor  # (n, hidden)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # the tower's own, when asked for
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class Encoded:
    """A batch of B samples after the towers: what every objective reads.

    `inputs[m]` holds the (values, attention mask or None) the tower of `m` ran on, `towers[m]` its output (only
    the modalities that ran; under lockstep an absent one ran on a placeholder row), `presence[m]` which of the B
    samples have `m`, and `embeds[m]` the L2-normalised (B, projection_dim) embeddings with zero rows where a
    sample lacks `m` (None where the tower did not run)."""

    inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    towers: dict[str, TowerOutput]
    presence: dict[str, torch.Tensor]
    embeds: dict[str, torch.Tensor | None]

    def present_matrix(self, modalities: tuple[str, ...]) -> torch.Tensor:
        """(B, len(modalities)) bool: which sample has which modality."""
        return torch.stack([self.presence[m] for m in modalities], dim=1)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def scatter_rows(rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Rows of the present samples -> a tensor over the whole batch, zeros (or False) where absent."""
    full = rows.new_zeros((present.shape[0], *rows.shape[1:]))
    full[present] = rows
    return full


__all__ = ["Encoded", "TowerOutput", "masked_mean", "scatter_rows"]
