"""A small pretraining run for tests: its corpus, its recipe, and what the tests read back (the `pretrain_corpus`
fixture of tests/conftest.py builds the corpus once per module)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from tests.data.corpus import TEXT_COMBINATIONS, caption_of, make_corpus
from zidong.config import load_config
from zidong.data.tokenizer import train_tokenizer
from zidong.train.recipe import PretrainRecipe

STEPS = 6
TORCHRUN_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "ZIDONG_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def build_pretrain_corpus(root: Path) -> dict[str, Path]:
    """48 training samples (one epoch = 6 steps of 8), 12 held-out triplets and a tokenizer."""
    rng = np.random.default_rng(0)
    (root / "text.txt").write_text("\n".join(caption_of("s", n, rng) for n in range(3000)) + "\n")
    return {
        "train": make_corpus(root / "train", 48, combinations=TEXT_COMBINATIONS),
        "eval": make_corpus(root / "eval", 12, seed=1, combinations=(("text", "vision", "speech"),)),
        "tokenizer": train_tokenizer([root / "text.txt"], 400, root / "tokenizer"),
    }


def write_recipe(folder: Path, pretrain_corpus: dict[str, Path], **changes) -> Path:
    recipe = {
        "output_dir": str(folder / "run"),
        "seed": 3,
        "model": {"preset": "tiny", "tokenizer": str(pretrain_corpus["tokenizer"])},
        "data": {
            "train": [{"path": str(pretrain_corpus["train"]), "weight": 1.0}],
            "eval": str(pretrain_corpus["eval"]),
            "num_workers": 2,
            "ledger": True,
        },
        "train": {"max_steps": STEPS, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 2, "log_every": 1},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
        "eval": {"every_steps": 0},
        "loss": {"contrastive": {"weight": 1.0}, "matching": {"weight": 0.5}, "masked_text": {"weight": 0.5}},
    }
    for key, value in changes.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(every)


def final_weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """The weights of the run's checkpoint of `step`."""
    return load_file(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors")


_BARE_RECIPE = "output_dir: unused\ndata: {train: [{path: unused}]}\ntrain: {learning_rate: 0.1}\n"


def recipe_with(*overrides: str) -> PretrainRecipe:
    """A pretraining recipe that names no real data, with `overrides` (for tests of what a recipe decides)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_text(_BARE_RECIPE)
        return load_config(PretrainRecipe, path, overrides)
