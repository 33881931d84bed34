"""Lockstep: the one place the model knows it may be sharded (DeepSpeed ZeRO, FSDP) or run on several processes.

How the model runs is set once, where the training side prepares it for its launcher
(`model.prepare_for_launcher(lockstep=..., gather=...)`, called by zidong/train/distributed.py): a `Launch`
that every forward reads. Its forward's signature is a transformers user's: it takes no distributed argument.

Sharded training gathers and reduces parameters with collectives as modules are called, so every process must call
the same modules in the same order, and give every parameter a gradient, whatever its batch holds. Under
`Launch.lockstep` model code needs three things of the forward's `Lockstep`, and with it off (the default) each of
them is a no-op:

- `placeholder(modality)`: one short valid input row for a tower whose modality the batch lacks (two tokens, a
  blank image, half a second of silence). The tower runs on it; its presence stays all False, so it enters no loss.
- `idle(run)`: where an objective has nothing to score, it hands the module call it would have made on one row;
  in lockstep that call runs (keeping torch's and numpy's random state as it found it, so real rows draw the same
  dropout and masks as in an ordinary forward) and its output is kept.
- `tie(loss)`: adds every kept output to the loss times 0: a zero gradient, the same backward on every process.

An objective author calls `idle` in the branch where the batch gives nothing to score; tests/models/test_lockstep.py
checks every objective for the same module sequence on every batch mix and a gradient on every parameter.

Imports only torch and numpy so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .contrastive_zidong import EmbeddingGather


@dataclass(frozen=True)
class Launch:
    """How the model runs: `lockstep` (every process calls every tower and weighted head on every forward) and
    `gather` (every process's embeddings for the contrastive loss; None: this process's batch only)."""

    lockstep: bool = False
    gather: EmbeddingGather | None = None


class Lockstep:
    def __init__(self, model: nn.Module, enabled: bool):
        self.enabled = enabled
        self._model = model
        self._kept: list[torch.Tensor] = []

    def placeholder(self, modality: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One short, valid input row for the tower of `modality`, as its kind of input makes it (two tokens, a
        blank image, half a second of silence): (values, attention mask or None)."""
        return self._model.tower_inputs[modality].placeholder(self._model.device, self._model.dtype)

    @contextlib.contextmanager
    def idle_work(self, idle: bool = True) -> Iterator[None]:
        """Around placeholder work (when `idle`): torch's and numpy's random state are left as they were found."""
        if not idle:
            yield
            return
        device = self._model.device
        numpy_state = np.random.get_state()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
        np.random.set_state(numpy_state)

    def idle(self, run: Callable[[], torch.Tensor]) -> None:
        """In lockstep: `run()` (the module call an objective with nothing to score would have made, on one row)
        as placeholder work, its output kept for `tie`. Otherwise nothing."""
        if self.enabled:
            with self.idle_work():
                self.keep(run())

    def keep(self, output: torch.Tensor) -> None:
        """In lockstep: `output` takes part in the backward (via `tie`) even when no loss reads it."""
        if self.enabled:
            self._kept.append(output)

    def tie(self, loss: torch.Tensor) -> torch.Tensor:
        for output in self._kept:
            loss = loss + 0.0 * output.float().sum()
        return loss


__all__ = ["Launch", "Lockstep"]
