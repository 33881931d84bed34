"""The fusion objectives: hard-negative mining, multi-way matching targets, masking rules, compute skipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny_model import ALL_OBJECTIVES, MASK_TOKEN, VOCAB, make_inputs, tiny_config
from zidong.models.zidong.masking_zidong import mask_text, mask_vision, modality_level_mask, span_mask
from zidong.models.zidong.matching_zidong import mine_hard_negatives, multiway_matching_loss
from zidong.models.zidong.modeling_zidong import MODALITIES, ZidongModel
from zidong.models.zidong.objectives_zidong import REGISTRY, Objective, register_objective
from zidong.train.flops import StepFlops


@pytest.fixture(scope="module")
def model() -> ZidongModel:
    torch.manual_seed(0)
    return ZidongModel(tiny_config()).train()


def test_hard_negatives_are_the_most_similar_valid_partner(model: ZidongModel) -> None:
    # Samples 0..3: text+vision+speech, text+vision, text+vision, vision+speech. Vision of sample 2 is the
    # near-copy of sample 0's text, so swapping sample 0's vision must pick sample 2.
    present = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    basis = torch.eye(4)
    embeds = {
        "text": F.normalize(torch.stack([basis[0], basis[1], basis[2], torch.zeros(4)]), dim=-1),
        "vision": F.normalize(torch.stack([basis[3], basis[1], basis[0] + 0.01, basis[2]]), dim=-1),
        "speech": F.normalize(torch.stack([basis[0], torch.zeros(4), torch.zeros(4), basis[2]]), dim=-1),
    }
    with torch.no_grad():
        model.logit_scale.fill_(4.6)
    swaps = []
    for seed in range(30):
        torch.manual_seed(seed)
        swapped, partner = mine_hard_negatives(embeds, present, present.sum(dim=1) >= 2, model.logit_scale[0])
        for row in range(4):
            modality = int(swapped[row])
            assert modality >= 0
            assert present[row, modality]
            assert partner[row] != row
            assert present[partner[row], modality]
        if swapped[0] == MODALITIES.index("vision"):
            swaps.append(int(partner[0]))
    assert swaps
    assert all(p == 2 for p in swaps)


def test_matching_targets_pairs_and_triplets() -> None:
    allowed = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    # a triplet whose vision was swapped; a text+vision pair whose negative counts as either side swapped
    target = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    confident = torch.tensor([[-9.0, -9.0, 9.0, -9.0], [-9.0, 5.0, 5.0, 50.0]])
    assert multiway_matching_loss(confident, allowed, target) < 1e-3  # class 3 is not allowed for the pair
    wrong = torch.tensor([[9.0, -9.0, -9.0, -9.0], [9.0, -9.0, -9.0, -9.0]])
    assert multiway_matching_loss(wrong, allowed, target) > 10


def test_weight_zero_skips_the_compute(model: ZidongModel) -> None:
    calls = {"fusion": 0, "text_model": 0}
    hooks = [
        model.fusion.register_forward_hook(lambda *_: calls.__setitem__("fusion", calls["fusion"] + 1)),
        model.text_model.register_forward_hook(lambda *_: calls.__setitem__("text_model", calls["text_model"] + 1)),
    ]
    inputs = make_inputs({m: [True] * 3 for m in MODALITIES})
    try:
        out = model(**inputs, return_loss=True, loss_weights={"contrastive": 1.0, "matching": 0.0})
        assert calls == {"fusion": 0, "text_model": 1}
        assert set(out.losses) == {"contrastive", "contrastive_text_vision", "contrastive_text_speech",
                                   "contrastive_vision_speech"}  # fmt: skip
        model(**inputs, return_loss=True, loss_weights={"masked_text": 1.0})
        assert calls == {"fusion": 1, "text_model": 3}  # one more text pass, on the masked tokens
        model(**inputs)
        assert calls == {"fusion": 1, "text_model": 4}
    finally:
        for hook in hooks:
            hook.remove()


def test_total_is_the_weighted_sum_of_each_objective_run_alone() -> None:
    """Each objective's loss from a forward that runs only it (eval mode: no dropout; the same seed for the
    matching objective's negative draw), weighted by hand, against the total of one forward running both."""
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).eval()
    inputs = make_inputs({m: [True] * 3 for m in MODALITIES})

    def loss(weights: dict[str, float]) -> torch.Tensor:
        torch.manual_seed(1)
        return model(**inputs, return_loss=True, loss_weights=weights).loss

    contrastive, matching = loss({"contrastive": 1.0}), loss({"matching": 1.0})
    assert contrastive > 0
    assert matching > 0
    total = loss({"contrastive": 0.5, "matching": 2.0})
    torch.testing.assert_close(total, 0.5 * contrastive + 2.0 * matching)


