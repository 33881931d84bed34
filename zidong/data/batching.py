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
                self.computed[modality] += math.prod(mask.shape)

    def efficiency(self) -> dict[str, float]:
        """real ÷ computed per modality (1.0 for a modality never seen)."""
        return {m: self.real[m] / self.computed[m] if self.computed[m] else 1.0 for m in self.MASKS}


def padding_efficiency(
    lengths: Sequence[tuple[float, float]], batch_size: int, bucket_pool: int = 128, seed: int = 0
) -> dict[str, dict[str, float]]:
    """What bucketing buys on a corpus with these lengths: padding efficiency per modality ("speech", "text") of
    naive and of bucketed batches, cut pool by pool as the stream cuts them. `lengths`: (speech seconds, text
    tokens) per sample, -1 where the sample lacks it; speech counts in 10 ms filterbank frames."""
    rng = np.random.default_rng(seed)
    meters = {"naive": PaddingMeter(), "bucketed": PaddingMeter()}
    pool = batch_size * bucket_pool
    for start in range(0, len(lengths), pool):
        items = [(i, lengths[i]) for i in range(start, min(start + pool, len(lengths)))]
        for name, meter in meters.items():
            for batch in cut_into_batches(items, batch_size, bucketing=name == "bucketed", rng=rng):
                meter.add(_masks([lengths[i] for i in batch]))
    return {name: meter.efficiency() for name, meter in meters.items()}


def long_tail_lengths(count: int, seed: int = 0) -> list[tuple[float, float]]:
    """A reference long-tailed mix, to judge bucketing without a corpus: (speech seconds, text tokens), -1 where
    absent; half triplets, image-text with Pareto-tailed captions, speech-text, image-speech; speech log-normal
    around 4 s up to 30 s, spoken captions 2.5-4.5 tokens/s."""
    rng = np.random.default_rng(seed)
    lengths = []
    for kind in rng.choice(4, size=count, p=[0.5, 0.2, 0.2, 0.1]):
        seconds = min(30.0, rng.lognormal(math.log(4), 0.8))
        tokens = min(64, max(3, int(seconds * rng.uniform(2.5, 4.5)) + 2))
        if kind == 1:
            lengths.append((-1.0, float(min(64, 3 + int(rng.pareto(1.5) * 8)))))
        else:
            lengths.append((seconds, float(tokens) if kind != 3 else -1.0))
    return lengths


def _masks(batch: list[tuple[float, float]]) -> dict[str, np.ndarray]:
    """The padding masks a collated batch of these lengths would carry."""
    masks = {}
    for column, key, unit in ((0, "speech_attention_mask", 100), (1, "text_attention_mask", 1)):
        sizes = [round(lengths[column] * unit) for lengths in batch if lengths[column] >= 0]
        if sizes:
            masks[key] = np.arange(max(sizes))[None, :] < np.array(sizes)[:, None]
    return masks
