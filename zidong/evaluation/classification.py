"""Held-out accuracy of a fine-tuned classifier (`ZidongForClassification`), with chance and majority share."""

from __future__ import annotations

import torch

from zidong.evaluation.retrieval import HeldOut, forward_folder, gather_rows


def classification_accuracy(model: torch.nn.Module, held_out: HeldOut) -> dict[str, float]:
    """Held-out accuracy of a `ZidongForClassification` over the samples with the modality and a label."""
    accelerator = held_out.accelerator
    predicted, truth = [], []
    for _, batch, output in forward_folder(model, held_out):
        if not batch:
            continue
        scored = output.present & (batch["labels"] >= 0)
        predicted.append(output.logits[scored].argmax(dim=-1).cpu())
        truth.append(batch["labels"][scored].cpu())
    classes = accelerator.unwrap_model(model).config.num_labels
    predicted_all = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long)
    truth_all = torch.cat(truth) if truth else torch.zeros(0, dtype=torch.long)
    correct = predicted_all.eq(truth_all).sum()[None]
    local = torch.cat([correct, torch.tensor([truth_all.numel()]), torch.bincount(truth_all, minlength=classes)])
    totals = gather_rows(accelerator, local[None], accelerator.num_processes).sum(dim=0)
    correct, count, per_class = int(totals[0]), int(totals[1]), totals[2:]
    if count == 0:
        return {"accuracy": 0.0, "chance": 1.0 / classes, "majority": 0.0, "samples": 0.0}
    return {
        "accuracy": correct / count,
        "chance": 1.0 / classes,
        "majority": float(per_class.max()) / count,
        "samples": float(count),
    }


def accuracy_table(metrics: dict[str, float]) -> str:
    """The accuracy metrics as a fixed-width table."""
    return (
        f"{'accuracy':>10}{'chance':>10}{'majority':>10}{'samples':>10}\n"
        f"{metrics['accuracy']:>10.3f}{metrics['chance']:>10.3f}{metrics['majority']:>10.3f}"
        f"{int(metrics['samples']):>10}"
    )
