"""`train.full_batch_negatives`: four micro-batches of two through the step cache give the contrastive loss, and
every gradient, of one batch of eight (the trainer's whole runs on several processes: tests/train/test_parity.py)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_model import in_lockstep, make_inputs, tiny_config
from zidong.models.zidong.modeling_zidong import MODALITIES, ZidongModel
from zidong.train.step_cache import StepCache

MICRO = [  # which of each micro-batch's two samples has which modality: pairs, triplets, a lone modality
    {"text": [True, True], "vision": [True, False], "speech": [False, True]},
    {"text": [True, False], "vision": [True, True], "speech": [True, True]},
    {"text": [True, True], "vision": [True, True], "speech": [True, True]},
    {"text": [False, True], "vision": [True, True], "speech": [False, False]},
]
INPUTS = {"text": ("input_ids", "text_attention_mask"), "vision": ("pixel_values",),
          "speech": ("input_values", "speech_attention_mask")}  # fmt: skip


def one_batch(micro: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The micro-batches as one batch: each modality's rows and presence concatenated in order."""
    joined = {f"{m}_present": torch.cat([batch[f"{m}_present"] for batch in micro]) for m in MODALITIES}
    for keys in INPUTS.values():
        for key in keys:
            parts = [batch[key] for batch in micro if key in batch]
            if parts:
                joined[key] = torch.cat(parts)
    return joined


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("kind", "lockstep"), [("softmax", False), ("sigmoid", False), ("softmax", True)])
def test_four_cached_micro_batches_train_like_one_batch(kind: str, lockstep: bool) -> None:
    torch.manual_seed(0)
    # no randomness: one batch of eight cannot draw what four batches of two draw (tests/train/parity.py)
    text = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    speech = {"layerdrop": 0.0, "conformer_conv_dropout": 0.0}
    config = tiny_config(text=text, speech=speech, contrastive_loss=kind, spec_augment_freq_mask=0,
                         spec_augment_time_mask=0)  # fmt: skip
    model = ZidongModel(config).train()
    micro = [make_inputs(present, seed=index) for index, present in enumerate(MICRO)]
    weights = {"return_loss": True, "loss_weights": {"contrastive": 0.7}}

    with in_lockstep(model, lockstep):
        whole = model(**one_batch(micro), **weights)
        whole.loss.backward()
    expected = gradients(model)
    model.zero_grad()

    cache = StepCache(len(micro))
    model.prepare_for_launcher(lockstep=lockstep, gather=cache)
    cache.begin([{m: batch[f"{m}_present"].numpy() for m in MODALITIES} for batch in micro])
    with torch.no_grad(), cache.recording():
        for index, batch in enumerate(micro):
            with cache.randomness(index, [torch.device("cpu")]):
                model(**batch, **weights)
    cache.solve(kind, model.config.projection_dim)
    reported = {}
    for index, batch in enumerate(micro):
        with cache.randomness(index, [torch.device("cpu")]), cache.replay(index):
            output = model(**batch, **weights)
        (output.loss / len(micro)).backward()  # as the trainer's accumulation divides each micro-batch's loss
        for name, value in output.losses.items():
            reported[name] = reported.get(name, 0.0) + value.detach() / len(micro)
    model.prepare_for_launcher()

    assert set(reported) == set(whole.losses)
    for name, value in whole.losses.items():
        torch.testing.assert_close(reported[name], value.detach(), rtol=1e-5, atol=1e-7, msg=name)
    got = gradients(model)
    assert set(got) == set(expected)
    assert got["logit_scale"].abs().sum() > 0
    assert got["text_projection.weight"].abs().sum() > 0
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_a_forward_that_holds_another_batch_is_refused() -> None:
    cache = StepCache(2)
    first = {m: [True, True] for m in MODALITIES}
    cache.begin([{m: torch.tensor(v).numpy() for m, v in first.items()}] * 2)
    with pytest.raises(ValueError, match=r"micro-batches, but train\.grad_accum=2"):
        cache.begin([{m: torch.tensor(v).numpy() for m, v in first.items()}])
    model = ZidongModel(tiny_config())
    model.prepare_for_launcher(gather=cache)
    other = make_inputs({"text": [True, False], "vision": [True, True], "speech": [True, True]})
    with torch.no_grad(), cache.recording(), pytest.raises(ValueError, match="does not hold the batch"):
        model(**other, return_loss=True)


def test_the_replayed_forward_draws_what_the_cached_one_drew() -> None:
    # with dropout, LayerDrop and SpecAugment on (the presets leave the first two at 0): the rows trained are the
    # rows whose gradient was cached
    torch.manual_seed(0)
    config = tiny_config(
        text={"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1},
        speech={"layerdrop": 0.1, "conformer_conv_dropout": 0.1},
        spec_augment_freq_mask=8,
        spec_augment_time_mask=10,
    )
    model = ZidongModel(config).train()
    micro = [make_inputs(present, seed=index) for index, present in enumerate(MICRO[:2])]
    cache = StepCache(len(micro))
    model.prepare_for_launcher(gather=cache)
    cache.begin([{m: batch[f"{m}_present"].numpy() for m in MODALITIES} for batch in micro])
    cached, replayed = [], []
    with torch.no_grad():
        with cache.recording():
            for index, batch in enumerate(micro):
                with cache.randomness(index, [torch.device("cpu")]):
                    cached.append(model(**batch, return_loss=True))
        cache.solve("softmax", model.config.projection_dim)
        for index, batch in enumerate(micro):
            with cache.randomness(index, [torch.device("cpu")]), cache.replay(index):
                replayed.append(model(**batch, return_loss=True))
            with cache.randomness(1 - index, [torch.device("cpu")]):
                other = model(**batch)
            assert not torch.equal(other.text_embeds, replayed[-1].text_embeds)  # the seed decides the draws
    for first, second in zip(cached, replayed, strict=True):
        for modality in MODALITIES:
            assert torch.equal(getattr(first, f"{modality}_embeds"), getattr(second, f"{modality}_embeds"))
