"""`python -m benchmarks.gpu_check` on a machine without a GPU: its arguments, and `--dry-run`, which checks the plan's
inputs (the accelerate configs, the base recipe with the check's overrides, the dry-run memory estimate it will
compare against) and prints every launch. The check itself needs a CUDA device (docs/PERFORMANCE.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "benchmarks.gpu_check", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_dry_run_prints_every_launch_with_checked_inputs(tmp_path: Path) -> None:
    done = gpu_check("--dry-run", "--out", str(tmp_path / "check"))
    assert done.returncode == 0, done.stderr
    for config in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        assert f"recipes/accelerate/{config} --num_processes 1 -m zidong pretrain" in done.stdout
    assert "parallel.strategy=fsdp parallel.param_dtype=bf16" in done.stdout
    assert "parallel.strategy=hsdp parallel.shard_size=1" in done.stdout
    assert "train.mixed_precision=fp16" in done.stdout
    assert "dry-run model state of 6.40 GiB" in done.stdout  # the base preset's 429M parameters, 16 bytes each
    assert not (tmp_path / "check").exists()  # nothing run, nothing written


def test_only_picks_checks_and_unknown_ones_exit_2(tmp_path: Path) -> None:
    done = gpu_check("--dry-run", "--only", "fp16", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "- fp16" in done.stdout
    assert "- trainers" not in done.stdout
    done = gpu_check("--only", "steps,warp", "--dry-run")
    assert done.returncode == 2
    assert (
        "expected comma-separated checks from steps, syncs, frontend, trainers, fp16, got 'steps,warp'" in done.stderr
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path: Path) -> None:
    done = gpu_check("--only", "syncs", "--out", str(tmp_path / "check"))
    assert done.returncode == 2
    assert "no CUDA device here; --dry-run shows the plan" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "check").exists()
