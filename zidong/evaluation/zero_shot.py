"""`zidong eval MODEL_OR_CHECKPOINT --data DIR [--labels FILE] [--out metrics.json] [--streaming]`.

Embeds every sample of a shard folder in batches (evaluation transforms: centre crop, head of the audio), then:
- retrieval for every modality pair and direction the data has: Recall@1/5/10 and median rank (1 = always
  first) over the samples that have both modalities;
- with `--labels`, zero-shot classification: each class's prompts are embedded by the text tower (mean of the
  normalised prompt embeddings), and every sample's image and speech embedding is assigned the most similar
  class; accuracy per modality against the label in the sample's metadata, with chance (1 / classes) and the
  share of the majority class for reference.

Runs as one process, or under `accelerate launch` (each process embeds a block; results gathered).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from zidong.data.build import build, names_shard_folder
from zidong.data.labels import LabelSet, load_labels
from zidong.data.normalize import BuildSettings
from zidong.data.shards import SampleError, ShardFolder
from zidong.data.sources import open_source
from zidong.data.transforms import SamplePipeline
from zidong.errors import UserError
from zidong.evaluation.retrieval import (
    HeldOut,
    embed_folder,
    folder_captions,
    recall_at_k,
    retrieval_table,
    sample_refs,
)
from zidong.export.trained import find_checkpoint, load_trained
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.utils.log import get_logger

logger = get_logger(__name__)
CLASSIFIED = ("vision", "speech")  # modalities classified against text prompts


@dataclass(frozen=True)
class DataSpec:
    """What to evaluate on, when it is not a shard folder: a `data build` source, read as one (`columns`, `split`),
    and its classes from `label_column` with `prompts` (templates with {} for the class name)."""

    location: str | Path
    columns: dict[str, str] = field(default_factory=dict)
    split: str | None = None
    label_column: str | None = None
    prompts: tuple[str, ...] = ("{}",)
    streaming: bool = False  # a Hugging Face dataset read as a stream (`--streaming`), storing none of it


def evaluate(
    source: str | Path,
    data: str | Path | DataSpec,
    labels: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Run the evaluation, print the tables (rank 0), write `out` as JSON when given; returns the metrics.

    `data` is a shard folder (local or at a URL), or any source `zidong data build` reads: that is built first
    into a temporary shard folder (one modality per sample is enough there), with the same validation; its rejects
    are reported."""
    spec = data if isinstance(data, DataSpec) else DataSpec(data)
    find_checkpoint(source)  # a bad model or label file fails before any work
    file_labels = load_labels(labels) if labels else None
    if names_shard_folder(spec.location):
        if spec.streaming:
            raise UserError(
                f"--streaming reads Hugging Face datasets; {spec.location} is a shard folder (leave it out)"
            )
        label_set = _column_labels(spec.location, spec) if spec.label_column else file_labels
        return _evaluate_folder(source, spec.location, label_set, out, batch_size)
    with tempfile.TemporaryDirectory(prefix="zidong-eval-") as scratch:
        folder = Path(scratch) / "shards"
        built = open_source(spec.location, spec.columns, spec.split, single=True, streaming=spec.streaming)
        result = build(built, folder, BuildSettings(min_modalities=1))
        logger.info(
            "read %s: %d samples, %d rejected (as `zidong data build` would)",
            spec.location,
            result.samples,
            result.rejected,
        )
        if spec.label_column is not None:
            label_set = _column_labels(folder, spec, built.class_names.get(spec.label_column))
        else:
            label_set = file_labels
        return _evaluate_folder(source, folder, label_set, out, batch_size, shown=str(spec.location))


def _column_labels(folder: str | Path, spec: DataSpec, names: list[str] | None = None) -> LabelSet:
    """Classes from a label column: a ClassLabel's names in their order, else the values found, sorted."""
    if names is None:
        shards = ShardFolder(folder)
        found = set()
        for shard, position in sample_refs(shards):
            value = shards.read(shard, position, only=()).meta.get("extra", {}).get(spec.label_column)
            if value is not None:
                found.add(str(value))
        shards.close()
        names = sorted(found)
    if len(names) < 2:
        raise UserError(
            f"--label-column {spec.label_column}: {len(names)} class(es) found in {spec.location}; "
            "classification needs at least two (is it the right column?)"
        )
    return LabelSet(spec.label_column, {name: [p.format(name) for p in spec.prompts] for name in names})