def test_text_masking_never_touches_padding_or_special_tokens(model: ZidongModel) -> None:
    ids = torch.tensor([[2, 7, 8, 9, 3, 0, 0], [2, 10, 11, 12, 13, 14, 3]])
    model.config.text_config.bos_token_id, model.config.text_config.eos_token_id = 2, 3
    attention = (ids != 0).long()
    everything = torch.tensor([True, True])
    masked = mask_text(model, ids, attention, everything)
    chosen, labels = masked.chosen, masked.target
    assert chosen.tolist() == [[False, True, True, True, False, False, False], [False] + [True] * 5 + [False]]
    assert torch.equal(labels, ids)
    torch.manual_seed(0)
    long_ids = torch.randint(MASK_TOKEN + 1, VOCAB, (64, 32))
    chosen = mask_text(model, long_ids, None, torch.zeros(64, dtype=torch.bool)).chosen
    assert 0.12 < chosen.float().mean() < 0.18  # text_mask_probability = 0.15


def test_masked_text_needs_a_mask_token() -> None:
    model = ZidongModel(tiny_config(mask_token_id=None))
    inputs = make_inputs({m: [True] * 2 for m in MODALITIES})
    with pytest.raises(ValueError, match="mask_token_id is not set"):
        model(**inputs, return_loss=True, loss_weights={"masked_text": 1.0})


def test_unknown_objective_is_named(model: ZidongModel) -> None:
    inputs = make_inputs({m: [True] * 2 for m in MODALITIES})
    with pytest.raises(ValueError, match=r"unknown objective.*masked_txt"):
        model(**inputs, return_loss=True, loss_weights={"masked_txt": 1.0})


def test_vision_masking_blanks_exactly_the_chosen_patches(model: ZidongModel) -> None:
    seen = {}
    hook = model.vision_model.register_forward_hook(
        lambda _m, args, kwargs, _o: seen.__setitem__("pixels", kwargs["pixel_values"]), with_kwargs=True
    )
    pixels = torch.randn(2, 3, 64, 64) + 5.0  # nowhere zero before masking
    try:
        masked = mask_vision(model, pixels, None, torch.tensor([False, True]))
        chosen, target = masked.chosen, masked.target
    finally:
        hook.remove()
    assert chosen.shape == (2, 64)
    assert int(chosen[0].sum()) == 32
    assert bool(chosen[1].all())
    blanked = (seen["pixels"] == 0).reshape(2, 3, 8, 8, 8, 8).permute(0, 2, 4, 1, 3, 5).reshape(2, 64, -1)
    assert torch.equal(blanked.all(dim=-1), chosen)
    assert torch.equal(blanked.any(dim=-1), chosen)
    assert torch.allclose(target.mean(dim=-1), torch.zeros(2, 64), atol=1e-5)  # per-patch normalised


def test_speech_span_masking_keeps_to_real_steps() -> None:
    torch.manual_seed(0)
    valid = torch.ones(4, 400, dtype=torch.bool)
    valid[0, 100:] = False
    chosen = span_mask(valid, ratio=0.3, span=5)
    assert not chosen[0, 100:].any()
    assert 0.2 < chosen[1:].float().mean() < 0.4


def test_modality_level_masking_masks_one_whole_modality_per_multimodal_sample() -> None:
    model = ZidongModel(tiny_config(modality_mask_probability=1.0))
    presence = {
        "text": torch.tensor([True, True, True, False]),
        "vision": torch.tensor([True, True, False, False]),
        "speech": torch.tensor([True, False, True, True]),
    }
    whole = modality_level_mask(["text", "vision", "speech"], presence, model.config.modality_mask_probability)
    stacked = torch.stack([whole[m] for m in MODALITIES], dim=1)
    assert stacked.sum(dim=1).tolist() == [1, 1, 1, 0]  # sample 3 has speech only: nothing to predict it from
    assert not (stacked & ~torch.stack([presence[m] for m in MODALITIES], dim=1)).any()
    only_text = modality_level_mask(["text"], presence, model.config.modality_mask_probability)
    assert only_text["text"].tolist() == [True, True, True, False]
    assert not only_text["speech"].any()


