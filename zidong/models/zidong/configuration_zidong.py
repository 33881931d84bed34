"""`ZidongConfig`: three tower configs of any Hugging Face encoder architecture, plus the alignment settings.

    config = ZidongConfig.from_preset("tiny", text={"vocab_size": 8000})
    config = ZidongConfig(text_config={"model_type": "xlm-roberta", ...}, vision_config=ViTConfig(...).to_dict())

Each tower config is a standard transformers config (BERT/RoBERTa/XLM-R for text, ViT/CLIP-vision for vision,
w2v-BERT/HuBERT/wav2vec2 for speech); the towers are built from them with `AutoModel.from_config`. A speech
tower whose main input is `input_features` receives the model's batched filterbank stacked to 50 steps/s; one
whose main input is `input_values` receives the waveform itself.

Imports only transformers (and its hub helpers) so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

import difflib
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

CONTRASTIVE_LOSSES = ("softmax", "sigmoid")
MODALITIES = ("text", "vision", "speech")  # the one spelling and order, everywhere


# Every dropout of every tower is set, not left to the architecture's default (BERT's is 0.1, Wav2Vec2-BERT drops
# whole layers 10 % of the time): the presets train as CLIP does, without dropout. On the main job dropout 0
# aligned every pair better than those defaults (docs/training.md, "What the tiny recipe learns"), and the text
# tower's attention runs on SDPA's fused kernel without it. A recipe sets them with `model.<tower>.config`.
TEXT_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
VISION_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
SPEECH_DROPOUT = {
    "hidden_dropout": 0.0,
    "activation_dropout": 0.0,
    "attention_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "conformer_conv_dropout": 0.0,
    "layerdrop": 0.0,
    "final_dropout": 0.0,
}


def _encoder(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
    }


def _preset(
    hidden: int,
    layers: int,
    heads: int,
    speech_layers: int,
    image_size: int,
    patch_size: int,
    max_text_tokens: int,
    projection_dim: int,
    fusion_layers: int,
) -> dict[str, Any]:
    return {
        "text_config": {
            "model_type": "bert",
            "max_position_embeddings": max_text_tokens,
            **_encoder(hidden, layers, heads),
            **TEXT_DROPOUT,
        },
        "vision_config": {
            "model_type": "vit",
            "image_size": image_size,
            "patch_size": patch_size,
            **_encoder(hidden, layers, heads),
            **VISION_DROPOUT,
        },
        "speech_config": {
            "model_type": "wav2vec2-bert",
            "feature_projection_input_dim": 160,
            "position_embeddings_type": "rotary",
            "conv_depthwise_kernel_size": 15,
            "max_source_positions": 3000,
            "add_adapter": False,
            # Off: the tower's own time masking draws from numpy's RNG; SpecAugment runs on the filterbank instead.
            "apply_spec_augment": False,
            **_encoder(hidden, speech_layers, heads),
            **SPEECH_DROPOUT,
        },
        "projection_dim": projection_dim,
        "spec_augment_freq_mask": 15,  # of 80 mel bins
        "spec_augment_time_mask": 20,  # frames of 10 ms
        "fusion_hidden_size": hidden,
        "fusion_num_layers": fusion_layers,
        "fusion_num_heads": heads,
        "fusion_dropout": 0.0,
    }


# tiny: minutes on 2 CPU cores. base: ViT-B/16 and BERT-base scale. large: ViT-L/14 and BERT-large scale,
# about 1B parameters in all (the size of OPT's released model).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _preset(128, 2, 2, 2, 64, 8, max_text_tokens=128, projection_dim=128, fusion_layers=2),
    "base": _preset(768, 12, 12, 12, 224, 16, max_text_tokens=512, projection_dim=512, fusion_layers=6),
    "large": _preset(1024, 24, 16, 16, 224, 14, max_text_tokens=512, projection_dim=768, fusion_layers=6),
}


@strict
class ZidongConfig(PreTrainedConfig):
    r"""
    text_config, vision_config, speech_config (`dict` or `PreTrainedConfig`):
        Configs of the three towers; a dict names its architecture with `model_type`.
    projection_dim (`int`): width of the shared embedding space.
    logit_scale_init_value / logit_scale_max (`float`): initial and largest log inverse temperature.
    contrastive_loss (`str`): "softmax" (InfoNCE, CLIP-style) or "sigmoid" (SigLIP-style).
    logit_bias_init_value (`float`): initial bias of the sigmoid loss.
    sampling_rate, num_mel_bins, speech_frame_stack: the speech front end (16 kHz, 80 mel bins, 2 frames per
        step = 50 steps per second).
    speech_chunk_rows (`int`): run the speech tower over a batch's rows sorted by length, this many rows a call,
        each call padded only to its own longest row (0: one call over every row, padded to the longest). Pays
        where batches are drawn without length bucketing (`data.bucket_pool: 0`); numerically the same embeddings.
    spec_augment_freq_mask, spec_augment_time_mask (`int`): widest frequency / time mask SpecAugment applies
        in training (0 switches that mask off).
    initializer_range (`float`): std of the normal init of the projections and fusion weights.
    fusion_hidden_size, fusion_num_layers, fusion_num_heads, fusion_intermediate_size (default 4 x hidden),
        fusion_dropout, layer_norm_eps: the fusion encoder over the concatenated token streams.
    mask_token_id (`int`): the tokenizer's mask token, needed by masked text modelling.
    text_mask_probability (`float`): share of text tokens masked (BERT's 80/10/10 replacement).
    vision_mask_ratio (`float`): share of image patches blanked for masked vision modelling.
    speech_mask_ratio, speech_mask_span: share of 20 ms speech steps blanked, in runs of `speech_mask_span` steps.
    modality_mask_probability (`float`): chance that a multi-modal sample has one whole modality masked in the
        masked-modelling pass (the others must then predict it alone).
    classification_modality (`str`): for `ZidongForClassification`, the tower whose pooled output is classified
        into `id2label` (`text`, `vision` or `speech`).
    kept_tower_weights (`dict`): weights of pretrained towers' checkpoints that zidong builds no module for (a
        pooler), kept to be exported with the tower: modality -> weight name -> {"shape": [...], "dtype": "..."}.
        Set when pretrained towers are loaded; never by hand.
    lora (`dict`): LoRA adapters on the towers (lora_zidong.py): modality -> peft `LoraConfig` keys (`r`,
        `lora_alpha`, `lora_dropout`, `target_modules`). Set by a LoRA fine-tune (`finetune.lora`).
    """

    model_type = "zidong"
    sub_configs_defaults = {  # noqa: RUF012 (the transformers convention)
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "speech_config": SubConfigSpec(config_class=AutoConfig, model_type="wav2vec2-bert"),
    }

    text_config: PreTrainedConfig | dict | None = None
    vision_config: PreTrainedConfig | dict | None = None
    speech_config: PreTrainedConfig | dict | None = None
    projection_dim: int = 256
    logit_scale_init_value: float | int = 2.6592
    logit_scale_max: float | int = 4.6052
    contrastive_loss: str = "softmax"
    logit_bias_init_value: float | int = -10.0
    sampling_rate: int = 16000
    num_mel_bins: int = 80
    speech_frame_stack: int = 2
    speech_chunk_rows: int = 0
    spec_augment_freq_mask: int = 0
    spec_augment_time_mask: int = 0
    initializer_range: float = 0.02
    fusion_hidden_size: int = 256
    fusion_num_layers: int = 2
    fusion_num_heads: int = 4
    fusion_intermediate_size: int | None = None
    fusion_dropout: float | int = 0.0
    layer_norm_eps: float = 1e-6
    mask_token_id: int | None = None
    text_mask_probability: float | int = 0.15
    vision_mask_ratio: float | int = 0.5
    speech_mask_ratio: float | int = 0.3
    speech_mask_span: int = 5
    modality_mask_probability: float | int = 0.1
    classification_modality: str | None = None
    kept_tower_weights: dict | None = None
    lora: dict | None = None

    def __post_init__(self, **kwargs):
        for name in self.sub_configs_defaults:
            tower = getattr(self, name)
            model_type = tower.get("model_type") if isinstance(tower, dict) else None
            if model_type is not None and model_type not in CONFIG_MAPPING:
                near = difflib.get_close_matches(model_type, list(CONFIG_MAPPING), n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                raise ValueError(
                    f"ZidongConfig.{name}.model_type {model_type!r} is not a transformers architecture{hint}"
                )
        super().__post_init__(**kwargs)
        if self.contrastive_loss not in CONTRASTIVE_LOSSES:
            raise ValueError(
                f"ZidongConfig.contrastive_loss must be one of {', '.join(CONTRASTIVE_LOSSES)}, "
                f"got {self.contrastive_loss!r}"
            )
        if self.fusion_intermediate_size is None:
            self.fusion_intermediate_size = 4 * self.fusion_hidden_size
        for name in (
            "projection_dim",
            "sampling_rate",
            "num_mel_bins",
            "speech_frame_stack",
            "fusion_hidden_size",
            "fusion_num_layers",
            "fusion_num_heads",
            "fusion_intermediate_size",
            "speech_mask_span",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ZidongConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.fusion_hidden_size % self.fusion_num_heads:
            raise ValueError(
                f"ZidongConfig.fusion_hidden_size ({self.fusion_hidden_size}) must be a multiple of "
                f"fusion_num_heads ({self.fusion_num_heads})"
            )
        for name in (
            "fusion_dropout",
            "text_mask_probability",
            "vision_mask_ratio",
            "speech_mask_ratio",
            "modality_mask_probability",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"ZidongConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("spec_augment_freq_mask", "spec_augment_time_mask", "speech_chunk_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"ZidongConfig.{name} must be 0 or more, got {getattr(self, name)}")
        if self.logit_scale_init_value > self.logit_scale_max:
            raise ValueError(
                f"ZidongConfig.logit_scale_init_value ({self.logit_scale_init_value}) is above "
                f"logit_scale_max ({self.logit_scale_max})"
            )
        if self.classification_modality is not None and self.classification_modality not in MODALITIES:
            raise ValueError(
                f"ZidongConfig.classification_modality must be one of {', '.join(MODALITIES)}, "
                f"got {self.classification_modality!r}"
            )
        speech_input_dim = getattr(self.speech_config, "feature_projection_input_dim", None)
        expected = self.num_mel_bins * self.speech_frame_stack
        if speech_input_dim is not None and speech_input_dim != expected:
            raise ValueError(
                f"speech_config.feature_projection_input_dim is {speech_input_dim} but the front end produces "
                f"num_mel_bins x speech_frame_stack = {self.num_mel_bins} x {self.speech_frame_stack} = {expected}"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ZidongConfig:
        """The from-scratch config `tiny`, `base` or `large`; keyword arguments replace top-level fields, and
        `text`/`vision`/`speech` dicts update the matching tower config (e.g. `text={"vocab_size": 8000}`); a dict
        naming another `model_type` replaces the preset's tower config (e.g. a ConvNeXt vision tower)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = {key: dict(value) if isinstance(value, dict) else value for key, value in PRESETS[name].items()}
        for modality in ("text", "vision", "speech"):
            tower = dict(overrides.pop(modality, {}))
            preset_tower = fields[f"{modality}_config"]
            if tower.get("model_type", preset_tower["model_type"]) == preset_tower["model_type"]:
                tower = {**preset_tower, **tower}
            fields[f"{modality}_config"] = tower
        return cls(**{**fields, **overrides})


__all__ = ["ZidongConfig"]
