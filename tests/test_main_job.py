"""The README's main job: the tiny recipe, end to end on the demo corpus, reaches retrieval far above chance."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli

TINY = "recipes/pretrain/tiny.yaml"


def test_tiny_recipe_retrieves_far_above_chance(tmp_path: Path) -> None:
    result = run_cli("pretrain", TINY, f"output_dir={tmp_path / 'run'}", env={"ZIDONG_PROGRESS": "0"}, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out retrieval after" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    chance_at_1, chance_at_10 = 1 / final["samples"], 10 / final["samples"]
    pairs = sorted({key.split("/")[0] for key in final if key.endswith("/R@1")})
    assert len(pairs) == 6  # every pair, both directions
    for pair in pairs:
        assert final[f"{pair}/R@1"] >= 5 * chance_at_1, f"{pair}: {final[f'{pair}/R@1']:.3f}"
        assert final[f"{pair}/R@10"] >= 3 * chance_at_10, f"{pair}: {final[f'{pair}/R@10']:.3f}"
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["contrastive"] < 0.8 * train[0]["contrastive"]
