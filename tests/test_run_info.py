"""Run records: resolved config, versions, git commit and command line written into output_dir."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from zidong.config import load_config
from zidong.train.recipe import PretrainRecipe
from zidong.utils.run_info import git_state, record_run


@pytest.fixture
def recipe() -> PretrainRecipe:
    return load_config(PretrainRecipe, REPO_ROOT / "recipes" / "pretrain" / "tiny.yaml")


def test_record_writes_config_and_appends_launches(tmp_path: Path, recipe: PretrainRecipe) -> None:
    record_run(tmp_path, recipe, ["zidong", "pretrain", "a.yaml"])
    record_run(tmp_path, recipe, ["zidong", "pretrain", "a.yaml", "train.max_steps=2"])
    assert load_config(PretrainRecipe, tmp_path / "config.yaml") == recipe
    launches = [json.loads(line) for line in (tmp_path / "launches.jsonl").read_text().splitlines()]
    assert [launch["command"] for launch in launches] == [
        "zidong pretrain a.yaml",
        "zidong pretrain a.yaml train.max_steps=2",
    ]
    assert launches[0]["python"] == platform.python_version()
    assert launches[0]["config"]["output_dir"] == recipe.output_dir
    assert set(launches[0]["packages"]) >= {"torch", "torchaudio", "transformers", "accelerate", "deepspeed"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_git_state_reports_the_checkout(tmp_path: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("zidong is not running from a git checkout with commits")
    assert git_state()["commit"] == head.stdout.strip()
    assert git_state(tmp_path) is None  # not a checkout


def test_only_rank_zero_records(tmp_path: Path, recipe: PretrainRecipe, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    record_run(tmp_path / "run", recipe)
    assert not (tmp_path / "run").exists()
