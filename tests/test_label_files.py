"""Every shipped label file parses and names its launch command."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT
from zidong.data.demo import COLORS, SHAPES
from zidong.data.labels import load_labels

LABEL_FILES = sorted((REPO_ROOT / "recipes" / "labels").glob("*.yaml"))


@pytest.mark.parametrize("path", LABEL_FILES, ids=lambda path: path.name)
def test_label_file_parses_and_covers_the_demo_classes(path: Path) -> None:
    labels = load_labels(path)
    expected = {"labels.shape": set(SHAPES), "labels.color": set(COLORS)}[labels.field]
    assert set(labels.classes) == expected
    assert f"--labels {path.relative_to(REPO_ROOT).as_posix()}" in path.read_text()
