"""A training step reads the device once (its losses and gradient norm, for the skip decision), whatever the
batches hold: presence and token counts come from the collated batch on the host (tests/train/host_reads.py says
what counts as a read)."""

from __future__ import annotations

from pathlib import Path

from accelerate.state import AcceleratorState

from tests.train.host_reads import HostReads
from tests.train.test_pretrain import corpus, write_recipe  # noqa: F401  (corpus is a fixture)
from zidong.config import load_config
from zidong.train import trainer
from zidong.train.recipe import PretrainRecipe
from zidong.train.setup import setup
from zidong.train.task import Task

OBJECTIVES = ("contrastive", "matching", "masked_text", "masked_vision", "masked_speech")
STEPS = 4


def reads_per_step(folder: Path, corpus: dict[str, Path], weights: dict[str, float]) -> list[HostReads]:  # noqa: F811
    loss = {name: {"weight": weights.get(name, 0.0)} for name in OBJECTIVES}
    recipe = write_recipe(folder, corpus, loss=loss, data={"num_workers": 0, "ledger": False, "eval": None})
    run = setup(load_config(PretrainRecipe, recipe, ["train.trackers=[]"]), Task())
    try:
        steps = []
        for _ in range(STEPS):
            with HostReads() as reads:
                trainer._optimizer_step(run, stop_requested=False)
            steps.append(reads)
        return steps
    finally:
        run.loader.close()
        run.accelerator.end_training()
        AcceleratorState._reset_state(True)


def test_a_contrastive_step_reads_the_device_once(corpus: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    steps = reads_per_step(tmp_path, corpus, {"contrastive": 1.0})
    for reads in steps:  # batches of text+vision, text+speech, triplets... mixed differently in every step
        assert reads.total == 1, dict(reads.sites)
        assert all(site.startswith("train/trainer.py:") for site in reads.sites)


def test_every_objective_reads_a_fixed_number_of_times(corpus: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    steps = reads_per_step(tmp_path, corpus, dict.fromkeys(OBJECTIVES, 0.5))
    # what remains: matching's and masked modelling's row and token selections, whose sizes are drawn on the
    # device (which negatives exist, which tokens are masked): 5 for matching, 3 per masked modality, + the step's
    counts = [reads.total for reads in steps]
    assert counts == [15] * STEPS, [dict(reads.sites) for reads in steps]
    for reads in steps:
        assert {site.split(":")[0] for site in reads.sites} == {
            "train/trainer.py",
            "models/zidong/matching_zidong.py",
            "models/zidong/masking_zidong.py",
        }
