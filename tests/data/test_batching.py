"""Length bucketing: padding efficiency against the naive batcher on the demo corpus and on a long-tail mix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zidong import ZidongConfig, ZidongProcessor
from zidong.data.batching import PaddingMeter, cut_into_batches, long_tail_lengths, padding_efficiency
from zidong.data.stream import StreamLoader, StreamSettings
from zidong.data.transforms import SamplePipeline

BATCH = 32


def test_bucketing_keeps_every_sample_once_in_full_batches() -> None:
    lengths = long_tail_lengths(BATCH * 16)
    items = list(enumerate(lengths))
    for bucketing in (False, True):
        batches = cut_into_batches(items, BATCH, bucketing=bucketing, rng=np.random.default_rng(0))
        assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
        assert all(len(batch) == BATCH for batch in batches)


def test_padding_efficiency_counts_real_over_computed_positions() -> None:
    # one batch of two: speech 100 and 50 frames padded to 100 (150 of 200), text 3 tokens and one without text
    lengths = [(1.0, 3.0), (0.5, -1.0)]
    efficiency = padding_efficiency(lengths, batch_size=2, bucket_pool=1)
    assert efficiency["naive"] == {"text": 1.0, "speech": 0.75}
    assert efficiency["bucketed"] == efficiency["naive"]  # one batch: nothing to reorder


def test_long_tail_bucketing_is_at_least_90_percent_efficient() -> None:
    efficiency = padding_efficiency(long_tail_lengths(BATCH * 128 * 6), BATCH)
    print(f"long tail padding efficiency: {efficiency}")
    assert efficiency["naive"]["speech"] < 0.5
    assert efficiency["naive"]["text"] < 0.5
    assert efficiency["bucketed"]["speech"] >= 0.90
    assert efficiency["bucketed"]["text"] >= 0.90


@pytest.fixture(scope="module")
def demo_pipeline(demo_corpus: Path) -> tuple[Path, SamplePipeline]:
    """The default demo corpus (2400 samples) and the tokenizer it ships."""
    processor = ZidongProcessor.for_model(ZidongConfig.from_preset("tiny"), demo_corpus / "tokenizer")
    return demo_corpus / "train", SamplePipeline(processor, train=True)


def test_demo_corpus_bucketing_is_at_least_90_percent_efficient(demo_pipeline: tuple[Path, SamplePipeline]) -> None:
    folder, pipeline = demo_pipeline
    efficiency = {}
    for name, pool in (("naive", 0), ("bucketed", 128)):
        loader = StreamLoader([(folder, 1.0)], StreamSettings(batch_size=BATCH, bucket_pool=pool), pipeline)
        meter = PaddingMeter()
        for _, batch in zip(range(2 * 2160 // BATCH), loader, strict=False):  # two epochs
            meter.add(batch)
        efficiency[name] = meter.efficiency()
    print(f"demo corpus padding efficiency: {efficiency}")
    assert efficiency["naive"]["speech"] < 0.6
    assert efficiency["naive"]["text"] < 0.6
    assert efficiency["bucketed"]["speech"] >= 0.90
    assert efficiency["bucketed"]["text"] >= 0.90
