"""Lockstep forward (DeepSpeed): the same module calls on every batch, a gradient on every used parameter, and
the losses of the ordinary forward (to float rounding)."""

from __future__ import annotations

import pytest
import torch
from transformers import set_seed

from tests.tiny_model import ALL_OBJECTIVES, in_lockstep, make_inputs, tiny_config
from zidong.models.zidong.modeling_zidong import MODALITIES, ZidongModel

BATCHES = {
    "all": {m: [True, True, True] for m in MODALITIES},
    "text only": {"text": [True, True, True], "vision": [False] * 3, "speech": [False] * 3},
    "pairs": {"text": [True, True, False], "vision": [True, False, False], "speech": [False, True, True]},
    "no multi-modal sample": {"text": [True, False, False], "vision": [False, True, False], "speech": [False] * 3},
}


@pytest.fixture(scope="module")
def model() -> ZidongModel:
    torch.manual_seed(0)
    # LayerDrop skips random speech layers, differently per process; the trainer turns it off under DeepSpeed
    return ZidongModel(tiny_config(speech={"layerdrop": 0.0})).train()


def _call_sequence(model: ZidongModel, inputs: dict, weights: dict) -> tuple[list[str], torch.Tensor, dict]:
    calls: list[str] = []
    names = {module: name for name, module in model.named_modules() if name}
    hooks = [module.register_forward_pre_hook(lambda m, _: calls.append(names[m])) for module in names]
    try:
        set_seed(1)  # torch and numpy (the speech tower's own time masking draws from numpy)
        with in_lockstep(model):
            out = model(**inputs, return_loss=True, loss_weights=weights)
    finally:
        for hook in hooks:
            hook.remove()
    return calls, out.loss, out.losses


@pytest.mark.parametrize("weights", [ALL_OBJECTIVES, {"contrastive": 1.0}], ids=["all objectives", "contrastive"])
def test_every_batch_calls_the_same_modules_in_the_same_order(model: ZidongModel, weights: dict) -> None:
    sequences = {name: _call_sequence(model, make_inputs(present), weights)[0] for name, present in BATCHES.items()}
    reference = sequences["all"]
    assert {"text_model", "vision_model", "speech_model"} <= set(reference)
    for name, sequence in sequences.items():
        assert sequence == reference, name


# never used by these objectives, whatever the batch: the sigmoid loss's bias and the speech tower's SpecAugment
# embedding (the tiny preset masks the filterbank instead: apply_spec_augment=False)
UNUSED = {"logit_bias", "speech_model.masked_spec_embed"}


@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_every_weighted_parameter_gets_a_gradient_and_losses_are_unchanged(model: ZidongModel, batch: str) -> None:
    inputs = make_inputs(BATCHES[batch])
    model.zero_grad(set_to_none=True)
    _, loss, losses = _call_sequence(model, inputs, ALL_OBJECTIVES)
    loss.backward()
    assert {name for name, p in model.named_parameters() if p.grad is None} == UNUSED
    set_seed(1)
    plain = model(**inputs, return_loss=True, loss_weights=ALL_OBJECTIVES)
    assert set(plain.losses) == set(losses)
    # A placeholder stream of an absent modality adds masked key positions to the fusion encoder's sequence: the
    # same attention, summed in another order by the kernel, so the last bit may differ (masked_vision on the
    # batch without a multi-modal sample, 1.2e-7, once the text tower trains without dropout).
    for name in losses:
        torch.testing.assert_close(losses[name], plain.losses[name], rtol=1e-6, atol=0, msg=name)
    torch.testing.assert_close(loss, plain.loss, rtol=1e-6, atol=0)


def test_an_empty_lockstep_call_runs_every_tower(model: ZidongModel) -> None:
    seen: set[str] = set()
    hooks = [
        tower.register_forward_hook(lambda m, *_, name=name: seen.add(name)) for name, tower in model.towers().items()
    ]
    try:
        with torch.no_grad(), in_lockstep(model):
            out = model()
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == set(MODALITIES)
    assert out.text_embeds.shape == (0, model.config.projection_dim)
