"""The README's main job (the tiny recipe, end to end on the demo corpus) reaches the retrieval measured for it;
then the shipped fine-tuning recipes start from it and beat its zero-shot numbers.

Every test runs on two sources: `short`, the recipe cut to 300 steps and the fine-tunes from it cut to 150 (probe)
and 300 (retrieval) steps (the file takes about 5 minutes at one thread, part of `make test`), and `full`, the
main job itself (1500 steps, the fine-tunes as they ship; the file took 11 min 39 s alone;
marked `main_job`, left out of `make test`, run by `make test-main-job` after a change to the recipe, the model,
the data or the trainer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import run_cli
from zidong.export.trained import load_trained
from zidong.models.zidong import ZidongForClassification

TINY = "recipes/pretrain/tiny.yaml"
QUIET = {"ZIDONG_PROGRESS": "0"}
PAIRS = ("speech->text", "text->speech", "speech->vision", "vision->speech", "text->vision", "vision->text")


@dataclass(frozen=True)
class Job:
    overrides: tuple[str, ...]
    # duplicate-aware R@1 per pair, in PAIRS order, measured on one thread (as here) with the recipe as it ships
    # (docs/training.md); the run is bitwise reproducible on one machine, and another CPU's arithmetic has moved
    # R@1 by up to 0.03 before
    reached_dup_r1: tuple[float, ...]
    r10_over_chance: float  # every pair's R@10 at least this many times chance
    loss_drop: float  # the last contrastive loss at most this share of the first
    meets_targets: bool = False  # speech<->text's targets of docs/training.md (dup@1 0.9, 0.9 x the ceiling)
    # the fine-tunes' steps where they are cut short (recipe name -> train.max_steps); none: as the recipes ship
    finetune_steps: tuple[tuple[str, int], ...] = ()

    def finetune_overrides(self, recipe: str) -> list[str]:
        return [f"train.max_steps={steps}" for name, steps in self.finetune_steps if name == recipe]


JOBS = {
    "short": Job(
        ("train.max_steps=300", "eval.every_steps=300", "checkpoint.every_steps=300"),
        # with bucketed batches (before 2026-12-08): 0.579, 0.604, 0.142, 0.117, 0.217, 0.125
        (0.771, 0.796, 0.300, 0.237, 0.292, 0.229),
        r10_over_chance=8,
        loss_drop=0.45,
        finetune_steps=(("probe-color-speech", 150), ("retrieval-text-vision", 300)),
    ),
    # since 2026-12-08 the recipe draws batches at random (data.bucket_pool: 0): the image pairs rose from 0.338-0.500
    "full": Job((), (0.958, 0.971, 0.496, 0.463, 0.508, 0.500), r10_over_chance=20, loss_drop=0.3, meets_targets=True),
}
MARGIN = 0.04


def evaluations(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


@pytest.fixture(scope="module", params=["short", pytest.param("full", marks=pytest.mark.main_job)])
def main_job(request: pytest.FixtureRequest, demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp(request.param) / "run"  # the recipe reads the shared demo corpus, data/demo
    result = run_cli("pretrain", TINY, f"output_dir={run}", *JOBS[request.param].overrides, env=QUIET, timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out retrieval after" in result.stderr
    return run


def test_tiny_recipe_reaches_its_measured_retrieval(main_job: Path, request: pytest.FixtureRequest) -> None:
    job = JOBS[request.node.callspec.params["main_job"]]
    final = evaluations(main_job)[-1]
    assert final["samples"] == 240
    assert final["distinct_captions"] == 196
    for pair, reached in zip(PAIRS, job.reached_dup_r1, strict=True):
        assert final[f"{pair}/dup_R@1"] >= reached - MARGIN, f"{pair}: {final[f'{pair}/dup_R@1']:.3f}"
        assert final[f"{pair}/R@10"] >= job.r10_over_chance * 10 / 240, pair
    if job.meets_targets:
        for pair in ("speech->text", "text->speech"):
            assert final[f"{pair}/dup_R@1"] >= 0.9, pair
            assert final[f"{pair}/R@1"] >= 0.9 * final[f"{pair}/ceiling_R@1"], pair
    records = [json.loads(line) for line in (main_job / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["contrastive"] < job.loss_drop * train[0]["contrastive"]


def test_speech_colour_probe_beats_zero_shot(main_job: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    job = JOBS[request.node.callspec.params["main_job"]]
    labels = "recipes/labels/demo-color.yaml"
    zero_shot = tmp_path / "zero-shot.json"
    result = run_cli("eval", str(main_job), "--data", "data/demo/eval", "--labels", labels, "--out", str(zero_shot))
    assert result.returncode == 0, result.stderr[-3000:]
    baseline = json.loads(zero_shot.read_text())
    run = tmp_path / "probe"
    result = run_cli(
        "finetune", "classify", "recipes/finetune/probe-color-speech.yaml",
        f"finetune.source={main_job}", f"output_dir={run}", *job.finetune_overrides("probe-color-speech"),
        env=QUIET, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final = evaluations(run)[-1]
    # the 143 of the 240 held-out scenes whose objects share one colour (the others carry no colour label)
    assert final["samples"] == baseline["classify/speech/count"] == 143
    # measured on 2026-12-02, one thread as here, against zero-shot: 0.993 vs 0.783 from the short source (300
    # steps; cut to 150 on 2026-12-07, still 0.993), 1.000 vs 0.944 from the full one (at most 0.056 to gain there, so the bar is 0.97 where zero-shot is that close)
    zero_shot = baseline["classify/speech/accuracy"]
    assert final["accuracy"] >= min(zero_shot + 0.05, 0.97)
    assert final["accuracy"] > zero_shot
    assert final["accuracy"] >= final["majority"] + 0.3
    model, _, _, _ = load_trained(run / "model")  # the HF folder the run ends with
    assert isinstance(model, ZidongForClassification)
    assert list(model.config.id2label.values()) == ["red", "green", "blue", "yellow", "purple"]


def test_text_vision_retrieval_finetune_improves_on_its_source(
    main_job: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    job = JOBS[request.node.callspec.params["main_job"]]
    before = evaluations(main_job)[-1]
    run = tmp_path / "retrieval"
    result = run_cli(
        "finetune", "retrieval", "recipes/finetune/retrieval-text-vision.yaml",
        f"finetune.source={main_job}", f"output_dir={run}", *job.finetune_overrides("retrieval-text-vision"),
        env=QUIET, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    after = evaluations(run)[-1]
    assert sorted(key for key in after if key.endswith("/R@1")) == ["text->vision/R@1", "vision->text/R@1"]
    # measured on 2026-12-02 (docs/finetune.md), one thread as here. From the full main job: R@1 0.367 -> 0.417
    # and 0.282 -> 0.353, dup@1 0.471 -> 0.521 and 0.333 -> 0.417, R@5 0.888 -> 0.883 and 0.824 -> 0.872 (its R@5
    # is already near its duplicate-aware ceiling, dup@5 0.95 for text->vision, so the gain shows in R@1). From
    # the short source: R@1 0.163 -> 0.263 and 0.145 -> 0.248, dup@1 0.221 -> 0.321 and 0.208 -> 0.308, R@5
    # 0.542 -> 0.725 and 0.487 -> 0.731; cut to 300 steps (2026-12-07, as `make test` runs it): R@1 0.163 -> 0.258
    # and 0.149 -> 0.223, dup@1 0.221 -> 0.338 and 0.212 -> 0.267, R@5 0.542 -> 0.708 and 0.487 -> 0.689. Since
    # 2026-12-07 (no dropout in any tower) the full source is stronger and the fine-tune ends at the same
    # text->vision R@1: 0.400 -> 0.417 and 0.311 -> 0.389, dup@1 0.500 -> 0.537 and 0.354 -> 0.450, R@5 0.850 ->
    # 0.887 and 0.825 -> 0.874. R@1 moves by 0.004 per sample: the mean gain asked for (0.03) is 7 samples per
    # pair, below the smallest mean gain seen (+0.048)
    pairs = ("text->vision", "vision->text")
    for pair in pairs:
        assert after[f"{pair}/R@1"] > before[f"{pair}/R@1"], pair
        assert after[f"{pair}/dup_R@1"] > before[f"{pair}/dup_R@1"], pair
        assert after[f"{pair}/R@5"] >= before[f"{pair}/R@5"] - 0.02, pair
    gains = [after[f"{pair}/R@1"] - before[f"{pair}/R@1"] for pair in pairs]
    assert sum(gains) / len(gains) >= 0.03, gains
    assert (run / "model" / "config.json").is_file()
