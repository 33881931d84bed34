"""Length bucketing: padding efficiency against the naive batcher on the demo corpus and on a long-tail mix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from zidong import ZidongConfig, ZidongProcessor
from zidong.data.batching import PaddingMeter, cut_into_batches
from zidong.data.demo import make_demo
from zidong.data.stream import StreamLoader, StreamSettings
from zidong.data.tokenizer import train_tokenizer
from zidong.data.transforms import SamplePipeline

BATCH = 32


def long_tail_lengths(count: int, seed: int = 0) -> list[tuple[float, float]]:
    """(speech seconds, text tokens), -1 where absent: half triplets, image-text with Pareto-tailed captions,
    speech-text, image-speech; speech log-normal around 4 s up to 30 s, spoken captions 2.5-4.5 tokens/s."""
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


def as_masks(batch: list[tuple[float, float]]) -> dict[str, torch.Tensor]:
    """The padding masks a collated batch of these lengths would carry (speech in 10 ms frames)."""
    masks = {}
    for column, key, unit in ((0, "speech_attention_mask", 100), (1, "text_attention_mask", 1)):
        sizes = [round(lengths[column] * unit) for lengths in batch if lengths[column] >= 0]
        if sizes:
            masks[key] = torch.arange(max(sizes))[None, :] < torch.tensor(sizes)[:, None]
    return masks


def test_long_tail_bucketing_is_at_least_90_percent_efficient() -> None:
    lengths = long_tail_lengths(BATCH * 128 * 6)
    rng = np.random.default_rng(0)
    meters = {"naive": PaddingMeter(), "bucketed": PaddingMeter()}
    pool = BATCH * 128
    for start in range(0, len(lengths), pool):
        items = [(i, lengths[i]) for i in range(start, start + pool)]
        for name, meter in meters.items():
            batches = cut_into_batches(items, BATCH, bucketing=name == "bucketed", rng=rng)
            assert sorted(i for batch in batches for i in batch) == list(range(start, start + pool))
            assert all(len(batch) == BATCH for batch in batches)
            for batch in batches:
                meter.add(as_masks([lengths[i] for i in batch]))
    naive, bucketed = meters["naive"].efficiency(), meters["bucketed"].efficiency()
    print(f"long tail padding efficiency: naive {naive}, bucketed {bucketed}")
    assert naive["speech"] < 0.5
    assert naive["text"] < 0.5
    assert bucketed["speech"] >= 0.90
    assert bucketed["text"] >= 0.90


@pytest.fixture(scope="module")
def demo_pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SamplePipeline]:
    """The default demo corpus (2400 samples) and a tokenizer trained on it."""
    out = tmp_path_factory.mktemp("demo")
    make_demo(out)
    train_tokenizer([out / "train"], 500, out / "tokenizer")
    processor = ZidongProcessor.for_model(ZidongConfig.from_preset("tiny"), out / "tokenizer")
    return out / "train", SamplePipeline(processor, train=True)


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
