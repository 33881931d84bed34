"""Fixtures of the parity runs (tests/train/parity_runs.py): built once per test file that uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.data.corpus import TEXT_COMBINATIONS, caption_of, make_corpus
from tests.train import parity
from tests.train.parity_runs import PRETRAIN, pretrain_recipe
from zidong.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 samples of triplets and pairs (10 steps of 8 cross an epoch boundary), 9 held-out triplets (an odd
    count: the processes' evaluation blocks differ in size), a tokenizer, a label file."""
    root = tmp_path_factory.mktemp("parity-corpus")
    rng = np.random.default_rng(0)
    (root / "text.txt").write_text("\n".join(caption_of("s", n, rng) for n in range(3000)) + "\n")
    (root / "labels.yaml").write_text("field: labels.parity\nclasses: {even: [even], odd: [odd]}\n")
    return {
        "train": make_corpus(root / "train", 40, combinations=TEXT_COMBINATIONS),
        "eval": make_corpus(root / "eval", 9, seed=1, combinations=(("text", "vision", "speech"),)),
        "tokenizer": train_tokenizer([root / "text.txt"], 400, root / "tokenizer"),
        "labels": root / "labels.yaml",
    }


@pytest.fixture(scope="module")
def one_process(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process taking the whole global batch."""
    folder = tmp_path_factory.mktemp("one-process")
    parity.launch("single", 1, PRETRAIN, pretrain_recipe(folder, corpus, 1))
    return folder / "run"
