"""The tiny model the model and training tests share: its config, random inputs for any presence pattern, and
a processor's inputs for three real-looking samples."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from zidong.models.zidong.configuration_zidong import ZidongConfig
from zidong.models.zidong.modeling_zidong import MODALITIES, OBJECTIVES

VOCAB = 500
MASK_TOKEN = 4
ALL_OBJECTIVES = dict.fromkeys(OBJECTIVES, 1.0)


def tiny_config(text: dict | None = None, **overrides) -> ZidongConfig:
    """The tiny preset; `text` / `vision` / `speech` override fields of the preset's tower (a `*_config` dict
    replaces the whole tower config with that architecture's defaults, full size)."""
    overrides = {"mask_token_id": MASK_TOKEN, **overrides}
    text = {"vocab_size": VOCAB, "pad_token_id": 0, **(text or {})}
    return ZidongConfig.from_preset("tiny", text=text, **overrides)


def make_inputs(present: dict[str, list[bool]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for the rows marked present, with ragged text and speech lengths."""
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    count = {m: sum(present[m]) for m in MODALITIES}
    if count["text"]:
        inputs["input_ids"] = torch.randint(MASK_TOKEN + 1, VOCAB, (count["text"], 16), generator=generator)
        mask = torch.ones(count["text"], 16, dtype=torch.long)
        mask[0, 10:] = 0
        inputs["text_attention_mask"] = mask
    if count["vision"]:
        inputs["pixel_values"] = torch.randn(count["vision"], 3, 64, 64, generator=generator)
    if count["speech"]:
        inputs["input_values"] = torch.randn(count["speech"], 16000, generator=generator) * 0.1
        mask = torch.ones(count["speech"], 16000, dtype=torch.long)
        mask[0, 9000:] = 0
        inputs["speech_attention_mask"] = mask
    for modality in MODALITIES:
        inputs[f"{modality}_present"] = torch.tensor(present[modality])
    return inputs


def sample_inputs(processor) -> dict[str, torch.Tensor]:
    """Three samples with text, an image and audio of different lengths, through `processor`."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    audio = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 9000, 12345)]
    text = ["a red circle", "两个蓝色的方块", "three small green triangles"]
    return processor(text=text, images=images, audio=audio, sampling_rate=16000, return_tensors="pt")


def word_tokenizer():
    """A three-word WordLevel tokenizer (pad, unknown, "red"): enough for a processor in a test."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "red": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@contextlib.contextmanager
def in_lockstep(model: torch.nn.Module, lockstep: bool = True) -> Iterator[torch.nn.Module]:
    """`model` prepared for lockstep (as the trainer prepares it for DeepSpeed and FSDP2) inside the block."""
    model.prepare_for_launcher(lockstep=lockstep)
    try:
        yield model
    finally:
        model.prepare_for_launcher()
