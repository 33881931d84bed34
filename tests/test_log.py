"""Rank-0-only logging and progress bars."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
from zidong.utils.log import get_logger, progress
get_logger(__name__).info("hello from the logger")
for _ in progress(range(3), desc="stepping"):
    pass
"""


@pytest.mark.parametrize(("rank", "expect_output"), [("0", True), ("1", False)])
def test_only_rank_zero_prints(rank: str, expect_output: bool) -> None:
    env = {"RANK": rank, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    assert ("hello from the logger" in result.stderr) is expect_output
    assert ("stepping: 100%" in result.stderr) is expect_output
    assert result.stdout == ""


def test_progress_can_be_hidden_on_rank_zero() -> None:
    env = {"RANK": "0", "ZIDONG_PROGRESS": "0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    assert "hello from the logger" in result.stderr
    assert "stepping" not in result.stderr


def test_log_level_from_environment() -> None:
    env = {"ZIDONG_LOG_LEVEL": "warning", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    assert "hello from the logger" not in result.stderr
