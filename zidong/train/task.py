"""`Task`: what a kind of training brings to the shared loop (zidong/train/trainer.py), and pretraining, one task.

A task builds its model and processor, says which of the recipe's objectives it trains and what the forward takes
besides the batch, what the data pipeline reads, how held-out data is scored, and what happens after the last
step. `setup` (zidong/train/run.py) applies the recipe's training settings to whatever model a task built, so a
task never has to. A task is complete once made by `for_recipe` (which checks the recipe first), so its methods
may be called in any order. Fine-tuning tasks are in zidong/train/finetune.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from accelerate import Accelerator

from zidong.evaluation.retrieval import retrieval, retrieval_table
from zidong.models.zidong.modeling_zidong import OBJECTIVES
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.train.builders import ensure_demo_corpus, load_tokenizer, new_model
from zidong.train.recipe import PretrainRecipe

if TYPE_CHECKING:
    from zidong.train.run import Run


class Task(Protocol):
    name: str  # as the command line and the logs say it
    evaluation: str  # what `evaluate` measures, for the log
    objectives: tuple[str, ...]  # the model objectives the recipe's `loss` section weights (none: the task's own)

    @classmethod
    def for_recipe(cls, recipe: PretrainRecipe) -> Task:
        """The task, once the recipe suits it (UserError naming the key otherwise)."""
        ...

    def build(self, recipe: PretrainRecipe, accelerator: Accelerator) -> tuple[torch.nn.Module, ZidongProcessor]:
        """The model (not yet prepared) and its processor; runs with DeepSpeed's config unregistered."""
        ...

    def pipeline_options(self, recipe: PretrainRecipe) -> dict[str, Any]:
        """Extra `SamplePipeline` settings for training and evaluation (modalities read, labels)."""
        ...

    def loss_arguments(self, weights: dict[str, float]) -> dict[str, Any]:
        """What the model's forward takes, besides the batch, to return the training loss."""
        ...

    def evaluate(self, run: Run) -> dict[str, float]:
        """The held-out metrics (collective: every process calls it); only called when `data.eval` is set."""
        ...

    def results_table(self, metrics: dict[str, float]) -> str:
        """The end-of-run table (logged as "held-out evaluation after N steps")."""
        ...

    def finish(self, run: Run, metrics: dict[str, float]) -> None:
        """After the last step's checkpoint (every process calls it)."""
        ...


class PretrainTask:
    """Pretraining: a new model, every weighted objective, evaluated by held-out retrieval."""

    name = "pretrain"
    evaluation = "retrieval"
    objectives: tuple[str, ...] = OBJECTIVES

    @classmethod
    def for_recipe(cls, recipe: PretrainRecipe) -> PretrainTask:
        return cls()

    def build(self, recipe: PretrainRecipe, accelerator: Accelerator) -> tuple[torch.nn.Module, ZidongProcessor]:
        ensure_demo_corpus(recipe, accelerator)
        tokenizer = load_tokenizer(recipe)
        model = new_model(recipe, tokenizer)
        return model, ZidongProcessor.for_model(model.config, tokenizer, recipe.model.vision.pretrained)

    def pipeline_options(self, recipe: PretrainRecipe) -> dict[str, Any]:
        return {}

    def loss_arguments(self, weights: dict[str, float]) -> dict[str, Any]:
        return {"return_loss": True, "loss_weights": weights}

    def evaluate(self, run: Run) -> dict[str, float]:
        return retrieval(run.model, run.held_out)

    def results_table(self, metrics: dict[str, float]) -> str:
        return retrieval_table(metrics)

    def finish(self, run: Run, metrics: dict[str, float]) -> None:
        pass
