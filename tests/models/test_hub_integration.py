"""Hugging Face citizenship: processor, Auto classes, trust_remote_code in a process without zidong, towers from
local checkpoints, clear errors for unusable tower folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTModel,
)

import zidong
from tests.tiny_model import make_inputs, tiny_config
from zidong.models.zidong import ZidongForClassification
from zidong.models.zidong.configuration_zidong import MODALITIES

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "two", "三", "个", "圆"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]", model_max_length=16
    )


@pytest.fixture(scope="module")
def processor() -> zidong.ZidongProcessor:
    return zidong.ZidongProcessor.for_model(tiny_config(), tiny_tokenizer())


def image(color: tuple[int, int, int]) -> Image.Image:
    return Image.fromarray(np.full((48, 80, 3), color, dtype=np.uint8))


def test_processor_handles_missing_entries(processor: zidong.ZidongProcessor) -> None:
    waveform = np.sin(np.linspace(0, 400, 8000)).astype(np.float32)
    inputs = processor(
        text=["a red circle", None, "two blue square"],
        images=[image((255, 0, 0)), image((0, 0, 255)), None],
        audio=[None, waveform, waveform[:4000]],
        sampling_rate=16000,
        return_tensors="pt",
    )
    assert inputs["text_present"].tolist() == [True, False, True]
    assert inputs["vision_present"].tolist() == [True, True, False]
    assert inputs["speech_present"].tolist() == [False, True, True]
    assert inputs["input_ids"].tolist()[0][:3] == [5, 6, 8]
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    assert inputs["input_values"].shape == (2, 8000)
    assert inputs["speech_attention_mask"].sum(dim=1).tolist() == [8000, 4000]
    model = zidong.ZidongModel(tiny_config(text={"vocab_size": len(WORDS)})).eval()
    with torch.no_grad():
        out = model(**inputs)
    assert out.text_embeds.shape == (3, 128)
    assert out.speech_embeds[0].abs().sum() == 0  # sample 0 has no audio


def test_processor_rejects_lists_of_different_lengths(processor: zidong.ZidongProcessor) -> None:
    with pytest.raises(ValueError, match=r"same samples.*text 2, vision 1"):
        processor(text=["a", "red"], images=[image((0, 0, 0))])
    with pytest.raises(ValueError, match="at least one of"):
        processor()


def test_clip_style_keyword_names_are_honoured_and_unknown_ones_refused(processor: zidong.ZidongProcessor) -> None:
    torch.manual_seed(0)
    model = zidong.ZidongModel(tiny_config(text={"vocab_size": len(WORDS)})).eval()
    tokens = processor.tokenizer(["a red circle", "two blue square square square"], padding=True, return_tensors="pt")
    assert tokens["attention_mask"][0].tolist()[-1] == 0  # the first caption is padded
    with torch.no_grad():
        clip_style = model(**tokens).text_embeds  # input_ids, attention_mask (and zero token_type_ids, if any)
        ours = model(input_ids=tokens["input_ids"], text_attention_mask=tokens["attention_mask"]).text_embeds
        unmasked = model(input_ids=tokens["input_ids"]).text_embeds
    torch.testing.assert_close(clip_style, ours, rtol=0, atol=0)
    assert not torch.allclose(clip_style[0], unmasked[0])  # the mask was really used
    with pytest.raises(TypeError, match="atention_mask"):
        model(input_ids=tokens["input_ids"], atention_mask=tokens["attention_mask"])
    with pytest.raises(TypeError, match="attention_mask and text_attention_mask"):
        model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            text_attention_mask=tokens["attention_mask"],
        )
    with pytest.raises(ValueError, match="token_type_ids"):
        model(input_ids=tokens["input_ids"], token_type_ids=torch.ones_like(tokens["input_ids"]))
    classifier = ZidongForClassification(
        tiny_config(
            text={"vocab_size": len(WORDS)},
            classification_modality="text",
            id2label={0: "a", 1: "b"},
        )
    ).eval()
    with torch.no_grad():
        logits = classifier(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).logits
        expected = classifier(input_ids=tokens["input_ids"], text_attention_mask=tokens["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="pixel_value"):
        classifier(input_ids=tokens["input_ids"], pixel_value=torch.zeros(2, 3, 64, 64))
    with pytest.raises(TypeError, match="imgs"):
        processor(text=["a red circle"], imgs=[image((0, 0, 0))])
    padded = processor(text=["a", "red circle"], padding="max_length", max_length=6)
    assert padded["input_ids"].shape == (2, 6)


def test_auto_classes_know_zidong(tmp_path: Path, processor: zidong.ZidongProcessor) -> None:
    torch.manual_seed(0)
    model = zidong.ZidongModel(tiny_config())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), zidong.ZidongConfig)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(reloaded, zidong.ZidongModel)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), zidong.ZidongProcessor)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


REMOTE_CODE_CHECK = textwrap.dedent(
    """
    import importlib.abc, sys, torch

    class NoZidong(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "zidong" or name.startswith("zidong."):
                raise ImportError("zidong is not installed in this process")

    sys.meta_path.insert(0, NoZidong())
    from transformers import AutoModel, AutoProcessor

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert not any(name.startswith("zidong") for name in sys.modules)
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        out = model(**inputs)
    torch.save({m: getattr(out, m + "_embeds") for m in ("text", "vision", "speech")}, folder + "/remote.pt")
    print("OK", type(processor).__name__)
    """
)


def test_trust_remote_code_loads_where_zidong_is_not_installed(
    tmp_path: Path, processor: zidong.ZidongProcessor
) -> None:
    torch.manual_seed(0)
    model = zidong.ZidongModel(tiny_config()).eval()
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"].endswith("ZidongModel")
    inputs = make_inputs({m: [True, True] for m in MODALITIES}, seed=9)
    torch.save(inputs, folder / "inputs.pt")
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_CHECK, str(folder)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK ZidongProcessor" in result.stdout
    remote = torch.load(folder / "remote.pt")
    with torch.no_grad():
        local = model(**inputs)
    for modality in MODALITIES:
        assert torch.equal(remote[modality], getattr(local, f"{modality}_embeds")), modality


def test_towers_from_local_checkpoints_reproduce_them(tmp_path: Path) -> None:
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                intermediate_size=96), add_pooling_layer=False).eval()  # fmt: skip
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                             intermediate_size=96), add_pooling_layer=False).eval()  # fmt: skip
    bert.save_pretrained(tmp_path / "text")
    vit.save_pretrained(tmp_path / "vision")
    tiny_tokenizer().save_pretrained(tmp_path / "text")
    model = zidong.ZidongModel.from_pretrained_towers(
        "tiny", text=tmp_path / "text", vision=tmp_path / "vision", mask_token_id=4
    ).eval()
    assert model.config.text_config.hidden_size == 48
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            model.encode_text(ids, mask).token_states, bert(input_ids=ids, attention_mask=mask).last_hidden_state
        )
        assert torch.equal(model.encode_vision(pixels).token_states, vit(pixel_values=pixels).last_hidden_state)
    processor = zidong.ZidongProcessor.for_model(model.config, tmp_path / "text")  # the tower's own tokenizer
    assert processor.tokenizer.convert_tokens_to_ids("circle") == WORDS.index("circle")
    assert processor(images=[image((1, 2, 3))])["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda folder: None, "model.text.pretrained: .* is not a folder"),
        (lambda folder: folder.mkdir(), "holds no config.json"),
        (lambda folder: BertConfig().save_pretrained(folder), "holds no model weights"),
    ],
    ids=["missing", "empty", "config-only"],
)
def test_unusable_tower_folder_is_named(tmp_path: Path, prepare, message: str) -> None:
    folder = tmp_path / "bert"
    prepare(folder)
    with pytest.raises(ValueError, match=message):
        zidong.ZidongModel.from_pretrained_towers("tiny", text=folder)
