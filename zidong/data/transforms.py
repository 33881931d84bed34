"""What happens to a sample between the shard and the model: measure, decode + augment, collate.

`SamplePipeline.decode` turns the stored bytes of one sample into a caption string, an RGB image and a float32
16 kHz waveform: training draws a random-resized crop and a random window of over-long audio; evaluation takes
the centre square and the head of the audio. The randomness comes from a generator the stream seeds per sample,
so a resumed stream crops exactly as the uninterrupted one. `collate` pads decoded samples into the inputs of
`ZidongModel.forward` with the same processor an exported model ships, so training and inference share one
tokenizer, one resize/normalise and one waveform padding. `lengths` gives the bucketing key from the metadata
and the caption alone, without decoding image or audio.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import soundfile
import torch
from PIL import Image

from zidong.data.labels import LabelSet
from zidong.data.shards import RawSample, SampleError
from zidong.models.zidong.configuration_zidong import MODALITIES

IMAGE_EXTENSIONS = ("jpg", "png")
# the tensors of a collated batch that hold only the rows of the samples that have the modality
MODALITY_TENSORS = {
    "text": ("input_ids", "text_attention_mask"),
    "vision": ("pixel_values",),
    "speech": ("input_values", "speech_attention_mask"),
}
PADDING_MASKS = {"text": "text_attention_mask", "speech": "speech_attention_mask"}


@dataclass(frozen=True)
class DecodedSample:
    """One sample ready for the processor; a modality the sample lacks is None."""

    text: str | None
    image: Image.Image | None
    audio: np.ndarray | None
    label: int = -1  # class index under the pipeline's label set; -1 without one


@dataclass(frozen=True)
class SamplePipeline:
    """Everything the stream does to samples: measure, decode + augment, collate.

    Args:
        processor: a `ZidongProcessor` (tokenizer, image processor, waveform feature extractor).
        train: random-resized crop and random audio window (True), or centre crop and audio head (False).
        max_text_tokens: captions are truncated to this many tokens (special tokens included).
        max_speech_seconds: longer audio is cut to this length.
        crop_scale: range of the crop's area as a fraction of the image (training only).
        crop_ratio: range of the crop's aspect ratio (training only).
        modalities: the modalities read; the others count as absent (fine-tuning one pair or one tower).
        label_set: when given, each sample's class index (-1 if it has none) is collated as `labels`.
    """

    processor: Any
    train: bool
    max_text_tokens: int = 64
    max_speech_seconds: float = 15.0
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    modalities: tuple[str, ...] = MODALITIES
    label_set: LabelSet | None = None

    # members `lengths` needs besides the metadata: the stream reads only these to form a bucketing pool
    LENGTH_MEMBERS: ClassVar[tuple[str, ...]] = ("txt",)

    @property
    def sampling_rate(self) -> int:
        return self.processor.feature_extractor.sampling_rate

    def lengths(self, raw: RawSample) -> tuple[float, float]:
        """(speech seconds, text tokens) after the caps, -1 for an absent modality: the bucketing key."""
        modalities = self._modalities(raw)
        speech = min(raw.meta["audio_seconds"], self.max_speech_seconds) if "speech" in modalities else -1.0
        text = -1.0
        if "text" in modalities:
            with _naming(raw):
                caption = self._text(raw)
            tokens = self.processor.tokenizer(caption, truncation=True, max_length=self.max_text_tokens)
            text = float(len(tokens["input_ids"]))
        return speech, text

    def decode(self, raw: RawSample, rng: np.random.Generator) -> DecodedSample:
        """Decode one stored sample; raises SampleError (naming shard and key) when a listed member is bad."""
        modalities = self._modalities(raw)
        label = -1
        if self.label_set is not None:
            name = self.label_set.label_of(raw.meta)
            label = -1 if name is None else list(self.label_set.classes).index(name)
        with _naming(raw):
            return DecodedSample(
                text=self._text(raw) if "text" in modalities else None,
                image=self._image(raw, rng) if "vision" in modalities else None,
                audio=self._audio(raw, rng) if "speech" in modalities else None,
                label=label,
            )

    def _modalities(self, raw: RawSample) -> list[str]:
        return [m for m in raw.meta["modalities"] if m in self.modalities]

    def collate(self, samples: list[DecodedSample]) -> dict[str, Any]:
        """Pad decoded samples into the inputs of `ZidongModel.forward`."""
        batch = self.processor(
            text=[sample.text for sample in samples],
            images=[sample.image for sample in samples],
            audio=[sample.audio for sample in samples],
            sampling_rate=self.sampling_rate,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        if self.label_set is not None:
            batch["labels"] = torch.tensor([sample.label for sample in samples])
        return dict(batch)

    def _text(self, raw: RawSample) -> str:
        try:
            text = _member(raw, ("txt",)).decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleError(f"text is not UTF-8 ({err.reason})") from None
        if not text.strip():
            raise SampleError("empty text")
        return text

    def _image(self, raw: RawSample, rng: np.random.Generator) -> Image.Image:
        try:
            with Image.open(io.BytesIO(_member(raw, IMAGE_EXTENSIONS))) as opened:
                image = opened.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise SampleError(f"image does not decode ({err})") from None
        box = self._random_box(image.size, rng) if self.train else centre_square(image.size)
        return image.crop(box)

    def _random_box(self, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A crop of random area and aspect ratio (the Inception-style crop); centre square if none fits."""
        width, height = size
        log_ratio = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(10):
            area = width * height * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(*log_ratio))
            crop_width = round(math.sqrt(area * ratio))
            crop_height = round(math.sqrt(area / ratio))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                left = int(rng.integers(0, width - crop_width + 1))
                top = int(rng.integers(0, height - crop_height + 1))
                return left, top, left + crop_width, top + crop_height
        return centre_square(size)

    def _audio(self, raw: RawSample, rng: np.random.Generator) -> np.ndarray:
        try:
            waveform, rate = soundfile.read(io.BytesIO(_member(raw, ("flac",))), dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError) as err:
            raise SampleError(f"audio does not decode ({err})") from None
        if rate != self.sampling_rate or waveform.shape[1] != 1 or waveform.shape[0] == 0:
            raise SampleError(
                f"audio is {waveform.shape[1]}-channel {rate} Hz with {waveform.shape[0]} samples; the builder "
                f"writes non-empty mono {self.sampling_rate} Hz"
            )
        waveform = waveform[:, 0]
        limit = int(self.max_speech_seconds * self.sampling_rate)
        if len(waveform) > limit:
            start = int(rng.integers(0, len(waveform) - limit + 1)) if self.train else 0
            waveform = waveform[start : start + limit]
        return waveform


