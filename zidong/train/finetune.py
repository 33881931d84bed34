"""`zidong finetune TASK RECIPE.yaml [key=value ...]`: downstream fine-tuning with the pretraining loop.

A fine-tuning recipe is a pretraining recipe (same `data`, `train`, `checkpoint`, `eval`, `model.<tower>` keys:
learning-rate multipliers and freezing) plus a `finetune` section:

    finetune:
      source: exports/tiny          # an export folder, a checkpoint, or a run folder (its latest checkpoint)
      modalities: [vision]          # retrieval: the modalities whose pairs are trained (2 or 3); classify: one
      labels: recipes/labels/demo-shape.yaml   # classify: the label file (field + classes)
      lora: {rank: 8, alpha: 16}    # optional: LoRA adapters (peft) on the towers, every other weight frozen

Tasks:
- `retrieval`: the contrastive objective on pairs of `modalities` only (the other modalities are not read);
  evaluated by held-out retrieval.
- `classify`: `ZidongForClassification`, a linear head on one tower's pooled output, cross-entropy on the
  labelled samples; a linear probe with `model.<tower>.frozen_steps: -1`, a full fine-tune without. Evaluated by
  held-out accuracy (with chance and the majority-class share).
Because the loop is the pretraining loop, launchers (torchrun, Accelerate, DeepSpeed), resume, preemption,
trackers and checkpoints work the same. At the end the model is exported as a Hugging Face folder to
`OUTPUT_DIR/model` (`zidong export` of the last checkpoint; a LoRA fine-tune's adapters also as peft folders in
`OUTPUT_DIR/model/lora`). A source that was itself fine-tuned with LoRA starts from its merged weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from zidong.data.labels import LabelSet, load_labels
from zidong.errors import UserError
from zidong.evaluation.classification import accuracy_table, classification_accuracy
from zidong.export.trained import load_trained
from zidong.models.zidong import ZidongForClassification, ZidongModel, ZidongPreTrainedModel
from zidong.models.zidong.lora_zidong import (
    add_lora,
    default_target_modules,
    is_lora_parameter,
    lora_towers,
    unload_lora,
)
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.train.recipe import FinetuneRecipe, LoraSection
from zidong.train.run import Run
from zidong.train.task import PretrainTask
from zidong.train.trainer import train
from zidong.utils.log import get_logger

logger = get_logger(__name__)
EXPORT_FOLDER = "model"


def finetune(task_name: str, recipe: FinetuneRecipe) -> dict[str, float]:
    """Run fine-tuning task `task_name` (`retrieval` or `classify`); returns the last held-out metrics."""
    return train(recipe, TASKS[task_name].for_recipe(recipe))


class RetrievalTask(PretrainTask):
    """Pretraining's contrastive objective on the pairs of `finetune.modalities`, from a trained model."""

    name = "retrieval"

    @classmethod
    def for_recipe(cls, recipe: FinetuneRecipe) -> RetrievalTask:
        """The task, once the recipe's `finetune` section suits it (UserError otherwise)."""
        if len(recipe.finetune.modalities) < 2:
            raise UserError("finetune.modalities: retrieval needs two or three modalities (the pairs trained)")
        return cls()

    def build(self, recipe: FinetuneRecipe, accelerator: Accelerator) -> tuple[torch.nn.Module, ZidongProcessor]:
        model, processor, folder = _load_source(recipe)
        if not isinstance(model, ZidongModel):
            raise UserError(f"finetune.source: {folder} holds a {type(model).__name__}, not a ZidongModel")
        logger.info("fine-tuning %s from %s", self.name, folder)
        _add_lora(model, recipe.finetune.lora)
        return model.train(), processor

    def pipeline_options(self, recipe: FinetuneRecipe) -> dict[str, Any]:
        return {"modalities": tuple(recipe.finetune.modalities)}

    def finish(self, run: Run, metrics: dict[str, float]) -> None:
        _export_final(run)