def _evaluate_folder(
    source: str | Path,
    data: str | Path,
    label_set: LabelSet | None,
    out: str | Path | None,
    batch_size: int,
    shown: str | None = None,
) -> dict[str, float]:
    # the samples' classes first: a label field no sample has fails before the model is loaded and run
    labels_by_row = _labels_of(data, label_set) if label_set is not None else None
    accelerator = Accelerator()
    model, processor, _, folder = load_trained(source)
    model.to(accelerator.device)
    pipeline = SamplePipeline(processor, train=False)
    try:
        embeds, presence = embed_folder(model, HeldOut(data, pipeline, batch_size, accelerator))
    except SampleError as err:
        raise UserError(f"--data {data}: {err}") from None
    metrics = recall_at_k(embeds, presence, folder_captions(data))
    if label_set is not None:
        prototypes = class_prototypes(model, processor, label_set)
        metrics.update(classify(embeds, presence, labels_by_row, prototypes, list(label_set.classes)))
    if accelerator.is_main_process:
        print(f"model: {folder}\ndata: {shown or data} ({int(metrics['samples'])} samples)\n")
        print(retrieval_table(metrics))
        if label_set is not None:
            print("\n" + classification_table(metrics, label_set))
        if out is not None:
            Path(out).write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.end_training()
    return metrics


@torch.no_grad()
def class_prototypes(model: ZidongModel, processor, label_set: LabelSet) -> torch.Tensor:
    """(classes, d): per class, the normalised mean of its prompts' normalised text embeddings."""
    rows = []
    for prompts in label_set.classes.values():
        tokens = processor.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True)
        features = model.get_text_features(
            tokens["input_ids"].to(model.device), tokens["attention_mask"].to(model.device)
        ).pooler_output
        rows.append(F.normalize(features.float(), dim=-1).mean(dim=0).cpu())
    return F.normalize(torch.stack(rows), dim=-1)


def classify(
    embeds: dict[str, torch.Tensor],
    presence: dict[str, torch.Tensor],
    labels: list[str | None],
    prototypes: torch.Tensor,
    names: list[str],
) -> dict[str, float]:
    """`classify/<modality>/accuracy` (and count, chance, majority share) over the samples with a label: each
    embedding takes the class of its most similar prototype."""
    target = torch.tensor([names.index(label) if label is not None else -1 for label in labels])
    metrics: dict[str, float] = {}
    for modality in CLASSIFIED:
        rows = presence[modality] & (target >= 0)
        count = int(rows.sum())
        if count == 0:
            continue
        predicted = (embeds[modality][rows] @ prototypes.T).argmax(dim=1)
        truth = target[rows]
        prefix = f"classify/{modality}"
        metrics[f"{prefix}/accuracy"] = float((predicted == truth).float().mean())
        metrics[f"{prefix}/count"] = float(count)
        metrics[f"{prefix}/chance"] = 1.0 / len(names)
        metrics[f"{prefix}/majority"] = float(torch.bincount(truth, minlength=len(names)).max()) / count
    return metrics


def _labels_of(data: str | Path, label_set: LabelSet) -> list[str | None]:
    """Every sample's class in `embed_folder` order (read from the metadata member only)."""
    shards = ShardFolder(data)
    labels = []
    for shard, position in sample_refs(shards):
        try:
            labels.append(label_set.label_of(shards.read(shard, position, only=()).meta))
        except SampleError:
            labels.append(None)
    shards.close()
    if not any(labels):
        raise UserError(
            f"--data {data}: no sample has a `{label_set.field}` value among the label file's classes "
            f"({', '.join(label_set.classes)}); check `field` against the manifest fields"
        )
    return labels


def classification_table(metrics: dict[str, float], label_set: LabelSet) -> str:
    lines = [f"zero-shot classification of {label_set.field} ({len(label_set.classes)} classes)"]
    lines.append(f"{'modality':<12}{'accuracy':>10}{'chance':>10}{'majority':>10}{'samples':>10}")
    for modality in CLASSIFIED:
        prefix = f"classify/{modality}"
        if f"{prefix}/accuracy" in metrics:
            lines.append(
                f"{modality:<12}{metrics[f'{prefix}/accuracy']:>10.3f}{metrics[f'{prefix}/chance']:>10.3f}"
                f"{metrics[f'{prefix}/majority']:>10.3f}{int(metrics[f'{prefix}/count']):>10}"
            )
    return "\n".join(lines)
