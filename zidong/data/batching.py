"""Length bucketing for fixed-size batches, and the padding-efficiency meter that judges it.

Contrastive training wants a fixed number of samples per batch (that is the number of negatives), so zidong
buckets by length instead of budgeting tokens: the stream draws a pool of `bucket_pool` batches' worth of
samples, splits it into batches that are tight in speech duration and caption tokens at once (a k-d split, see
`_split`) and emits them in a shuffled order. Lengths come from each sample's metadata and caption, so a pool
is formed without decoding any image or audio.

Padding efficiency is real ÷ computed positions, per modality: a tower runs only on the rows that have its
modality, each padded to the longest row of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

Ref = TypeVar("Ref")


def cut_into_batches(
    pool: Sequence[tuple[Ref, tuple[float, ...]]], batch_size: int, bucketing: bool, rng: np.random.Generator
) -> list[list[Ref]]:
    """Split a pool of (ref, lengths) into batches of `batch_size` (the last may be short).

    `lengths` holds one length per modality, negative where the sample lacks it. With `bucketing`, batches
    hold samples of similar lengths in every modality and come out in random order; without, they hold
    consecutive samples of the pool in stream order (the naive batcher).
    """
    if not bucketing:
        return [[ref for ref, _ in pool[start : start + batch_size]] for start in range(0, len(pool), batch_size)]
    batches = [[ref for ref, _ in batch] for batch in _split(list(pool), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _split(items: list[tuple[Ref, tuple[float, ...]]], batch_size: int) -> list[list[tuple[Ref, tuple[float, ...]]]]:
    """k-d split: sort along the modality whose lengths spread most (relative to the longest), cut at the
    batch boundary nearest the middle, recurse until each part is one batch. Each modality pads a batch to
    its own longest row, so a batch is cheap when it is tight in every modality at once; a single sort by
    one length leaves the others spread (spoken captions in two languages: similar audio, 5 vs 30 tokens)."""
    if len(items) <= batch_size:
        return [items]
    axis = max(range(len(items[0][1])), key=lambda a: _relative_spread([lengths[a] for _, lengths in items]))
    items.sort(key=lambda item: item[1][axis])
    middle = batch_size * math.ceil(len(items) / batch_size / 2)
    return _split(items[:middle], batch_size) + _split(items[middle:], batch_size)


def _relative_spread(values: list[float]) -> float:
    present = [value for value in values if value >= 0]
    return (max(present) - min(present)) / max(present) if present and max(present) > 0 else 0.0


class PaddingMeter:
    """Accumulates real and computed positions of text tokens and speech samples over collated batches."""

    MASKS: ClassVar[dict[str, str]] = {"text": "text_attention_mask", "speech": "speech_attention_mask"}

    def __init__(self) -> None:
        self.real = dict.fromkeys(self.MASKS, 0)
        self.computed = dict.fromkeys(self.MASKS, 0)

    def add(self, batch: Mapping[str, Any]) -> None:
        for modality, key in self.MASKS.items():
            if key in batch:
                mask = batch[key]
                self.real[modality] += int(mask.sum())
                self.computed[modality] += int(mask.numel())

    def efficiency(self) -> dict[str, float]:
        """real ÷ computed per modality (1.0 for a modality never seen)."""
        return {m: self.real[m] / self.computed[m] if self.computed[m] else 1.0 for m in self.MASKS}
