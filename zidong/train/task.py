"""`Task`: what a kind of training brings to the shared loop (zidong/train/trainer.py).

The base class is pretraining; fine-tuning tasks (zidong/train/finetune.py) override its hooks. A task is
complete when it is constructed (`for_recipe` checks the recipe first), so the hooks may be called in any order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from zidong.evaluation.retrieval import retrieval, retrieval_table
from zidong.models.zidong.modeling_zidong import OBJECTIVES
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.train.distributed import lockstep_enabled
from zidong.train.recipe import PretrainRecipe
from zidong.train.setup import ensure_demo_corpus, load_tokenizer, pretraining_model

if TYPE_CHECKING:
    from zidong.train.setup import Run


class Task:
    """Pretraining: every weighted objective, evaluated by held-out retrieval."""

    name = "pretrain"
    evaluation = "retrieval"  # what `evaluate` measures, for the log
    objectives: tuple[str, ...] = OBJECTIVES  # the model objectives weighted by the recipe's `loss` section

    def build(self, recipe: PretrainRecipe, accelerator: Accelerator) -> tuple[torch.nn.Module, ZidongProcessor]:
        """The model (not yet prepared) and its processor; runs with DeepSpeed's config unregistered."""
        ensure_demo_corpus(recipe, accelerator)
        tokenizer = load_tokenizer(recipe)
        model = pretraining_model(recipe, tokenizer, lockstep=lockstep_enabled(accelerator, recipe))
        return model, ZidongProcessor.for_model(model.config, tokenizer, recipe.model.vision.pretrained)

    def pipeline_options(self, recipe: PretrainRecipe) -> dict[str, Any]:
        """Extra `SamplePipeline` settings for training and evaluation (modalities read, labels)."""
        return {}

    def loss_arguments(self, weights: dict[str, float]) -> dict[str, Any]:
        """What the model's forward takes, besides the batch, to return the training loss."""
        return {"return_loss": True, "loss_weights": weights}

    def exchanges_presence(self, weights: dict[str, float]) -> bool:
        """Does a step with these weights need every process's presence masks (the contrastive loss does)? With
        several processes the trainer then exchanges them once per step and passes `presence_by_rank`."""
        return bool(weights.get("contrastive"))

    def evaluate(self, run: Run) -> dict[str, float]:
        """The held-out metrics (collective: every process calls it); only called when `data.eval` is set."""
        return retrieval(run.model, run.held_out)

    def report(self, metrics: dict[str, float]) -> str:
        """The end-of-run table (logged as "held-out evaluation after N steps")."""
        return retrieval_table(metrics)

    def finish(self, run: Run, metrics: dict[str, float]) -> None:
        """After the last step's checkpoint (every process calls it)."""
