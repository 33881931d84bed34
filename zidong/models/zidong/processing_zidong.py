"""`ZidongProcessor`: tokenizer + image processor + speech feature extractor, called like CLIP/CLAP processors.

    processor = ZidongProcessor(tokenizer, image_processor, ZidongFeatureExtractor())
    inputs = processor(text=["a red circle", None], images=[image, image], audio=[None, waveform],
                       sampling_rate=16000, return_tensors="pt")
    outputs = model(**inputs)

A list may hold `None` for a sample that lacks that modality; a modality left out altogether is absent for
every sample. The result carries only the present rows of each modality plus `text_present`, `vision_present`
and `speech_present` (batch,) masks, the layout `ZidongModel.forward` takes.

Imports only transformers (and numpy) so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from .configuration_zidong import MODALITIES
from .feature_extraction_zidong import ZidongFeatureExtractor


class ZidongProcessor(ProcessorMixin):
    def __init__(self, tokenizer=None, image_processor=None, feature_extractor=None, **kwargs):
        super().__init__(tokenizer, image_processor, feature_extractor, **kwargs)

    @classmethod
    def for_model(cls, config, tokenizer, vision_folder: str | os.PathLike | None = None) -> ZidongProcessor:
        """The processor matching a `ZidongConfig`: `tokenizer` (an object, or a folder such as the pretrained text
        tower's, whose tokenizer then comes with it); the image processor of `vision_folder` when it has one,
        else resize to the vision tower's input size with mean/std 0.5; the 16 kHz waveform feature extractor."""
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if vision_folder is not None and os.path.isfile(os.path.join(vision_folder, "preprocessor_config.json")):
            image_processor = AutoImageProcessor.from_pretrained(vision_folder)
        else:
            size = getattr(config.vision_config, "image_size", 224)
            image_processor = ViTImageProcessorPil(size={"height": size, "width": size})
        return cls(tokenizer, image_processor, ZidongFeatureExtractor(sampling_rate=config.sampling_rate))

    def __call__(
        self,
        text: str | list[str | None] | None = None,
        images: Any = None,
        audio: Any = None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        max_length: int | None = None,
        padding: bool | str = True,
        truncation: bool = True,
    ) -> BatchFeature:
        """Tokenise, resize/normalise and pad the given modalities of one batch.

        `padding` and `truncation` apply to the text (as the tokenizer takes them; the batch is always padded to
        one length); audio is padded to the longest clip. An unknown keyword argument raises TypeError.
        Raises ValueError when the lists disagree on the batch size or no modality is given.
        """
        columns = {
            "text": [text] if isinstance(text, str) else text,
            "vision": images if isinstance(images, list | tuple) or images is None else [images],
            "speech": audio if isinstance(audio, list | tuple) or audio is None else [audio],
        }
        sizes = {name: len(column) for name, column in columns.items() if column is not None}
        if not sizes:
            raise ValueError("give at least one of text=, images=, audio=")
        if len(set(sizes.values())) > 1:
            raise ValueError(
                "text, images and audio must list the same samples (use None for a missing one); got lengths "
                + ", ".join(f"{name} {size}" for name, size in sizes.items())
            )
        batch = next(iter(sizes.values()))
        data: dict[str, Any] = {}
        for modality, column in columns.items():
            present = np.array([item is not None for item in column or [None] * batch], dtype=bool)
            data[f"{modality}_present"] = present
            rows = [item for item in column or [] if item is not None]
            if not rows:
                continue
            if modality == "text":
                tokens = self.tokenizer(
                    rows,
                    padding=padding or True,
                    truncation=truncation,
                    max_length=max_length or self._max_text_length(),
                )
                data["input_ids"] = tokens["input_ids"]
                data["text_attention_mask"] = tokens["attention_mask"]
            elif modality == "vision":
                data["pixel_values"] = self.image_processor(images=rows, return_tensors="np")["pixel_values"]
            else:
                speech = self.feature_extractor(rows, sampling_rate=sampling_rate)
                data["input_values"] = speech["input_values"]
                data["speech_attention_mask"] = speech["attention_mask"]
        return BatchFeature(data, tensor_type=return_tensors)

    def _max_text_length(self) -> int | None:
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and limit < 1_000_000 else None

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "text_attention_mask",
            "pixel_values",
            "input_values",
            "speech_attention_mask",
            *(f"{modality}_present" for modality in MODALITIES),
        ]


__all__ = ["ZidongProcessor"]