def test_waveform_speech_tower_runs_every_objective() -> None:
    """A HuBERT-style tower reads the waveform itself; masked speech blanks samples and follows its token grid."""
    speech = {
        "model_type": "hubert",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "conv_dim": [32] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        "apply_spec_augment": False,
    }
    torch.manual_seed(0)
    model = ZidongModel(tiny_config(speech_config=speech)).train()
    out = model(**make_inputs({m: [True] * 3 for m in MODALITIES}), return_loss=True, loss_weights=ALL_OBJECTIVES)
    assert out.speech_embeds.shape == (3, 128)
    assert torch.isfinite(out.losses["masked_speech"])
    out.loss.backward()
    assert model.speech_head.decoder.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).train()
    inputs = make_inputs({m: [True] * 3 for m in MODALITIES})

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(7)
        loss = model(**inputs, return_loss=True, loss_weights=ALL_OBJECTIVES).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = run()
    model.activation_checkpointing_enable()
    checkpointed_layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    checkpointed_loss, checkpointed = run()
    assert len(checkpointed_layers) >= 8  # 2 layers in each of text, vision, speech and fusion
    assert torch.allclose(plain_loss, checkpointed_loss, atol=1e-6)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-5), name


def test_spec_augment_draws_a_mask_per_utterance_in_training_only() -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config(spec_augment_freq_mask=30, spec_augment_time_mask=0))
    waveform = torch.randn(1, 16000).repeat(8, 1) * 0.1
    mask = torch.ones_like(waveform, dtype=torch.long)
    model.train()
    augmented, _ = model.speech_steps(waveform, mask, augment=True)
    masked_bins = [(row[:, :80] == 0).all(dim=0) for row in augmented]  # first frame of each step
    assert len({tuple(bins.tolist()) for bins in masked_bins}) > 1  # utterances got different masks
    clean, _ = model.speech_steps(waveform, mask, augment=False)
    assert torch.equal(clean[0], clean[7])


def test_gradients_are_bitwise_reproducible_with_every_objective() -> None:
    # hard negatives can repeat a partner; gathering them with advanced indexing made CPU gradients differ from
    # run to run (atomic accumulation in index_put's backward), which broke run-to-run reproducibility
    from transformers import set_seed

    inputs = make_inputs({m: [True] * 8 for m in MODALITIES})

    def gradients() -> dict[str, torch.Tensor]:
        set_seed(0)
        model = ZidongModel(tiny_config()).train()
        set_seed(1)
        model(**inputs, return_loss=True, loss_weights=ALL_OBJECTIVES).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    first, second = gradients(), gradients()
    assert [name for name in first if not torch.equal(first[name], second[name])] == []


def test_a_new_objective_is_one_object_and_one_registration(model: ZidongModel) -> None:
    # a toy objective: a sample's text and vision embeddings agree (1 - cosine), with no head of its own
    def agreement(model, encoded, weights, lockstep) -> dict[str, torch.Tensor]:
        both = encoded.presence["text"] & encoded.presence["vision"]
        cosine = (encoded.embeds["text"] * encoded.embeds["vision"]).sum(dim=-1)
        return {"agreement": (1 - cosine)[both].mean()}

    toy = Objective(weights=("agreement",), heads=(), losses=agreement, fusion_tokens=lambda tokens, weights: 7.0)
    register_objective(toy)
    try:
        inputs = make_inputs({m: [True, True, False] for m in MODALITIES})
        out = model(**inputs, return_loss=True, loss_weights={"contrastive": 1.0, "agreement": 0.5})
        by_hand = 1 - (out.text_embeds[:2] * out.vision_embeds[:2]).sum(dim=-1)
        torch.testing.assert_close(out.losses["agreement"], by_hand.mean())
        torch.testing.assert_close(out.loss, out.losses["contrastive"] + 0.5 * out.losses["agreement"])
        flops = StepFlops(model)
        tokens = {m: np.array([3, 0]) for m in MODALITIES}
        added = flops.of_tokens(tokens, {"agreement": 1.0}) - flops.of_tokens(tokens, {})
        assert added == 6 * flops.fusion * 7.0
        with pytest.raises(ValueError, match="agreement are registered already"):
            register_objective(toy)
    finally:
        REGISTRY.remove(toy)
    with pytest.raises(ValueError, match="unknown objective"):
        model(**inputs, return_loss=True, loss_weights={"agreement": 1.0})


def test_every_head_belongs_to_a_registered_objective(model: ZidongModel) -> None:
    declared = {head for objective in REGISTRY for head in objective.heads}
    assert declared == {"fusion", "matching_head", "text_head", "vision_head", "speech_head"}
    assert all(isinstance(getattr(model, head), torch.nn.Module) for head in declared)
