"""Parameter groups, per-tower learning rates, freezing and objective warm-up (zidong/train/optim.py)."""

from __future__ import annotations

import pytest
import torch

from tests.pretrain_run import recipe_with
from tests.tiny_model import tiny_config
from zidong.config import ConfigError
from zidong.models.zidong import OBJECTIVES, ZidongForClassification, ZidongModel
from zidong.train.optim import (
    build_optimizer,
    build_scheduler,
    clamp_temperature,
    drop_gradients,
    freeze_for_good,
    frozen_now,
    idle_heads,
    learning_rates,
    objective_weights,
    parameter_owners,
)


@pytest.fixture(scope="module")
def model() -> ZidongModel:
    torch.manual_seed(0)
    return ZidongModel(tiny_config())


def test_groups_split_by_tower_and_decay_with_multipliers() -> None:
    model = ZidongModel(tiny_config())
    optimizer = build_optimizer(model, recipe_with("model.text.lr_multiplier=0.1"))
    seen = set()
    for group in optimizer.param_groups:
        expected_lr = 0.010000000000000002 if group["owner"] == "text" else 0.1
        assert group["lr"] == pytest.approx(expected_lr)
        for parameter in group["params"]:
            assert (group["weight_decay"] > 0) == (parameter.ndim >= 2)
            seen.add(id(parameter))
    assert seen == {id(p) for p in model.parameters()}  # every parameter exactly once
    owners = parameter_owners(model)
    assert owners["speech_model.encoder.layers.0.ffn1.intermediate_dense.weight"] == "speech"
    assert owners["text_projection.weight"] == "rest"  # projections learn at the base rate


def test_frozen_for_good_leaves_the_optimizer_and_autograd() -> None:
    model = ZidongModel(tiny_config())
    settings = recipe_with("model.vision.frozen_steps=-1")
    assert freeze_for_good(model, settings) == ["vision"]
    optimizer = build_optimizer(model, settings)
    assert "vision" not in {group["owner"] for group in optimizer.param_groups}
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert all(p.requires_grad for p in model.vision_projection.parameters())


def test_a_classifier_freezes_and_scales_the_tower_it_wraps() -> None:
    # its parameters are named `zidong.speech_model...`: the tower must still be recognised as the speech tower
    model = ZidongForClassification(tiny_config(classification_modality="speech", id2label={0: "a", 1: "b"}))
    settings = recipe_with("model.speech.frozen_steps=-1", "model.text.lr_multiplier=0.5")
    assert freeze_for_good(model, settings) == ["speech"]
    assert not any(p.requires_grad for p in model.zidong.speech_model.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    optimizer = build_optimizer(model, settings)
    rates = {group["owner"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"text": pytest.approx(0.05), "vision": 0.1, "rest": 0.1}
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    drop_gradients(model, ["vision"])
    assert all(p.grad is None for p in model.zidong.vision_model.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())


def test_the_schedule_stays_at_zero_after_max_steps() -> None:
    model = ZidongModel(tiny_config())
    settings = recipe_with("train.warmup_steps=2", "train.max_steps=6")
    optimizer = build_optimizer(model, settings)
    scheduler = build_scheduler(optimizer, settings)
    history = []
    for _ in range(12):
        history.append(learning_rates(optimizer)["learning_rate"])
        optimizer.step()
        scheduler.step()
    assert history[6:] == [0.0] * 6  # a cosine run past its end would climb back to the peak
    assert max(history) == pytest.approx(0.1)


def test_timed_freeze_is_a_zero_learning_rate_then_the_schedule() -> None:
    model = ZidongModel(tiny_config())
    settings = recipe_with("model.speech.frozen_steps=3", "train.warmup_steps=2", "train.max_steps=10")
    optimizer = build_optimizer(model, settings)
    scheduler = build_scheduler(optimizer, settings)
    history = []
    for step in range(10):
        history.append(learning_rates(optimizer))
        assert frozen_now(settings, step) == (["speech"] if step < 3 else [])
        optimizer.step()
        scheduler.step()
    assert [round(h["learning_rate"], 4) for h in history[:4]] == [
        0.0,
        0.05,
        0.1,
        0.0962,
    ]  # cos ramp: 0.5 (1 + cos(pi / 8))
    assert [h.get("learning_rate_speech", "same") for h in history[:4]] == ["same", 0.0, 0.0, "same"]  # step 0: both 0


def test_dropped_gradients_do_not_count_or_move(model: ZidongModel) -> None:
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    drop_gradients(model, ["speech"])
    assert all(p.grad is None for p in model.speech_model.parameters())
    assert all(p.grad is not None for p in model.text_model.parameters())
    model.zero_grad(set_to_none=True)


def test_objective_warmup_ramps_linearly() -> None:
    settings = recipe_with("loss.matching.weight=0.5", "loss.matching.warmup_steps=4", "loss.masked_text.weight=0")
    ramp = [objective_weights(settings, step, OBJECTIVES)["matching"] for step in (1, 2, 4, 9)]
    assert ramp == [0.125, 0.25, 0.5, 0.5]
    assert objective_weights(settings, 1, OBJECTIVES)["contrastive"] == 1.0
    assert objective_weights(settings, 1, OBJECTIVES)["masked_text"] == 0.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.text.lr_multiplier=0", "model.text.lr_multiplier"),
        ("model.speech.frozen_steps=-2", "model.speech.frozen_steps"),
        ("loss.matching.warmup_steps=-1", "loss.matching.warmup_steps"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        recipe_with(override)


def test_the_temperature_is_clamped_to_its_maximum_after_the_step() -> None:
    model = ZidongModel(tiny_config(logit_scale_max=3.0))
    with torch.no_grad():
        model.logit_scale.fill_(3.5)
    clamp_temperature(model, deepspeed=False)
    assert model.logit_scale.item() == 3.0
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    clamp_temperature(model, deepspeed=False)
    assert model.logit_scale.item() == 2.0  # below the maximum: left as it is
    clamp_temperature(torch.nn.Linear(2, 2), deepspeed=False)  # a model without a temperature: nothing to do


def test_the_heads_of_objectives_that_are_off_are_idle_unless_an_objective_that_is_on_shares_them() -> None:
    masked = ("loss.masked_text.weight=0", "loss.masked_vision.weight=0", "loss.masked_speech.weight=0")
    everything_off = idle_heads(recipe_with("loss.matching.weight=0", *masked), OBJECTIVES)
    assert everything_off == ["fusion", "matching_head", "speech_head", "text_head", "vision_head"]
    assert idle_heads(recipe_with("loss.matching.weight=0.1", *masked), OBJECTIVES) == [
        "speech_head",
        "text_head",
        "vision_head",
    ]  # the fusion encoder serves matching
    assert idle_heads(recipe_with("loss.matching.weight=0"), OBJECTIVES) == ["matching_head"]
    assert idle_heads(recipe_with("loss.matching.weight=0", *masked), ()) == []  # a classifier's own business
