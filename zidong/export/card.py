"""Model cards (README.md) of export folders: what the model is, what trained it, how well, how to load it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from zidong.evaluation.retrieval import retrieval_table
from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.models.zidong.towers_zidong import is_convolutional, tower_width
from zidong.train.metrics import METRICS_FILE

POOLING = {
    "text": "the mean of `last_hidden_state` over the tokens where `attention_mask` is 1",
    "speech": "the mean of `last_hidden_state` over the steps where the attention mask is 1",
}
# how a vision tower is pooled, by `vision_pooling`: what the card says, and its code
VISION_POOLING = {
    "pooler": ("the tower's own `pooler_output`", "pooled = output.pooler_output.flatten(1)"),
    "cls": ("`last_hidden_state[:, 0]`, the first (class) token", "pooled = states[:, 0]"),
    "mean": ("the mean of `last_hidden_state` over its tokens", "pooled = states.mean(1)"),
}
CONVOLUTIONAL_POOLING = "the tower's own `pooler_output`, the normalised mean of its last feature map"


def parameters_by_part(model: ZidongModel) -> dict[str, int]:
    """Parameters per tower and for the rest (projections, fusion encoder, heads, temperature)."""
    counts = {m: sum(p.numel() for p in tower.parameters()) for m, tower in model.towers().items()}
    counts["fusion, heads, projections"] = sum(p.numel() for p in model.parameters()) - sum(counts.values())
    return counts


def model_card(model: ZidongModel, recipe: dict | None, checkpoint: Path, towers: bool, license: str) -> str:
    config = model.config
    counts = parameters_by_part(model)
    lines = [
        "---",
        f"license: {license}",
        "library_name: transformers",
        "pipeline_tag: feature-extraction",
        "tags: [zidong, multimodal, text, vision, speech, contrastive]",
        "---",
        "",
        f"# zidong tri-modal encoder ({sum(counts.values()) / 1e6:.1f}M parameters)",
        "",
        "Text, vision and speech towers that embed into one shared space "
        f"({config.projection_dim} dimensions, L2-normalised), with a fusion encoder and matching / masked-modelling "
        "heads, trained with zidong; exported from the checkpoint "
        f"`{checkpoint.name}`.",
        "",
        "| part | architecture | parameters |",
        "|---|---|---|",
    ]
    for modality in MODALITIES:
        architecture = type(model.towers()[modality]).__name__
        lines.append(f"| {modality} tower | {architecture} | {counts[modality]:,} |")
    lines += [f"| fusion, heads, projections | zidong | {counts['fusion, heads, projections']:,} |", ""]
    if getattr(config, "classification_modality", None):
        classes = ", ".join(str(name) for name in config.id2label.values())
        lines += [
            f"A classifier on the {config.classification_modality} tower ({len(config.id2label)} classes: {classes}); "
            "load it with `zidong.ZidongForClassification.from_pretrained(FOLDER)`, or "
            "`AutoModelForSequenceClassification.from_pretrained(FOLDER, trust_remote_code=True)`; its `logits` "
            "are (batch, classes).",
            "",
        ]
    if getattr(config, "lora", None):
        adapted = ", ".join(
            f"{m} ({', '.join(spec['target_modules'])}, rank {spec['r']})" for m, spec in config.lora.items()
        )
        lines += [
            f"LoRA adapters (peft) on the {adapted} tower(s): the joint model carries them (loading it needs `peft`); "
            "each is also a peft folder `lora/<modality>` for the plain tower (`PeftModel.from_pretrained(tower, "
            '"lora/text")`). `zidong export --merge-lora` writes the weights with the adapters merged in.',
            "",
        ]
    lines += _training_section(recipe, checkpoint)
    lines += _metrics_section(checkpoint)
    lines += _loading_section(towers)
    lines += ["## License", "", f"{license}; check the licenses of the training data listed above.", ""]
    return "\n".join(lines)


def tower_card(model: ZidongModel, modality: str) -> str:
    tower = model.towers()[modality]
    preprocessor = {"text": "AutoTokenizer", "vision": "AutoImageProcessor", "speech": "AutoFeatureExtractor"}
    call = {
        "text": 'inputs = pre(["a red circle"], return_tensors="pt", padding=True)',
        "vision": 'inputs = pre(images=[image], return_tensors="pt")',
        "speech": 'inputs = pre([waveform_16khz], sampling_rate=16000, return_tensors="pt")',
    }
    if modality == "vision":
        described, pooling = VISION_POOLING[model.vision_pooling]
        if is_convolutional(tower.config):
            described = CONVOLUTIONAL_POOLING
    else:  # text and speech: the masked mean
        described = POOLING[modality]
        mask = "inputs['attention_mask']"
        if modality == "speech" and model.speech_model.main_input_name != "input_features":
            mask = "tower._get_feature_vector_attention_mask(states.shape[1], inputs['attention_mask'])"
        pooling = f"mask = {mask}.unsqueeze(-1).float()\npooled = (states * mask).sum(1) / mask.sum(1)"
    return "\n".join(
        [
            f"# zidong {modality} tower ({type(tower).__name__}, {sum(p.numel() for p in tower.parameters()):,} "
            "parameters)",
            "",
            f"A plain transformers `{type(tower).__name__}` with its own preprocessor: load it with `AutoModel`, no "
            "zidong and no remote code needed. `projection.safetensors` holds `weight`, the "
            f"({model.config.projection_dim} x {tower_width(model.config, modality)}) linear map (no bias) into the "
            "space this tower shares with the other two; pool the states as zidong does "
            f"({described}), project, L2-normalise:",
            "",
            "```python",
            "import torch",
            "from safetensors.torch import load_file",
            f"from transformers import AutoModel, {preprocessor[modality]}",
            "",
            "tower = AutoModel.from_pretrained(FOLDER).eval()",
            f"pre = {preprocessor[modality]}.from_pretrained(FOLDER)",
            "projection = load_file(f'{FOLDER}/projection.safetensors')['weight']",
            call[modality],
            "with torch.no_grad():",
            "    output = tower(**inputs)",
            "states = output.last_hidden_state",
            *pooling.splitlines(),
            "embedding = torch.nn.functional.normalize(pooled @ projection.T, dim=-1)",
            "```",
            "",
            "These embeddings equal those of the joint model in the parent folder (`get_"
            f"{modality}_features`) on the same inputs"
            + (
                " (the stock feature extractor matches zidong's filterbank front end to about 1e-4)."
                if modality == "speech"
                else "."
            ),
            "",
        ]
    )


def _training_section(recipe: dict | None, checkpoint: Path) -> list[str]:
    lines = ["## Training", ""]
    trainer_file = checkpoint / "trainer.json"
    if trainer_file.is_file():
        state = json.loads(trainer_file.read_text())
        lines.append(f"Checkpoint of step {state['step']:,} ({state.get('samples', 0):,} samples seen).")
        lines.append("")
    if recipe is None:
        return [*lines, "Exported from an export folder: the training details are in its own card.", ""]
    weights = {name: section.get("weight") for name, section in (recipe.get("loss") or {}).items() if section}
    used = ", ".join(f"{name} x {weight}" for name, weight in weights.items() if weight)
    lines += [f"Objectives: {used}.", "", "| data | samples | modalities | audio hours | images | languages |"]
    lines.append("|---|---|---|---|---|---|")
    for source in recipe.get("data", {}).get("train", []):
        lines.append(_data_row(Path(source["path"])))
    lines += ["", "<details><summary>The recipe</summary>", "", "```yaml", yaml.safe_dump(recipe).rstrip(), "```"]
    return [*lines, "", "</details>", ""]


def _data_row(folder: Path) -> str:
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"| `{folder}` | (index.json not readable at export time) | | | | |"
    combinations = ", ".join(f"{name} {count:,}" for name, count in sorted(index.get("combinations", {}).items()))
    languages = ", ".join(f"{name} {count:,}" for name, count in sorted(index.get("languages", {}).items()))
    return (
        f"| `{folder}` | {index.get('samples', 0):,} | {combinations} | {index.get('audio_hours', 0):.2f} | "
        f"{index.get('images', 0):,} | {languages} |"
    )


def _metrics_section(checkpoint: Path) -> list[str]:
    """The last held-out evaluation at or before the checkpoint's step, from the run's metrics.jsonl."""
    metrics_file = checkpoint.parent.parent / METRICS_FILE
    trainer_file = checkpoint / "trainer.json"
    if not metrics_file.is_file() or not trainer_file.is_file():
        return []
    step = json.loads(trainer_file.read_text())["step"]
    evaluations = []
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "eval" and record.get("step", 0) <= step:
            evaluations.append(record)
    if not evaluations:
        return []
    last = evaluations[-1]
    samples = int(last.get("samples", 0))
    return [
        f"## Held-out retrieval (step {last['step']:,}, {samples:,} samples)",
        "",
        "```",
        retrieval_table(last),
        "```",
        "",
    ]


def _loading_section(towers: bool) -> list[str]:
    lines = [
        "## How to use",
        "",
        "```python",
        "from transformers import AutoModel, AutoProcessor",
        "",
        "model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()   # no trust_remote_code needed",
        "processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)  # after `import zidong.models`",
        'inputs = processor(text=["a red circle", None], images=[image, image], audio=[None, waveform_16khz],',
        '                   sampling_rate=16000, return_tensors="pt")',
        "out = model(**inputs)",
        "out.text_embeds, out.vision_embeds, out.speech_embeds   # (batch, dim), zero rows where a sample lacks one",
        "```",
        "",
        "`model.get_text_features(...)`, `get_vision_features` and `get_speech_features` embed one modality: "
        "their `.pooler_output` is the embedding (transformers' CLIP convention).",
        "",
    ]
    if towers:
        lines += [
            "`text/`, `vision/` and `speech/` hold each tower as a stock transformers model with its preprocessor "
            "and its projection into the shared space; their READMEs show how to embed with transformers alone.",
            "",
        ]
    return lines
