"""Test session set-up: no hub access, GPU tests skipped where no CUDA device is present, one demo corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def demo_corpus() -> Path:
    """The repository's demo corpus (data/demo), built on first use exactly as the main job builds it, so the
    tests that need the full corpus and the main job share one build."""
    from zidong.data.demo import make_demo

    folder = REPO_ROOT / "data" / "demo"
    if not (folder / "tokenizer" / "tokenizer.json").is_file():
        make_demo(folder)
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)
