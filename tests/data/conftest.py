"""Fixtures shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.data.corpus import caption_of
from tests.data.fixtures import write_manifest
from tests.data.samples import read_shards, write_samples
from tests.helpers import run_cli
from zidong import ZidongConfig, ZidongProcessor
from zidong.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def processor(tmp_path_factory: pytest.TempPathFactory) -> ZidongProcessor:
    """The tiny preset's processor with a 400-piece tokenizer trained on captions like the test corpus's."""
    folder = tmp_path_factory.mktemp("tokenizer")
    rng = np.random.default_rng(0)
    (folder / "text.txt").write_text("\n".join(caption_of("s", n, rng) for n in range(3000)) + "\n")
    train_tokenizer([folder / "text.txt"], 400, folder / "tokenizer")
    return ZidongProcessor.for_model(ZidongConfig.from_preset("tiny"), folder / "tokenizer")


@pytest.fixture(scope="module")
def media_samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The 48 samples (tests/data/samples.py) as media files, and their records."""
    folder = tmp_path_factory.mktemp("sources")
    return folder, write_samples(folder / "media")


@pytest.fixture(scope="module")
def from_jsonl(media_samples: tuple[Path, list[dict]]) -> dict[str, dict]:
    """The shards `zidong data build` makes of them from a JSONL manifest: what every other source must give."""
    folder, samples = media_samples
    manifest = write_manifest(folder / "manifest.jsonl", samples)
    result = run_cli("data", "build", str(manifest), "--out", str(folder / "jsonl"), "shard_size=16")
    assert result.returncode == 0, result.stderr
    return read_shards(folder / "jsonl")
