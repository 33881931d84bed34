"""Full-batch negatives under gradient accumulation (`train.full_batch_negatives`, the GradCache method).

With `train.grad_accum = K`, each micro-batch's contrastive loss would score its rows against that micro-batch
only. `StepCache` makes the step's K micro-batches (on every process) one batch of negatives, in the memory of one
micro-batch, in three phases the trainer drives:

1. `embed`: every micro-batch's forward without gradients hands its embeddings (and the temperature the loss
   used) to the cache, as the contrastive loss's `EmbeddingGather`;
2. `solve` (inside `embed`): the contrastive loss of the whole step over the cached embeddings, every process's
   gathered with gradient, and its gradient with respect to each of this process's cached rows;
3. `replay(k)`: micro-batch k's forward with gradients scores its rows against the whole cache (the loss value
   and the temperature's gradient are those of the whole step's loss, shared between the micro-batches); its
   rows get the gradient `solve` computed through a term that is 0 in value (`GatheredEmbeds.gradient_term`).

Each micro-batch's forwards run under a random seed of its own, drawn when the step begins, so that the replay
draws the dropout and SpecAugment masks the cached forward drew, and the cached gradient is the one of the rows
that are trained. Only the contrastive objective sees full-batch negatives: the other objectives keep their
per-micro-batch form (matching mines its hard negatives in the micro-batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.models.zidong.contrastive_zidong import GatheredEmbeds, gathered_rows, pair_losses
from zidong.train.collectives import ProcessGather


class StepCache:
    """The contrastive loss's `EmbeddingGather` under `train.full_batch_negatives`: see the module docstring.
    `processes`: the gather of every process's rows (None on one process); `micro_batches`: `train.grad_accum`."""

    def __init__(self, micro_batches: int, processes: ProcessGather | None = None) -> None:
        self.micro_batches = micro_batches
        self.processes = processes
        self._phase: str | None = None  # "record", "replay" or None (outside a step: the plain gather)
        self._recorded: list[dict[str, torch.Tensor | None]] = []
        self._presence: list[dict[str, np.ndarray]] = []
        self._starts: list[int] = []  # where each micro-batch's rows start in this process's rows of the step
        self._seeds: list[int] = []
        self._rows: GatheredEmbeds | None = None
        self._gradients: dict[str, torch.Tensor] = {}
        self._temperature: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._current = 0

    def begin(self, presence: Sequence[Mapping[str, np.ndarray]]) -> None:
        """A new step of these micro-batches (their presence masks, in order; collective on several processes):
        draws each micro-batch's seed from torch's generator and exchanges every process's masks of the whole
        step."""
        if len(presence) != self.micro_batches:
            raise ValueError(f"a step of {len(presence)} micro-batches, but train.grad_accum={self.micro_batches}")
        self._presence = [{m: np.asarray(masks[m], dtype=bool) for m in MODALITIES} for masks in presence]
        self._starts = np.cumsum([0, *(len(masks["text"]) for masks in self._presence)]).tolist()
        self._seeds = torch.randint(0, 2**62, (self.micro_batches,)).tolist()
        self._recorded, self._rows, self._gradients = [], None, {}
        if self.processes is not None:
            self.processes.exchange([self._joined_presence()])

    @contextlib.contextmanager
    def randomness(self, index: int, devices: list[torch.device]) -> Iterator[None]:
        """Around micro-batch `index`'s forward (cached and replayed): torch's generators seeded for it, and left
        as they were found afterwards."""
        cuda = [device for device in devices if device.type == "cuda"]
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self._seeds[index])
            yield

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Around the forwards of phase 1 (without gradients): each hands its embeddings to the cache."""
        self._phase = "record"
        try:
            yield
        finally:
            self._phase = None

    def solve(self, kind: str, width: int) -> None:
        """The whole step's contrastive loss over the cached rows, and its gradient for each of them (collective
        on several processes)."""
        if len(self._recorded) != self.micro_batches:
            raise RuntimeError(f"{len(self._recorded)} micro-batches were cached of {self.micro_batches}")
        scale, bias = self._temperature
        leaves: dict[str, torch.Tensor | None] = {}
        for modality in MODALITIES:
            parts = [step[modality] for step in self._recorded]
            if all(part is None for part in parts):
                leaves[modality] = None
                continue
            rows = np.diff(self._starts).tolist()
            parts = [scale.new_zeros(n, width) if part is None else part for part, n in zip(parts, rows, strict=True)]
            leaves[modality] = torch.cat(parts).requires_grad_()
        with torch.enable_grad():
            self._rows = gathered_rows(leaves, self._joined_presence(), scale, bias, width, self.processes)
            losses = pair_losses(self._rows, scale, bias, kind)
            if losses:
                torch.stack(list(losses.values())).mean().backward()
        self._rows = GatheredEmbeds(
            {m: e.detach() for m, e in self._rows.embeds.items()},
            self._rows.presence,
            self._rows.own,
            self._rows.processes * self.micro_batches,  # every micro-batch is one more share of the step's loss
        )
        self._gradients = {m: leaf.grad for m, leaf in leaves.items() if leaf is not None and leaf.grad is not None}

    @contextlib.contextmanager
    def replay(self, index: int) -> Iterator[None]:
        """Around micro-batch `index`'s forward with gradients (phase 3)."""
        self._phase, self._current = "replay", index
        try:
            yield
        finally:
            self._phase = None

    def __call__(
        self,
        embeds: dict[str, torch.Tensor | None],
        presence: dict[str, np.ndarray],
        width: int,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> GatheredEmbeds:
        if self._phase == "record":
            index = len(self._recorded)
            self._check(index, presence)
            self._recorded.append({m: None if e is None else e.detach() for m, e in embeds.items()})
            # copies: a sharded model (FSDP2, ZeRO-3) frees its gathered parameters after the forward
            bias = None if logit_bias is None else logit_bias.detach().clone()
            self._temperature = (logit_scale.detach().clone(), bias)
            return GatheredEmbeds({}, presence, slice(0, 0))  # nothing to score before the whole step is cached
        if self._phase == "replay":
            self._check(self._current, presence)
            return self._replayed(embeds)
        return gathered_rows(embeds, presence, logit_scale, logit_bias, width, self.processes)  # outside a step

    def _replayed(self, embeds: dict[str, torch.Tensor | None]) -> GatheredEmbeds:
        """The cached rows of the whole step, scored from this micro-batch's share, and the term that gives its
        live rows their gradient of the whole step (scaled by the micro-batches: the trainer divides each
        micro-batch's loss by them)."""
        rows, first, end = self._rows, self._starts[self._current], self._starts[self._current + 1]
        own = slice(rows.own.start + first, rows.own.start + end)
        term = rows.embeds[next(iter(rows.embeds))].new_zeros(()) if rows.embeds else 0.0
        for modality, live in embeds.items():
            if live is None or modality not in self._gradients:
                continue
            gradient = self._gradients[modality][first:end].to(live.dtype)
            product = (live * gradient).sum()
            term = term + self.micro_batches * (product - product.detach())
        return GatheredEmbeds(rows.embeds, rows.presence, own, rows.processes, term)

    def _joined_presence(self) -> dict[str, np.ndarray]:
        return {m: np.concatenate([masks[m] for masks in self._presence]) for m in MODALITIES}

    def _check(self, index: int, presence: Mapping[str, np.ndarray]) -> None:
        expected = self._presence[index] if index < len(self._presence) else None
        if expected is None or any(not np.array_equal(expected[m], presence[m]) for m in presence):
            raise ValueError(f"the forward of micro-batch {index} does not hold the batch its step began with")


__all__ = ["StepCache"]
