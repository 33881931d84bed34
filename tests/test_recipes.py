"""Every shipped recipe loads and validates against its schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from zidong.config import load_config
from zidong.train.recipe import PretrainRecipe

PRETRAIN_RECIPES = sorted((REPO_ROOT / "recipes" / "pretrain").glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    assert [path.name for path in PRETRAIN_RECIPES] >= ["tiny.yaml"]


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
