"""A convolutional vision tower (ConvNeXt): built from a preset override, pooled by the tower's own pooler,
exported as a plain transformers folder whose model card's code gives the joint model's embeddings, counted in
model FLOPs, and refused by masked vision modelling with a message."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, ConvNextConfig, ConvNextModel, PreTrainedTokenizerFast

from tests.tiny_model import make_inputs, tiny_config, word_tokenizer
from zidong.export.folders import write_tower
from zidong.models.zidong.masking_zidong import mask_vision
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.models.zidong.tower_inputs_zidong import convolutional_forward_flops
from zidong.models.zidong.towers_zidong import is_convolutional, tower_attention, vision_patch_size
from zidong.train.flops import StepFlops

CONVNEXT = {
    "model_type": "convnext",
    "image_size": 64,
    "patch_size": 4,
    "hidden_sizes": [16, 32, 48],
    "depths": [1, 1, 1],
    "num_stages": 3,
    "layer_scale_init_value": 1.0,
}


@pytest.fixture(scope="module")
def model() -> ZidongModel:
    torch.manual_seed(0)
    return ZidongModel(tiny_config(vision=CONVNEXT)).eval()


def test_another_model_type_replaces_the_preset_tower_config() -> None:
    config = tiny_config(vision=CONVNEXT).vision_config
    assert isinstance(config, ConvNextConfig)
    assert config.hidden_sizes == [16, 32, 48]
    assert not hasattr(config, "num_attention_heads")  # nothing of the preset's ViT was merged in
    assert is_convolutional(config)
    assert not is_convolutional(tiny_config().vision_config)
    # the same model type still updates the preset's keys
    assert tiny_config(vision={"num_hidden_layers": 3}).vision_config.hidden_size == 128


def test_the_tower_pools_with_its_own_pooler_and_hands_on_its_feature_map(model: ZidongModel) -> None:
    assert tower_attention(model.config, "vision") == "eager"  # ConvNeXt has no SDPA
    assert model.vision_head is None
    assert vision_patch_size(model.config) is None
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    # an independent ConvNextModel with the same weights
    reference = ConvNextModel(ConvNextConfig(**{k: v for k, v in CONVNEXT.items() if k != "model_type"})).eval()
    reference.load_state_dict(model.vision_model.state_dict())
    with torch.no_grad():
        expected = reference(pixel_values=pixels)
        encoded = model.encode_vision(pixels)
        features = model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(encoded.pooled, expected.pooler_output, rtol=0, atol=0)
    # 64 px / (4 x 2 x 2) = 4 x 4 positions, 48 channels each
    assert encoded.token_states.shape == (3, 16, 48)
    torch.testing.assert_close(encoded.token_states, expected.last_hidden_state.flatten(2).transpose(1, 2))
    projected = torch.nn.functional.normalize(expected.pooler_output @ model.vision_projection.weight.T, dim=-1)
    torch.testing.assert_close(features, projected, rtol=0, atol=1e-6)


def test_every_objective_but_masked_vision_trains_it() -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config(vision=CONVNEXT))
    present = {"text": [True, True, True, False], "vision": [True, True, False, True], "speech": [True] * 4}
    weights = {"contrastive": 1.0, "matching": 1.0, "masked_text": 1.0, "masked_speech": 1.0}
    output = model(**make_inputs(present), return_loss=True, loss_weights=weights)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_model.parameters())
    with pytest.raises(ValueError, match="convnext vision tower is convolutional; set its loss weight to 0"):
        mask_vision(model, torch.randn(2, 3, 64, 64), None, torch.zeros(2, dtype=torch.bool))


def test_forward_flops_of_a_convolution_are_counted_by_hand() -> None:
    # one stage: a 4x4 stride-4 stem (3 -> 8 channels) and one block (7x7 depthwise, 8 -> 32 -> 8 pointwise), on
    # a 16 px image: 4 x 4 positions everywhere; 2 FLOPs per multiply-add
    config = ConvNextConfig(image_size=16, patch_size=4, hidden_sizes=[8], depths=[1], num_stages=1)
    positions = 4 * 4
    multiply_adds = positions * (8 * 3 * 4 * 4 + 8 * 7 * 7 + 8 * 32 + 32 * 8)
    assert convolutional_forward_flops(config, 16, 16) == 2 * multiply_adds


def test_step_flops_count_three_forwards_of_a_trained_convolutional_tower(model: ZidongModel) -> None:
    flops = StepFlops(model)
    parameters = flops.towers["vision"][0]
    forward = convolutional_forward_flops(model.config.vision_config, 64, 64)
    tokens = round(forward / (2 * parameters))
    batch = make_inputs({"text": [False, False], "vision": [True, True], "speech": [False, False]})
    assert flops.of_batch(batch, {"contrastive": 1.0}) == 6 * parameters * 2 * tokens
    assert abs(6 * parameters * tokens - 3 * forward) <= 3 * parameters  # the rounding of `tokens` only
    assert flops.tokens_at_caps(8, (64, 64), 1.0, 16000)["vision"][0] == tokens


def test_the_exported_tower_and_its_card_give_the_joint_embeddings(model: ZidongModel, tmp_path: Path) -> None:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), pad_token="[PAD]")
    processor = ZidongProcessor.for_model(model.config, tokenizer)
    write_tower(model, processor, "vision", tmp_path / "vision")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(2)]
    # run the card's own code, as a user would copy it
    card = (tmp_path / "vision" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope = {"FOLDER": str(tmp_path / "vision"), "image": images[0]}
    exec(code.replace("images=[image]", "images=images"), {**scope, "images": images}, scope)
    assert type(AutoModel.from_pretrained(tmp_path / "vision")) is ConvNextModel
    with torch.no_grad():
        joint = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
    torch.testing.assert_close(scope["embedding"], joint, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "vision",
    [
        {"model_type": "convnextv2", "hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2},
        {
            "model_type": "resnet",
            "embedding_size": 16,
            "hidden_sizes": [16, 32],
            "depths": [1, 1],
            "layer_type": "basic",
        },
        {"model_type": "regnet", "embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "groups_width": 8},
    ],
    ids=lambda vision: vision["model_type"],
)
def test_other_convolutional_architectures_embed_and_train(vision: dict) -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config(vision={**vision, "image_size": 64}))
    present = {"text": [True, True], "vision": [True, True], "speech": [True, False]}
    output = model(**make_inputs(present), return_loss=True, loss_weights={"contrastive": 1.0, "matching": 1.0})
    output.loss.backward()
    assert output.vision_embeds.shape == (2, 128)
    torch.testing.assert_close(output.vision_embeds.norm(dim=-1), torch.ones(2))
    assert all(p.grad is not None for p in model.vision_model.parameters() if p.requires_grad)
