"""A vision tower is pooled as its architecture means: by its own pooler where it keeps one (CLIP's post-layernorm
class token, SigLIP's attention head), by its class token where zidong builds it without its dense pooler (ViT),
by the mean of its tokens where it has no class token (Swin). Each is checked against the stock transformers
model with the same weights, and the exported tower's model card computes the same embedding."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
    SwinConfig,
    SwinModel,
    ViTConfig,
    ViTModel,
)

from tests.tiny_model import tiny_config, word_tokenizer
from zidong.export.folders import write_tower
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.models.zidong.processing_zidong import ZidongProcessor

SMALL = {"image_size": 64, "patch_size": 16, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
SMALL_MLP = {**SMALL, "intermediate_size": 64}
SWIN = {"image_size": 64, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}

# model_type -> (its fields, the stock class and config, the pooling zidong uses, the stock output that is it)
TOWERS = {
    "vit": (SMALL_MLP, ViTModel, ViTConfig, "cls", lambda out: out.last_hidden_state[:, 0]),
    "clip_vision_model": (SMALL_MLP, CLIPVisionModel, CLIPVisionConfig, "pooler", lambda out: out.pooler_output),
    "siglip_vision_model": (SMALL_MLP, SiglipVisionModel, SiglipVisionConfig, "pooler", lambda out: out.pooler_output),
    "swin": (SWIN, SwinModel, SwinConfig, "mean", lambda out: out.pooler_output),  # Swin's own pooler: the mean
}


def joint_model(model_type: str) -> ZidongModel:
    torch.manual_seed(0)
    fields = TOWERS[model_type][0]
    return ZidongModel(tiny_config(vision={"model_type": model_type, **fields})).eval()


@pytest.mark.parametrize("model_type", list(TOWERS))
def test_the_pooled_state_is_the_stock_models_own(model_type: str) -> None:
    fields, stock_class, config_class, pooling, stock_pooled = TOWERS[model_type]
    model = joint_model(model_type)
    assert model.vision_pooling == pooling
    # the stock model with its own pooler (built with it where it has the switch) and the joint tower's weights
    stock = stock_class(config_class(**fields)).eval()
    missing, unexpected = stock.load_state_dict(model.vision_model.state_dict(), strict=False)
    assert not unexpected
    assert all(key.startswith("pooler.dense") for key in missing), missing  # ViT's dense pooler, never used
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = stock_pooled(stock(pixel_values=pixels))
        pooled = model.encode_vision(pixels).pooled
        features = model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)
    projected = torch.nn.functional.normalize(expected @ model.vision_projection.weight.T, dim=-1)
    torch.testing.assert_close(features, projected, rtol=0, atol=1e-6)


def test_a_siglip_tower_without_its_head_is_pooled_by_the_mean_of_its_tokens() -> None:
    torch.manual_seed(0)
    vision = {"model_type": "siglip_vision_model", **SMALL_MLP, "vision_use_head": False}
    model = ZidongModel(tiny_config(vision=vision)).eval()
    assert model.vision_pooling == "mean"
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = model.vision_model(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(model.encode_vision(pixels).pooled, states.mean(dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["clip_vision_model", "swin"])
def test_the_exported_towers_card_pools_as_the_joint_model(model_type: str, tmp_path: Path) -> None:
    model = joint_model(model_type)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), pad_token="[PAD]")
    processor = ZidongProcessor.for_model(model.config, tokenizer)
    write_tower(model, processor, "vision", tmp_path / "vision")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    card = (tmp_path / "vision" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)  # the card's own code, as a user would copy it
    scope = {"FOLDER": str(tmp_path / "vision"), "image": image}
    exec(code, scope, scope)
    assert type(AutoModel.from_pretrained(tmp_path / "vision")) is TOWERS[model_type][1]
    with torch.no_grad():
        joint = model.get_image_features(**processor(images=[image], return_tensors="pt")).pooler_output
    torch.testing.assert_close(scope["embedding"], joint, rtol=0, atol=1e-6)


def test_only_a_class_whose_output_has_a_pooler_output_is_pooled_by_it() -> None:
    from transformers import ViTMAEModel

    from zidong.models.zidong.towers_zidong import returns_pooler_output

    assert returns_pooler_output(CLIPVisionModel)
    assert returns_pooler_output(SiglipVisionModel)
    assert not returns_pooler_output(ViTMAEModel)  # ViTMAEModelOutput: states, mask, ids, no pooler_output

    class Unannotated(ViTModel):
        def forward(self, pixel_values):  # no return annotation, on purpose
            return super().forward(pixel_values)

    assert not returns_pooler_output(Unannotated)
