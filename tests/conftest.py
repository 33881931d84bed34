"""Test session set-up: no hub access, GPU tests skipped where no CUDA device is present, one demo corpus, and the
main job started at the beginning of the session so that it trains while the other tests run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, BackgroundCli

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


MAIN_JOB_RECIPE = "recipes/pretrain/tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def main_job_process(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The README's main job (`zidong pretrain` of the tiny recipe on data/demo), started in the background at the
    first test when a selected test needs it (tests/test_main_job.py), so its minutes of training overlap the
    rest of the suite. Yields (the run folder, the process); None when no selected test needs it."""
    if not any("main_job" in item.fixturenames for item in request.session.items):
        yield None
        return
    request.getfixturevalue("demo_corpus")  # built first: the run would otherwise build it while others read it
    folder = tmp_path_factory.mktemp("main")
    job = BackgroundCli(
        "pretrain", MAIN_JOB_RECIPE, f"output_dir={folder / 'run'}", folder=folder, env={"ZIDONG_PROGRESS": "0"}
    )
    yield folder / "run", job
    job.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)
