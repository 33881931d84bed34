"""A kind of tower input is one `TowerInput` class and one registration (zidong/models/zidong/tower_inputs_zidong.py):
the forward encodes with it, lockstep runs its placeholder, and model FLOPs count its tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny_model import in_lockstep, make_inputs, tiny_config
from zidong.models.zidong.modeling_zidong import MODALITIES, ZidongModel
from zidong.models.zidong.tower_inputs_zidong import (
    TOWER_INPUTS,
    FeatureMapPixels,
    Filterbanks,
    PixelValues,
    TokenIds,
    TowerOutput,
    register_tower_input,
)
from zidong.models.zidong.towers_zidong import masked_mean
from zidong.train.flops import StepFlops

KEPT = 4


class FirstTokensOnly(TokenIds):
    """A toy: a BERT text tower that reads only the first KEPT tokens of a text (a tower of short context)."""

    @classmethod
    def serves(cls, tower_config) -> bool:
        return tower_config.model_type == "bert"

    def encode(self, model, values, mask=None, **switches) -> TowerOutput:
        return super().encode(model, values[:, :KEPT], None if mask is None else mask[:, :KEPT], **switches)

    def placeholder(self, device, dtype):
        return torch.full((1, KEPT), 7, dtype=torch.long, device=device), None

    def tokens(self, values, mask):
        return np.minimum(super().tokens(values, mask), KEPT)


@pytest.fixture
def toy_kind():
    register_tower_input(FirstTokensOnly)
    yield FirstTokensOnly
    TOWER_INPUTS.remove(FirstTokensOnly)


def test_the_presets_towers_read_the_kinds_that_ship() -> None:
    kinds = {m: type(kind) for m, kind in ZidongModel(tiny_config()).tower_inputs.items()}
    assert kinds == {"text": TokenIds, "vision": PixelValues, "speech": Filterbanks}
    vision = {"model_type": "convnext", "hidden_sizes": [8], "depths": [1], "num_stages": 1, "image_size": 64}
    convolutional = tiny_config(vision_config=vision)
    assert type(ZidongModel(convolutional).tower_inputs["vision"]) is FeatureMapPixels


def test_a_new_tower_input_is_one_class_and_one_registration(toy_kind: type[FirstTokensOnly]) -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).eval()
    assert isinstance(model.tower_inputs["text"], FirstTokensOnly)
    inputs = make_inputs({"text": [True, True], "vision": [True, True], "speech": [False, False]})
    with torch.no_grad():
        out = model(**inputs)
        ids, mask = inputs["input_ids"][:, :KEPT], inputs["text_attention_mask"][:, :KEPT]
        states = model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        by_hand = F.normalize(model.text_projection(masked_mean(states, mask.bool())), dim=-1)
    torch.testing.assert_close(out.text_embeds, by_hand)

    seen: list[torch.Tensor] = []
    model.text_model.register_forward_hook(lambda module, args, kwargs, output: seen.append(kwargs["input_ids"]),
                                           with_kwargs=True)  # fmt: skip
    without_text = make_inputs({"text": [False, False], "vision": [True, True], "speech": [True, True]})
    with in_lockstep(model), torch.no_grad():
        model(**without_text, return_loss=True)
    assert torch.equal(seen[-1], torch.full((1, KEPT), 7))  # lockstep ran the tower on the kind's placeholder

    flops = StepFlops(model)
    text_only = make_inputs({"text": [True, True], "vision": [False] * 2, "speech": [False] * 2})
    assert text_only["text_attention_mask"].sum(dim=1).tolist() == [10, 16]  # real tokens the tower never reads
    assert flops.of_batch(text_only, {"contrastive": 1.0}) == 6 * flops.towers["text"][0] * 2 * KEPT

    with pytest.raises(ValueError, match="FirstTokensOnly is registered already"):
        register_tower_input(FirstTokensOnly)


def test_without_the_registration_the_kind_that_ships_serves_again(toy_kind: type[FirstTokensOnly]) -> None:
    TOWER_INPUTS.remove(toy_kind)
    try:
        assert {type(kind) for kind in ZidongModel(tiny_config()).tower_inputs.values()} == {
            TokenIds,
            PixelValues,
            Filterbanks,
        }
    finally:
        TOWER_INPUTS.append(toy_kind)
    assert set(MODALITIES) == set(ZidongModel(tiny_config()).tower_inputs)
