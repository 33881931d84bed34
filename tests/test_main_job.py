"""The README's main job (the tiny recipe, end to end on the demo corpus) reaches the retrieval measured for it;
then the shipped fine-tuning recipes start from it and beat its zero-shot numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli
from zidong.export.trained import load_trained
from zidong.models.zidong import ZidongForClassification

TINY = "recipes/pretrain/tiny.yaml"
QUIET = {"ZIDONG_PROGRESS": "0"}


def evaluations(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def main_job(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("main") / "run"  # the recipe reads the shared demo corpus, data/demo
    result = run_cli("pretrain", TINY, f"output_dir={run}", env=QUIET, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out retrieval after" in result.stderr
    return run


# duplicate-aware R@1 of the main job, measured on one thread (as here) on 2026-12-02 (docs/training.md); the run
# is bitwise reproducible on one machine, and another CPU's arithmetic has moved R@1 by up to 0.03 before
REACHED_DUP_R1 = {
    "speech->text": 0.946,
    "text->speech": 0.938,
    "speech->vision": 0.383,
    "vision->speech": 0.350,
    "text->vision": 0.471,
    "vision->text": 0.333,
}
MARGIN = 0.04


def test_tiny_recipe_reaches_its_measured_retrieval(main_job: Path) -> None:
    final = evaluations(main_job)[-1]
    assert final["samples"] == 240
    assert final["distinct_captions"] == 196
    for pair, reached in REACHED_DUP_R1.items():
        assert final[f"{pair}/dup_R@1"] >= reached - MARGIN, f"{pair}: {final[f'{pair}/dup_R@1']:.3f}"
        assert final[f"{pair}/R@10"] >= 20 * 10 / 240, pair  # 20x chance
    for pair in ("speech->text", "text->speech"):  # the targets in docs/training.md, met by these two
        assert final[f"{pair}/dup_R@1"] >= 0.9, pair
        assert final[f"{pair}/R@1"] >= 0.9 * final[f"{pair}/ceiling_R@1"], pair
    records = [json.loads(line) for line in (main_job / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["contrastive"] < 0.3 * train[0]["contrastive"]


def test_speech_colour_probe_beats_zero_shot(main_job: Path, tmp_path: Path) -> None:
    labels = "recipes/labels/demo-color.yaml"
    zero_shot = tmp_path / "zero-shot.json"
    result = run_cli("eval", str(main_job), "--data", "data/demo/eval", "--labels", labels, "--out", str(zero_shot))
    assert result.returncode == 0, result.stderr[-3000:]
    baseline = json.loads(zero_shot.read_text())
    run = tmp_path / "probe"
    result = run_cli(
        "finetune", "classify", "recipes/finetune/probe-color-speech.yaml",
        f"finetune.source={main_job}", f"output_dir={run}", env=QUIET, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final = evaluations(run)[-1]
    assert final["samples"] == 240
    # measured on 2026-12-02, one thread as here: 0.896 vs 0.779 (0.900 vs 0.779 with two threads; 0.833 vs 0.738
    # from the former 1200-step main job)
    assert final["accuracy"] >= baseline["classify/speech/accuracy"] + 0.05
    assert final["accuracy"] >= final["majority"] + 0.3
    model, _, _, _ = load_trained(run / "model")  # the HF folder the run ends with
    assert isinstance(model, ZidongForClassification)
    assert list(model.config.id2label.values()) == ["red", "green", "blue", "yellow", "purple"]


def test_text_vision_retrieval_finetune_improves_on_its_source(main_job: Path, tmp_path: Path) -> None:
    before = evaluations(main_job)[-1]
    run = tmp_path / "retrieval"
    result = run_cli(
        "finetune", "retrieval", "recipes/finetune/retrieval-text-vision.yaml",
        f"finetune.source={main_job}", f"output_dir={run}", env=QUIET, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    after = evaluations(run)[-1]
    assert sorted(key for key in after if key.endswith("/R@1")) == ["text->vision/R@1", "vision->text/R@1"]
    # measured from the 1500-step main job on 2026-12-02 (docs/finetune.md), one thread as here: R@1 0.367 -> 0.417
    # and 0.282 -> 0.353, dup@1 0.471 -> 0.521 and 0.333 -> 0.417, R@5 0.888 -> 0.883 and 0.824 -> 0.872; with two
    # threads R@1 0.354 -> 0.417 and 0.278 -> 0.335. This source's R@5 is already near its duplicate-aware
    # ceiling (dup@5 0.95 for text->vision), so the gain shows in R@1. R@1 moves by 0.004 per sample: the
    # margin below the smallest gain seen (+0.050) is 5 samples
    pairs = ("text->vision", "vision->text")
    for pair in pairs:
        assert after[f"{pair}/R@1"] >= before[f"{pair}/R@1"] + 0.03, pair
        assert after[f"{pair}/dup_R@1"] > before[f"{pair}/dup_R@1"], pair
        assert after[f"{pair}/R@5"] >= before[f"{pair}/R@5"] - 0.02, pair
    assert (run / "model" / "config.json").is_file()
