"""Every shipped recipe loads and validates against its schema."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from zidong.config import load_config
from zidong.train.recipe import FinetuneRecipe, PretrainRecipe

PRETRAIN_RECIPES = sorted((REPO_ROOT / "recipes" / "pretrain").glob("*.yaml"))
FINETUNE_RECIPES = sorted((REPO_ROOT / "recipes" / "finetune").glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    assert [path.name for path in PRETRAIN_RECIPES] == ["base.yaml", "large.yaml", "tiny.yaml"]


@pytest.mark.parametrize("path", PRETRAIN_RECIPES, ids=lambda path: path.name)
def test_pretrain_recipe_validates(path: Path) -> None:
    recipe = load_config(PretrainRecipe, path)
    assert recipe.train.max_steps >= 1
    assert recipe.data.train


@pytest.mark.parametrize("path", PRETRAIN_RECIPES, ids=lambda path: path.name)
def test_recipe_header_gives_its_launch_command(path: Path) -> None:
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    relative = path.relative_to(REPO_ROOT).as_posix()
    assert any(f"zidong pretrain {relative}" in line for line in header)


def test_dry_run_sizes_the_large_recipe_without_allocating_it() -> None:
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child of a big pytest process would report the parent's
    script = (
        "import re, sys\n"
        "from zidong.cli import main\n"
        "code = main(['pretrain', 'recipes/pretrain/large.yaml', '--dry-run', '--gpus', '32'])\n"
        "status = open('/proc/self/status').read()\n"
        "print('peak_rss_kb', re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    total = int(re.search(r"^total\s+([\d,]+)", result.stdout, re.MULTILINE).group(1).replace(",", ""))
    assert 0.9e9 < total < 1.3e9  # "about 1B parameters"
    for name in ("text", "vision", "speech", "fusion"):
        assert re.search(rf"^{name}\s+[\d,]+$", result.stdout, re.MULTILINE)
    assert re.search(r"training FLOPs per sample: \d\.\d+e\+1\d", result.stdout)
    assert "ZeRO-3:" in result.stdout
    peak_gib = int(re.search(r"peak_rss_kb (\d+)", result.stdout).group(1)) / 2**20
    assert peak_gib < 2.0  # the fp32 weights alone would take 4.3 GiB


@pytest.mark.parametrize("path", FINETUNE_RECIPES, ids=lambda path: path.name)
def test_finetune_recipe_validates_and_gives_its_launch_command(path: Path) -> None:
    recipe = load_config(FinetuneRecipe, path)
    task = "classify" if recipe.finetune.labels else "retrieval"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"zidong finetune {task} {path.relative_to(REPO_ROOT).as_posix()}" in line for line in header)
    assert len(FINETUNE_RECIPES) == 3