class ClassifyTask:
    """A linear head on one tower's pooled output, cross-entropy on the labelled samples."""

    name = "classify"
    evaluation = "classification"
    objectives = ()  # the classifier's cross-entropy only: the recipe's `loss` section does not apply

    def loss_arguments(self, weights: dict[str, float]) -> dict[str, Any]:
        return {}  # the batch's `labels` make the classifier return its loss

    def __init__(self, labels: LabelSet) -> None:
        self.labels = labels

    @classmethod
    def for_recipe(cls, recipe: FinetuneRecipe) -> ClassifyTask:
        """The task with the recipe's label file, once the `finetune` section suits it (UserError otherwise)."""
        if len(recipe.finetune.modalities) != 1:
            raise UserError("finetune.modalities: classify takes exactly one modality, the tower it classifies")
        if recipe.finetune.labels is None:
            raise UserError("finetune.labels: classify needs a label file (field + classes, docs/evaluation.md)")
        return cls(load_labels(recipe.finetune.labels))

    def build(self, recipe: FinetuneRecipe, accelerator: Accelerator) -> tuple[torch.nn.Module, ZidongProcessor]:
        base, processor, folder = _load_source(recipe)
        names = list(self.labels.classes)
        if isinstance(base, ZidongForClassification):
            base = base.zidong
        config = base.config
        config.classification_modality = recipe.finetune.modalities[0]
        config.id2label = dict(enumerate(names))
        config.label2id = {name: index for index, name in enumerate(names)}
        model = ZidongForClassification(config)
        model.zidong.load_state_dict(base.state_dict())
        _train_only_what_classifies(model)
        _add_lora(model, recipe.finetune.lora)
        logger.info(
            "classifying %s into %s (%d classes) with the %s tower of %s",
            self.labels.field,
            ", ".join(names),
            len(names),
            config.classification_modality,
            folder,
        )
        return model.train(), processor

    def pipeline_options(self, recipe: FinetuneRecipe) -> dict[str, Any]:
        return {"modalities": tuple(recipe.finetune.modalities), "label_set": self.labels}

    def evaluate(self, run: Run) -> dict[str, float]:
        return classification_accuracy(run.model, run.held_out)

    def results_table(self, metrics: dict[str, float]) -> str:
        return accuracy_table(metrics)

    def finish(self, run: Run, metrics: dict[str, float]) -> None:
        _export_final(run)


TASKS: dict[str, type[RetrievalTask] | type[ClassifyTask]] = {"retrieval": RetrievalTask, "classify": ClassifyTask}


def _train_only_what_classifies(model: ZidongForClassification) -> None:
    """The other towers, the projections, the fusion encoder and the pretraining heads travel with the model
    (exports keep the joint model whole) but take no part in classification: frozen, so they hold no optimizer
    state and no update (weight decay included) touches them."""
    used = {id(p) for p in model.towers()[model.config.classification_modality].parameters()}
    for parameter in model.zidong.parameters():
        if id(parameter) not in used:
            parameter.requires_grad_(False)


def _load_source(recipe: FinetuneRecipe) -> tuple[ZidongPreTrainedModel, ZidongProcessor, Path]:
    """`finetune.source` as a model with plain towers (the adapters of a LoRA fine-tune merged in)."""
    model, processor, _, folder = load_trained(recipe.finetune.source)
    if lora_towers(model.base_model):
        logger.info("%s carries LoRA adapters: starting from its merged weights", folder)
        unload_lora(model.base_model, merge=True)
    return model, processor, folder


def _add_lora(model: ZidongPreTrainedModel, lora: LoraSection | None) -> None:
    """`finetune.lora`: peft's adapters on its towers; every other weight of the joint model is frozen (a
    classifier's head, outside it, still trains)."""
    if lora is None:
        return
    joint = model.base_model
    specs = {}
    for modality in lora.towers:
        tower = joint.towers()[modality]
        try:
            targets = lora.target_modules.get(modality) or default_target_modules(tower)
        except ValueError as err:
            raise UserError(f"finetune.lora.target_modules.{modality}: {err}") from None
        specs[modality] = {
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "target_modules": targets,
        }
    try:
        add_lora(joint, specs)
    except ValueError as err:
        raise UserError(f"finetune.lora.target_modules: {err}") from None
    for name, parameter in joint.named_parameters():
        if not is_lora_parameter(name):
            parameter.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "LoRA (peft) on the %s tower(s): %s; %s trainable parameters of %s",
        ", ".join(specs),
        "; ".join(f"{m}: {', '.join(spec['target_modules'])}" for m, spec in specs.items()),
        f"{trainable:,}",
        f"{sum(p.numel() for p in model.parameters()):,}",
    )


def _export_final(run: Run) -> None:
    """Export the last checkpoint to OUTPUT_DIR/model (rank 0; every process waits for it)."""
    from zidong.export.folders import export
    from zidong.train.checkpoint import checkpoints

    if run.accelerator.is_main_process:
        target = run.output_dir / EXPORT_FOLDER
        shutil.rmtree(target, ignore_errors=True)
        export(checkpoints(run.output_dir)[-1], target)
    run.accelerator.wait_for_everyone()
