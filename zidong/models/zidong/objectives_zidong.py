"""The objectives' registry: every objective the model trains is one `Objective` here.

An objective declares its weight names (the keys of `loss_weights`, of the recipe's `loss` section and of the logs
and plots), the modules of the model that only objectives of its kind train (its heads), its losses (a function of
the towers' output, `Encoded`, and the forward's `Lockstep`), its model FLOPs beyond the towers' one pass, and two
facts the training side needs. `ZidongModel.forward` calls every objective with a non-zero weight, in registry
order; the FLOPs rule (zidong/train/flops.py), the presence exchange (zidong/train/collectives.py) and the parity
harness read the registry.

An objective with nothing to score on a batch hands the module call it would have made to `lockstep.idle` (see
lockstep_zidong.py), so that sharded processes keep calling the same modules.

Imports only torch and numpy so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .configuration_zidong import MODALITIES
from .contrastive_zidong import contrastive_objective
from .lockstep_zidong import Lockstep
from .masking_zidong import masked_modelling_objective
from .matching_zidong import matching_objective
from .towers_zidong import Encoded

if TYPE_CHECKING:
    from .modeling_zidong import ZidongModel

Losses = Callable[["ZidongModel", Encoded, Mapping[str, float], Lockstep], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Objective:
    weights: tuple[str, ...]  # its weight names: `loss_weights` keys, recipe `loss.<name>` sections, log keys
    heads: tuple[str, ...]  # the model's modules (attribute names) only objectives of its kind train
    losses: Losses  # (model, encoded, weights, lockstep) -> {name: loss}: its weighted losses and their parts
    # model FLOPs beyond each tower's one pass, from (samples,) real tokens per modality (0: absent)
    extra_tower_passes: Callable[[Mapping[str, float]], dict[str, int]] = lambda weights: {}
    fusion_tokens: Callable[[dict[str, np.ndarray], Mapping[str, float]], float] = lambda tokens, weights: 0.0
    gathers_embeddings: bool = False  # reads every process's embeddings: the trainer exchanges presence first
    # draws random numbers per process's batch (negatives, masks): N processes cannot reproduce one process's run
    draws_per_process: bool = False

    def weighted(self, weights: Mapping[str, float]) -> bool:
        """Does any of its weight names carry a non-zero weight?"""
        return any(weights.get(name) for name in self.weights)


def _multi_modal_tokens(tokens: dict[str, np.ndarray]) -> float:
    per_sample = sum(tokens.values())
    multi_modal = sum((tokens[m] > 0).astype(np.int64) for m in MODALITIES) >= 2
    return float(per_sample[multi_modal].sum())


CONTRASTIVE = Objective(
    weights=("contrastive",),
    heads=(),  # the projections and the temperature, which every embedding reads
    losses=lambda model, encoded, weights, lockstep: contrastive_objective(model, encoded),
    gathers_embeddings=True,
)
MATCHING = Objective(
    weights=("matching",),
    heads=("fusion", "matching_head"),
    losses=lambda model, encoded, weights, lockstep: matching_objective(model, encoded, lockstep),
    # positives and their hard negatives: twice the multi-modal samples' tokens
    fusion_tokens=lambda tokens, weights: 2 * _multi_modal_tokens(tokens),
    draws_per_process=True,
)
MASKED_MODELLING = Objective(
    weights=tuple(f"masked_{m}" for m in MODALITIES),
    heads=("fusion", "text_head", "vision_head", "speech_head"),
    losses=masked_modelling_objective,
    # a masked pass of each weighted tower, and one fusion pass over every sample's tokens for all of them
    extra_tower_passes=lambda weights: {m: 1 for m in MODALITIES if weights.get(f"masked_{m}")},
    fusion_tokens=lambda tokens, weights: float(sum(tokens.values()).sum()),
    draws_per_process=True,
)
REGISTRY: list[Objective] = [CONTRASTIVE, MATCHING, MASKED_MODELLING]


def objective_names() -> tuple[str, ...]:
    """Every weight name of every registered objective, in registry order."""
    return tuple(name for objective in REGISTRY for name in objective.weights)


OBJECTIVES = objective_names()  # the built-in objectives' weight names (zidong/objectives.py names them torch-free)


def register_objective(objective: Objective) -> None:
    """Add an objective after the built-in ones (its weight names must be new)."""
    taken = set(objective_names()) & set(objective.weights)
    if taken:
        raise ValueError(f"objective weight name(s) {', '.join(sorted(taken))} are registered already")
    REGISTRY.append(objective)


def checked_loss_weights(loss_weights: Mapping[str, float] | None) -> dict[str, float]:
    """The non-zero weights of `loss_weights` (default: `contrastive` 1.0); ValueError for an unknown name."""
    if loss_weights is None:
        return {"contrastive": 1.0}
    known = objective_names()
    unknown = sorted(set(loss_weights) - set(known))
    if unknown:
        raise ValueError(f"unknown objective(s) {', '.join(unknown)} in loss_weights; known: {', '.join(known)}")
    return {name: float(weight) for name, weight in loss_weights.items() if weight}


__all__ = [
    "CONTRASTIVE",
    "MASKED_MODELLING",
    "MATCHING",
    "OBJECTIVES",
    "REGISTRY",
    "Objective",
    "checked_loss_weights",
    "objective_names",
    "register_objective",
]
