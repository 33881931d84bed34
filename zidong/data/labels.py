"""Label files for zero-shot classification (`zidong eval --labels FILE`).

    # recipes/labels/demo-shape.yaml
    field: labels.shape          # where each sample's true class sits in its manifest record (dotted path)
    classes:                     # class -> text prompts; a class's embedding is the mean of its prompts'
      circle: ["a circle", "圆形"]
      square: ["a square", "正方形"]

Manifest fields other than id/lang/text/image/audio travel with each sample (`zidong data build`), so a manifest
line `{"id": ..., "image": ..., "labels": {"shape": "circle"}}` gives `labels.shape` = `circle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zidong.errors import UserError


@dataclass(frozen=True)
class LabelSet:
    field: str
    classes: dict[str, list[str]]

    def label_of(self, meta: dict[str, Any]) -> str | None:
        """The sample's class from its shard metadata (None when it has none, or one not in `classes`)."""
        value: Any = meta.get("extra", {})
        for part in self.field.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        value = str(value)
        return value if value in self.classes else None


def load_labels(path: str | Path) -> LabelSet:
    """Parse and check a label file; UserError naming the file and the problem."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"--labels {path}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise UserError(f"--labels {path}: not valid YAML ({err})") from None
    if not isinstance(document, dict) or set(document) != {"field", "classes"}:
        raise UserError(f"--labels {path}: expected exactly the keys `field` and `classes` (see docs/evaluation.md)")
    field, classes = document["field"], document["classes"]
    if not isinstance(field, str) or not field.strip():
        raise UserError(f"--labels {path}: `field` must be a dotted path such as labels.shape, got {field!r}")
    if not isinstance(classes, dict) or len(classes) < 2:
        raise UserError(f"--labels {path}: `classes` must map at least two class names to prompts")
    parsed: dict[str, list[str]] = {}
    for name, prompts in classes.items():
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise UserError(f"--labels {path}: class {name!r} needs one or more non-empty text prompts")
        parsed[str(name)] = prompts
    return LabelSet(field=field, classes=parsed)
