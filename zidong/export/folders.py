"""`zidong export CHECKPOINT --out DIR [--towers] [--merge-lora] [--dtype D] [--push-to-hub REPO]`: Hugging Face folders.

DIR holds the joint model (`config.json` with `auto_map`, `model.safetensors`, sharded above `max_shard_size`,
the remote code, the processor) and a model card. With `--towers`, `DIR/text`, `DIR/vision` and `DIR/speech`
each hold one tower as a plain transformers model of its own architecture with its own preprocessor, loadable
with `AutoModel` alone, plus `projection.safetensors` (the linear map into the shared embedding space) and a
README saying how to pool and project; the text folder is also a sentence-transformers model
(sentence_embedding.py). Everything is written into `DIR.tmp` and renamed at the end, so DIR is
either complete or absent; an existing non-empty DIR is refused. Weights are written in float32 (what training
keeps, whatever its autocast precision) unless `--dtype` asks for bfloat16 or float16; the audio front end's
window and filters are float32 buffers recomputed on load in any dtype.

A LoRA fine-tune (`finetune.lora`) exports as it trained: the joint model with its adapters (loading it needs
peft, a zidong dependency), and each adapter again as a peft folder `DIR/lora/<modality>` for the base tower
`--towers` writes (`PeftModel.from_pretrained(AutoModel.from_pretrained("DIR/text"), "DIR/lora/text")`). With
`--merge-lora` the adapters are merged into the weights instead: every folder is then a plain model.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2FeatureExtractor

from zidong.errors import UserError
from zidong.export.card import model_card, tower_card
from zidong.export.sentence_embedding import write_sentence_transformers_files
from zidong.export.trained import load_trained
from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.models.zidong.lora_zidong import adapter_weights, lora_towers, unload_lora, write_adapter
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.utils.log import get_logger

logger = get_logger(__name__)
PROJECTION_FILE = "projection.safetensors"
LORA_FOLDER = "lora"
SENTENCE_LENGTH = 512  # sentence-transformers' max_seq_length: the text tower's positions, at most this
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(
    source: str | Path,
    out: str | Path,
    towers: bool = False,
    push_to_hub: str | None = None,
    license: str = "apache-2.0",
    max_shard_size: str = "5GB",
    dtype: str = "float32",
    merge_lora: bool = False,
) -> Path:
    """Write the export folder of `source` (run folder, checkpoint or export) to `out` with weights in `dtype`
    (a name in `DTYPES`); returns `out`. A LoRA fine-tune's adapters are merged into their towers' weights when
    `merge_lora`, else written as peft folders in `out/lora/<modality>` (`write_lora`)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder; choose a new one (nothing written)")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    model, processor, recipe, folder = load_trained(source)
    if merge_lora and not lora_towers(model.base_model):
        raise UserError(f"--merge-lora: {folder} has no LoRA adapters to merge (leave the flag out)")
    if merge_lora:
        unload_lora(model.base_model, merge=True)
    model = model.to(DTYPES[dtype])
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, max_shard_size=max_shard_size)
    processor.save_pretrained(staging)
    card = model_card(model, recipe, folder, towers, license)
    write_lora(model.base_model, staging / LORA_FOLDER)
    if towers:
        for modality in MODALITIES:  # a classifier's towers are those of its joint model (its base_model)
            write_tower(model.base_model, processor, modality, staging / modality)
    (staging / "README.md").write_text(card)
    if out.exists():
        out.rmdir()
    staging.rename(out)
    logger.info("exported %s to %s%s", folder, out, " (with one folder per tower)" if towers else "")
    if push_to_hub:
        _push(out, push_to_hub)
    return out


def write_lora(model: ZidongModel, folder: Path) -> None:
    """Each tower's LoRA adapter as a peft folder `folder/<modality>` that `PeftModel.from_pretrained` loads onto
    the tower `--towers` writes; the towers are left without adapters, their base weights as they were."""
    specs = dict(model.config.lora or {})
    weights = {modality: adapter_weights(model.towers()[modality]) for modality in specs}
    unload_lora(model, merge=False)
    for modality, spec in specs.items():
        tower = copy.deepcopy(model.towers()[modality])  # peft wraps the tower it is given
        write_adapter(tower, spec, weights[modality], folder / modality)


def write_tower(model: ZidongModel, processor: ZidongProcessor, modality: str, folder: Path) -> None:
    """One tower as a stock transformers folder + its preprocessor + the projection into the shared space. A tower
    loaded from a pretrained checkpoint is written with the weights zidong kept but never used (its pooler), so
    it comes out as it went in."""
    tower = model.towers()[modality]
    tower.save_pretrained(folder, state_dict={**tower.state_dict(), **model.kept_tower_weights.of(modality)})
    if modality == "text":
        processor.tokenizer.save_pretrained(folder)
    elif modality == "vision":
        processor.image_processor.save_pretrained(folder)
    else:
        speech_feature_extractor(model).save_pretrained(folder)
    _drop_processor_class(folder)
    projection = getattr(model, f"{modality}_projection").weight.detach().contiguous()
    save_file({"weight": projection}, folder / PROJECTION_FILE, metadata={"format": "pt"})
    if modality == "text":
        limit = getattr(model.config.text_config, "max_position_embeddings", None) or SENTENCE_LENGTH
        write_sentence_transformers_files(folder, projection, min(limit, SENTENCE_LENGTH))
    (folder / "README.md").write_text(tower_card(model, modality))


def _drop_processor_class(folder: Path) -> None:
    """A preprocessor that came out of the joint processor names it (`processor_class: ZidongProcessor`), which
    sends `AutoProcessor` (sentence-transformers loads a folder with it) to a class the plain tower lacks."""
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file():
            settings = json.loads(path.read_text())
            if settings.pop("processor_class", None) is not None:
                path.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def speech_feature_extractor(model: ZidongModel):
    """The stock extractor that feeds the speech tower what zidong's front end computes: w2v-BERT-style
    filterbank steps (SeamlessM4TFeatureExtractor; equal to zidong's to ~1e-4) or the raw 16 kHz waveform."""
    config = model.config
    if model.speech_model.main_input_name == "input_features":
        return SeamlessM4TFeatureExtractor(
            feature_size=config.num_mel_bins,
            num_mel_bins=config.num_mel_bins,
            sampling_rate=config.sampling_rate,
            stride=config.speech_frame_stack,
        )
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=config.sampling_rate,
        padding_value=0.0,
        do_normalize=False,
        return_attention_mask=True,
    )


def _push(folder: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="zidong export")
    except Exception as err:  # network, authentication, permissions: the local export is complete either way
        raise UserError(
            f"the export in {folder} is complete, but uploading it to {repo} failed ({err}); log in with "
            "`huggingface-cli login` and retry, or upload the folder yourself"
        ) from None
    logger.info("uploaded %s to https://huggingface.co/%s", folder, repo)
