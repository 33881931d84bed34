"""ZidongForClassification: logits for the classified tower's rows, loss on labelled rows only, lockstep, and
loading a joint ZidongModel's weights under it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_model import in_lockstep, make_inputs, tiny_config
from zidong.models.zidong import ZidongForClassification, ZidongModel
from zidong.models.zidong.configuration_zidong import MODALITIES


def classifier_config(modality: str = "vision"):
    return tiny_config(classification_modality=modality, id2label={0: "circle", 1: "square", 2: "triangle"})


def test_logits_cover_the_rows_with_the_modality() -> None:
    torch.manual_seed(0)
    model = ZidongForClassification(classifier_config("speech")).eval()
    present = {"text": [True, True, True], "vision": [True, False, True], "speech": [False, True, True]}
    out = model(**make_inputs(present), labels=torch.tensor([0, 2, -1]))
    assert out.logits.shape == (3, 3)
    assert out.present.tolist() == [False, True, True]
    assert torch.equal(out.logits[0], torch.zeros(3))
    expected = torch.nn.functional.cross_entropy(out.logits[1:2], torch.tensor([2]))  # row 2 is unlabelled
    torch.testing.assert_close(out.loss, expected)


def test_a_batch_without_the_modality_still_has_a_graph_and_runs_the_tower_in_lockstep() -> None:
    model = ZidongForClassification(classifier_config("vision")).train()
    present = {"text": [True, True], "vision": [False, False], "speech": [True, False]}
    calls = []
    hook = model.zidong.vision_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = model(**make_inputs(present), labels=torch.tensor([0, 1]))
        assert calls == []
        with in_lockstep(model):
            locked = model(**make_inputs(present), labels=torch.tensor([0, 1]))
        assert calls == [1]
    finally:
        hook.remove()
    assert float(plain.loss) == 0.0
    assert float(locked.loss) == 0.0
    locked.loss.backward()
    assert model.classifier.weight.grad is not None


def test_a_joint_model_loads_under_the_classifier(tmp_path: Path) -> None:
    torch.manual_seed(0)
    joint = ZidongModel(tiny_config()).eval()
    joint.save_pretrained(tmp_path)
    model = ZidongForClassification.from_pretrained(
        tmp_path, classification_modality="text", id2label={0: "a", 1: "b"}
    ).eval()
    for name, tensor in joint.state_dict().items():
        assert torch.equal(model.zidong.state_dict()[name], tensor), name
    assert model.classifier.out_features == 2


def test_an_unknown_modality_is_refused() -> None:
    with pytest.raises(ValueError, match="classification_modality must be one of"):
        classifier_config("smell")
    assert "smell" not in MODALITIES
