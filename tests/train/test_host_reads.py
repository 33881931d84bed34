"""A training step reads the device once (its losses and gradient norm, for the skip decision), whatever the
batches hold and whichever objectives are weighted: presence and token counts come from the collated batch on the
host (tests/train/host_reads.py says what counts as a read). The same code made 90 reads per step before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from tests.models.test_modeling import ALL_OBJECTIVES, make_inputs, tiny_config
from tests.train.host_reads import HostReads
from tests.train.test_pretrain import corpus, write_recipe  # noqa: F401  (corpus is a fixture)
from zidong.config import load_config
from zidong.models.zidong.modeling_zidong import ZidongModel
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


@pytest.mark.parametrize(
    "weights", [{"contrastive": 1.0}, dict.fromkeys(OBJECTIVES, 0.5)], ids=["contrastive", "every-objective"]
)
def test_a_training_step_reads_the_device_once(
    corpus: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    weights: dict[str, float],
) -> None:
    for reads in reads_per_step(tmp_path, corpus, weights):  # batches mixed differently in every step
        assert reads.total == 1, dict(reads.sites)
        assert all(site.startswith("train/trainer.py:") for site in reads.sites)  # `read_once`


MIXES = {
    "text only": {"text": [1, 1, 1, 1], "vision": [0, 0, 0, 0], "speech": [0, 0, 0, 0]},
    "pairs": {"text": [1, 1, 0, 1], "vision": [1, 0, 1, 0], "speech": [0, 1, 1, 0]},
    "triplets": {"text": [1, 1, 1, 1], "vision": [1, 1, 1, 1], "speech": [1, 1, 1, 1]},
    "no text": {"text": [0, 0, 0, 0], "vision": [1, 1, 0, 1], "speech": [1, 0, 1, 1]},
}


@pytest.mark.parametrize("lockstep", [False, True], ids=["ddp", "lockstep"])
def test_the_model_reads_nothing_whatever_the_batch_holds(lockstep: bool) -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).train()
    for name, mix in MIXES.items():
        inputs = make_inputs({m: [bool(p) for p in rows] for m, rows in mix.items()})
        inputs = {k: v.numpy() if k.endswith("_present") else v for k, v in inputs.items()}  # as the trainer does
        with HostReads() as reads:
            output = model(**inputs, return_loss=True, loss_weights=ALL_OBJECTIVES, lockstep=lockstep)
            output.loss.backward()
        assert reads.total == 0, (name, dict(reads.sites))
        assert torch.isfinite(output.loss)
