"""A sharding strategy is one `Strategy` class and one registration (zidong/train/strategies.py): the recipe takes
its name and its keys, and setup shards, prepares, describes and runs the model as it says (the strategies that
ship are checked against one process in tests/train/test_parity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from tests.pretrain_run import write_recipe
from zidong.config import ConfigError, load_config
from zidong.train import trainer
from zidong.train.recipe import PretrainRecipe
from zidong.train.run import setup
from zidong.train.strategies import STRATEGIES, DataParallel, Prepared, register_strategy
from zidong.train.task import PretrainTask


class WholeInLockstep(DataParallel):
    """A toy: the model stays whole and unwrapped (Accelerate prepares the optimizer and schedule only), every
    process runs every tower in lockstep, and it reads one key of FSDP2's."""

    name = "whole-lockstep"
    keys = frozenset({"reshard_after_forward"})
    lockstep = True

    def __init__(self) -> None:
        self.sharded: list[torch.nn.Module] = []

    def shard(self, model, recipe, accelerator) -> None:
        self.sharded.append(model)

    def prepare(self, accelerator, recipe, model, optimizer, scheduler) -> Prepared:
        return Prepared(model, *accelerator.prepare(optimizer, scheduler))

    def describe(self, accelerator, recipe) -> str:
        return f"whole model in lockstep, reshard_after_forward={recipe.parallel.reshard_after_forward}"


@pytest.fixture
def toy_strategy():
    register_strategy(WholeInLockstep())
    yield STRATEGIES[WholeInLockstep.name]
    del STRATEGIES[WholeInLockstep.name]


def test_a_new_strategy_is_one_class_and_one_registration(
    toy_strategy: WholeInLockstep, pretrain_corpus: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe_file = write_recipe(tmp_path, pretrain_corpus, data={"num_workers": 0, "ledger": False, "eval": None})
    chosen = ["parallel.strategy=whole-lockstep", "parallel.reshard_after_forward=false", "train.trackers=[]"]
    with pytest.raises(ConfigError, match=r"parallel\.param_dtype.*only applies to parallel.strategy=fsdp or hsdp"):
        load_config(PretrainRecipe, recipe_file, [*chosen, "parallel.param_dtype=bf16"])
    with pytest.raises(ConfigError, match=r"reshard_after_forward.*parallel\.strategy=fsdp or hsdp or whole-lockstep"):
        load_config(PretrainRecipe, recipe_file, ["parallel.reshard_after_forward=false"])
    with caplog.at_level("INFO", logger="zidong"):
        run = setup(load_config(PretrainRecipe, recipe_file, chosen), PretrainTask())
    try:
        assert toy_strategy.sharded == [run.model]  # its shard hook saw the model the optimizer then got
        assert run.model.launch.lockstep
        assert run.sharded is None
        assert "strategy: whole model in lockstep, reshard_after_forward=False" in caplog.text
        before = {name: p.detach().clone() for name, p in run.model.named_parameters()}
        for _ in range(2):  # the warm-up's first step has learning rate 0
            losses, grad_norm, _, _ = trainer.optimizer_step(run, stop_requested=False)
            assert torch.isfinite(torch.tensor(grad_norm))
            assert losses["loss"] > 0
        assert not torch.equal(before["text_projection.weight"], run.model.text_projection.weight)
    finally:
        run.loader.close()
        run.accelerator.end_training()
        AcceleratorState._reset_state(True)


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="'fsdp' is registered already"):
        register_strategy(STRATEGIES["fsdp"])