@contextlib.contextmanager
def _naming(raw: RawSample) -> Iterator[None]:
    """Prefix a SampleError raised inside with the sample's shard and key."""
    try:
        yield
    except SampleError as err:
        raise SampleError(f"{raw.shard} key {raw.key}: {err}") from None


def _member(raw: RawSample, extensions: tuple[str, ...]) -> bytes:
    for extension in extensions:
        if extension in raw.files:
            return raw.files[extension]
    raise SampleError(f"no {'/'.join(extensions)} member although the metadata lists the modality")


def centre_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def split_rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Samples `start:stop` of a collated batch, as `collate` would have made them alone (one process's share
    of a global batch, or one micro-batch): per-modality tensors keep the rows of those samples that have the
    modality, and text and audio are cut to the longest kept row."""
    part: dict[str, torch.Tensor] = {}
    for modality, names in MODALITY_TENSORS.items():
        present = batch[f"{modality}_present"]
        first, count = int(present[:start].sum()), int(present[start:stop].sum())
        part[f"{modality}_present"] = present[start:stop]
        if not count:
            continue
        rows = {name: batch[name][first : first + count] for name in names if name in batch}
        mask = rows.get(PADDING_MASKS.get(modality, ""))
        if mask is not None:  # drop the padding only longer rows of other samples needed
            longest = int(mask.sum(dim=1).max())
            rows = {name: tensor[:, :longest] for name, tensor in rows.items()}
        part.update(rows)
    if "labels" in batch:
        part["labels"] = batch["labels"][start:stop]
    return part
