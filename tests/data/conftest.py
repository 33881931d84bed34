"""Fixtures shared by the data tests."""

from __future__ import annotations

import numpy as np
import pytest

from tests.data.corpus import caption_of
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
