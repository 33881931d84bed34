"""Run records: resolved config, versions (every installed one, against the lock), git commit and command line
written into output_dir."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from zidong.config import load_config
from zidong.train.recipe import PretrainRecipe
from zidong.utils.run_info import environment, git_state, lock_state, record_run


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


def pip_freeze() -> dict[str, str]:
    """pip's own account of the environment: `pip freeze --all` (the editable zidong left out)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pairs = (line.split("==") for line in listed.splitlines() if "==" in line)
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pairs}


def test_the_record_holds_every_installed_version_as_pip_lists_them(tmp_path: Path, recipe: PretrainRecipe) -> None:
    record_run(tmp_path, recipe, ["zidong", "pretrain", "a.yaml"])
    launch = json.loads((tmp_path / "launches.jsonl").read_text())
    assert launch["environment"] == pip_freeze()
    assert launch["lock"]["file"] == str(REPO_ROOT / "constraints.txt")


def test_the_lock_state_names_what_differs_from_the_lock(tmp_path: Path) -> None:
    installed = {"numpy": "2.0.0", "pyyaml": "6.0.2", "peft": "0.18.0"}
    lock = tmp_path / "constraints.txt"
    lock.write_text("# a comment\nnumpy==2.0.0\nPyYAML==6.0.1\nnvidia-nccl-cu12==2.27.3  # not on this platform\n")
    assert lock_state(installed, lock) == {
        "file": str(lock),
        "matches": False,
        "differs": {"pyyaml": {"locked": "6.0.1", "installed": "6.0.2"}},
        "not_locked": ["peft"],
    }
    lock.write_text("numpy==2.0.0\npyyaml==6.0.2\n")
    assert lock_state(installed, lock)["matches"]
    assert lock_state(installed, tmp_path / "absent.txt") is None  # zidong installed from a wheel: no lock


def test_make_install_installs_the_lock() -> None:
    if Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve():
        pytest.skip("not the environment `make install` built for this checkout")
    state = lock_state(environment())
    assert state["matches"], state["differs"]
