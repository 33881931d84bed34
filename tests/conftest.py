"""Test session set-up: no hub access, GPU tests skipped where no CUDA device is present, one demo corpus, and the
order and thread count that let two pytest-xdist workers share a 2-core machine (`make test` runs `-n 2`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

from tests.helpers import REPO_ROOT

os.environ["HF_HUB_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per worker (set before torch loads, and inherited by every run a test starts): each worker keeps
    # one core busy; two threads each would make the workers take turns on both cores
    os.environ["OMP_NUM_THREADS"] = "1"

# The longest files start first, longest first (seconds per file in a clean-clone CI run, 2026-12-07): a worker
# that draws a long file last runs it alone while the other one idles. The main job's file (the recipe cut to 300
# steps and two fine-tunes from it) is the longest, then the parity files (each builds its own reference run).
FIRST = (
    "tests/test_main_job.py",  # 370 s
    "tests/train/test_parity.py",  # 450 s, its reference run included
    "tests/train/test_pretrain.py",  # 380 s
    "tests/train/test_parity_training.py",  # 330 s
    "tests/test_bench.py",  # 180 s
    "tests/train/test_dead_rank.py",  # 170 s
)


@pytest.fixture(scope="session")
def demo_corpus() -> Path:
    """The repository's demo corpus (data/demo), built on first use exactly as the main job builds it, so the
    tests that need the full corpus and the main job share one build."""
    from zidong.data.demo import ensure_demo

    folder = REPO_ROOT / "data" / "demo"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(folder.parent / ".demo.lock"):  # the other worker may be building it now
        ensure_demo(folder)
    return folder


@pytest.fixture(scope="module")
def pretrain_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """48 training samples (one epoch = 6 steps of 8), 12 held-out triplets and a tokenizer (tests/pretrain_run.py)."""
    from tests.pretrain_run import build_pretrain_corpus  # not at the top: torch must load after the thread setting

    return build_pretrain_corpus(tmp_path_factory.mktemp("pretrain"))


@pytest.fixture(scope="module")
def trained_run(pretrain_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of a 2-step `zidong pretrain` of the tiny model on `pretrain_corpus` (export, eval)."""
    from tests.helpers import run_cli
    from tests.pretrain_run import write_recipe

    folder = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(folder, pretrain_corpus, train={"max_steps": 2}, data={"num_workers": 0})
    result = run_cli("pretrain", str(recipe), env={"ZIDONG_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr
    return folder / "run"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        return next((n for n, prefix in enumerate(FIRST) if item.nodeid.startswith(prefix)), len(FIRST))

    items.sort(key=rank)  # stable: the rest keep their order
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)
