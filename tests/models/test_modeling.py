"""ZidongModel: shapes for every subset of modalities, presence and padding invariance, training signal, save/load."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from tests.tiny_model import ALL_OBJECTIVES, make_inputs, tiny_config
from zidong.models.zidong.arguments_zidong import Presence
from zidong.models.zidong.configuration_zidong import ZidongConfig
from zidong.models.zidong.contrastive_zidong import contrastive_objective
from zidong.models.zidong.modeling_zidong import MODALITIES, ZidongModel
from zidong.models.zidong.towers_zidong import Encoded


@pytest.fixture(scope="module")
def model() -> ZidongModel:
    torch.manual_seed(0)
    return ZidongModel(tiny_config()).eval()


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(MODALITIES, r)]


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s))
def test_shapes_for_every_subset(model: ZidongModel, subset: tuple[str, ...]) -> None:
    present = {m: [m in subset] * 3 for m in MODALITIES}
    with torch.no_grad():
        out = model(**make_inputs(present), return_loss=True, loss_weights=ALL_OBJECTIVES)
    for modality in MODALITIES:
        embeds = getattr(out, f"{modality}_embeds")
        if modality in subset:
            assert embeds.shape == (3, 128)
            assert torch.allclose(embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
        else:
            assert embeds is None
            assert not getattr(out, f"{modality}_present").any()
    expected_pairs = {f"contrastive_{a}_{b}" for a, b in itertools.combinations(MODALITIES, 2) if {a, b} <= set(subset)}
    expected = expected_pairs | {f"masked_{m}" for m in subset}
    if len(subset) > 1:
        expected |= {"contrastive", "matching"}
    assert set(out.losses) == expected
    assert all(torch.isfinite(value) for value in out.losses.values())
    assert torch.isfinite(out.loss)


def test_embedding_does_not_depend_on_batch_or_padding(model: ZidongModel) -> None:
    """Sample 0 alone, then inside a mixed batch with longer neighbours (so more padding): same embeddings."""
    alone = make_inputs({m: [True] for m in MODALITIES}, seed=1)
    mixed = make_inputs(
        {"text": [True, True, False], "vision": [True, False, True], "speech": [True, True, True]}, seed=2
    )
    mixed["input_ids"][0] = alone["input_ids"][0]
    mixed["text_attention_mask"][0] = alone["text_attention_mask"][0]
    mixed["pixel_values"][0] = alone["pixel_values"][0]
    longer = torch.zeros(3, 24000)
    longer[:, :16000] = mixed["input_values"]
    longer[0, :16000] = alone["input_values"][0]
    longer[1, 16000:] = 0.05  # a neighbour longer than sample 0 forces extra padding on it
    speech_mask = torch.zeros(3, 24000, dtype=torch.long)
    speech_mask[:, :16000] = mixed["speech_attention_mask"]
    speech_mask[0] = 0
    speech_mask[0, :16000] = alone["speech_attention_mask"][0]
    speech_mask[1] = 1
    mixed["input_values"], mixed["speech_attention_mask"] = longer, speech_mask
    with torch.no_grad():
        single = model(**alone)
        batch = model(**mixed)
    for modality in MODALITIES:
        first = getattr(batch, f"{modality}_embeds")[0]
        assert (first - getattr(single, f"{modality}_embeds")[0]).abs().max() < 1e-5, modality


def test_absent_rows_are_zero_and_get_no_gradient(model: ZidongModel) -> None:
    present = {
        "text": [True, True, True, False],
        "vision": [True, False, True, True],
        "speech": [False, True, True, True],
    }
    embeds = {m: torch.randn(4, 8).requires_grad_() for m in MODALITIES}
    losses = contrastive_objective(model, Encoded({}, {}, Presence.from_host(present), embeds))
    losses["contrastive_text_vision"].backward()
    assert embeds["text"].grad[1].abs().sum() == 0  # sample 1 has no vision
    assert embeds["text"].grad[3].abs().sum() == 0  # sample 3 has no text
    assert embeds["vision"].grad[[1, 3]].abs().sum() == 0
    assert embeds["text"].grad[[0, 2]].abs().sum() > 0


@pytest.mark.parametrize(
    "weights",
    [{"contrastive": 1.0}, {"contrastive": 1.0, "matching": 1.0, "masked_text": 1.0}],
    ids=["contrastive", "contrastive+matching+masked_text"],
)
def test_loss_on_a_fixed_batch_drops_by_more_than_half(weights: dict[str, float]) -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).train()
    inputs = make_inputs({m: [True] * 8 for m in MODALITIES}, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = model(**inputs, return_loss=True, loss_weights=weights).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses  # a mean: single steps spike under dropout


def test_sigmoid_loss_trains_too() -> None:
    torch.manual_seed(0)
    config = tiny_config(contrastive_loss="sigmoid")
    model = ZidongModel(config).train()
    inputs = make_inputs({"text": [True] * 6, "vision": [True] * 6, "speech": [False] * 6}, seed=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(20):
        loss = model(**inputs, return_loss=True).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_save_and_load_give_identical_outputs(model: ZidongModel, tmp_path: Path) -> None:
    inputs = make_inputs({m: [True, True] for m in MODALITIES}, seed=5)
    model.save_pretrained(tmp_path)
    reloaded = ZidongModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        before, after = model(**inputs), reloaded(**inputs)
    for modality in MODALITIES:
        assert torch.equal(getattr(before, f"{modality}_embeds"), getattr(after, f"{modality}_embeds"))
    assert reloaded.logit_scale.item() == pytest.approx(model.logit_scale.item())


def test_presence_count_mismatch_is_a_clear_error(model: ZidongModel) -> None:
    inputs = make_inputs({m: [True, True] for m in MODALITIES})
    inputs["text_present"] = torch.tensor([True, False])
    with pytest.raises(ValueError, match="text_present marks 1 samples but 2 text inputs were given"):
        model(**inputs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"contrastive_loss": "hinge"}, "contrastive_loss must be one of softmax, sigmoid"),
        ({"text_config": {"model_type": "berd"}}, "text_config.model_type 'berd' is not a transformers architecture"),
        ({"num_mel_bins": 64}, "feature_projection_input_dim is 160"),
        ({"logit_scale_init_value": 9.0}, "is above logit_scale_max"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ZidongConfig.from_preset("tiny", **kwargs)


def test_the_forward_changes_no_parameter() -> None:
    # the temperature is clamped after the optimizer step (zidong/train/optim.py), not inside the forward
    model = ZidongModel(tiny_config()).eval()
    with torch.no_grad():
        model.logit_scale.fill_(model.config.logit_scale_max + 1.0)
    before = {name: parameter.clone() for name, parameter in model.named_parameters()}
    present = {m: [True, True, False] for m in MODALITIES}
    model(**make_inputs(present), return_loss=True, loss_weights=ALL_OBJECTIVES)
    assert all(torch.equal(before[name], parameter) for name, parameter in model.named_parameters())
