"""The parity runs' shared set-up: the corpus, the recipes, and the one-process reference every comparison in
tests/train/test_parity*.py is against (tests/train/parity.py is the harness that launches and compares them)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.train import parity

STEPS = 10
GLOBAL_BATCH = 8
PRETRAIN = ["pretrain"]
CLASSIFY = ["finetune", "classify"]
FSDP = {"strategy": "fsdp"}


def pretrain_recipe(
    folder: Path, corpus: dict[str, Path], processes: int, evaluate: bool = False, parallel: dict | None = None, **train
) -> Path:
    recipe = {
        "output_dir": str(folder / "run"),
        "seed": 5,
        "model": {
            "preset": "tiny",
            "tokenizer": str(corpus["tokenizer"]),
            "config": {"logit_scale_max": parity.TEMPERATURE_CAP},  # reached at step 4: the clamp takes part
        },
        "data": {
            "train": [{"path": str(corpus["train"])}],
            "eval": str(corpus["eval"]) if evaluate else None,
            "num_workers": 0,
        },
        "train": {
            "max_steps": STEPS,
            "batch_size": GLOBAL_BATCH // processes,
            "learning_rate": 1e-3,
            "warmup_steps": 3,
            "log_every": 1,
            **train,
        },
        "checkpoint": {"every_steps": 4, "keep_last": 1},
        "loss": {"contrastive": {"weight": 1.0}, **{name: {"weight": 0.0} for name in parity.LEFT_OUT}},
        "parallel": parallel or {},
    }
    return parity.write_recipe(folder / "recipe.yaml", recipe)


def probe_recipe(folder: Path, corpus: dict[str, Path], source: Path, processes: int, **train) -> Path:
    """A linear probe of the text tower (frozen), classifying even/odd sample numbers. Every sample has text and
    a label: the classifier's loss is a mean over each micro-batch's labelled rows, which equals the global mean
    only when every micro-batch has as many of them (docs/training.md)."""
    recipe = {
        "output_dir": str(folder / "run"),
        "seed": 5,
        "finetune": {"source": str(source), "modalities": ["text"], "labels": str(corpus["labels"])},
        "model": {"text": {"frozen_steps": -1}},
        "data": {"train": [{"path": str(corpus["train"])}], "num_workers": 0},
        "train": {
            "max_steps": STEPS,
            "batch_size": GLOBAL_BATCH // processes,
            "learning_rate": 1e-2,
            "warmup_steps": 3,
            "log_every": 1,
            **train,
        },
        "checkpoint": {"every_steps": STEPS // 2, "keep_last": 2},
    }
    return parity.write_recipe(folder / "recipe.yaml", recipe)


def lora_recipe(folder: Path, corpus: dict[str, Path], source: Path, processes: int, **train) -> Path:
    """The probe's task with LoRA (rank 4) on the text tower instead of freezing it: the adapters and the head
    train, nothing else."""
    recipe = yaml.safe_load(probe_recipe(folder, corpus, source, processes, **train).read_text())
    del recipe["model"]
    recipe["finetune"]["lora"] = {"rank": 4, "alpha": 8}
    return parity.write_recipe(folder / "recipe.yaml", recipe)
