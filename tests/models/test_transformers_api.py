"""What transformers' own tools expect of a model class: device-map support, embedding resizing, half precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.tiny_model import ALL_OBJECTIVES, VOCAB, make_inputs, tiny_config
from zidong.models.zidong import ZidongForClassification, ZidongModel
from zidong.models.zidong.configuration_zidong import MODALITIES


def test_no_split_modules_are_declared_on_the_class_and_gathered_from_the_towers() -> None:
    # device_map="auto" and offloading read the class attribute before any instance exists
    assert "ZidongFusionLayer" in (ZidongModel._no_split_modules or [])
    assert "ZidongFusionLayer" in (ZidongForClassification._no_split_modules or [])
    model = ZidongModel(tiny_config())
    assert {"ZidongFusionLayer", "BertLayer", "ViTLayer", "Wav2Vec2BertEncoderLayer"} <= set(model._no_split_modules)


def test_device_map_auto_loads_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ZidongModel(tiny_config()).save_pretrained(tmp_path)
    model = ZidongModel.from_pretrained(tmp_path, device_map="auto")
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}


def test_resize_token_embeddings_resizes_the_tower_and_the_masked_text_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).train()
    assert model.get_input_embeddings() is model.text_model.get_input_embeddings()
    before = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 7)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 7
    assert torch.equal(model.get_input_embeddings().weight[:VOCAB], before)  # old rows kept
    assert model.text_head.decoder.out_features == VOCAB + 7
    assert model.config.text_config.vocab_size == VOCAB + 7
    assert model.vocab_size == VOCAB + 7  # set by transformers' own resize_token_embeddings too
    inputs = make_inputs({m: [True, True] for m in MODALITIES})
    inputs["input_ids"][:, :4] = VOCAB + 6  # new tokens, masked and predicted by the masked-text head
    model(**inputs, return_loss=True, loss_weights=ALL_OBJECTIVES).loss.backward()
    model.save_pretrained(tmp_path)
    reloaded = ZidongModel.from_pretrained(tmp_path)
    assert reloaded.text_head.decoder.out_features == VOCAB + 7


def test_bfloat16_runs_every_modality_close_to_float32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).eval()
    inputs = make_inputs({m: [True, True] for m in MODALITIES}, seed=3)
    with torch.no_grad():
        reference = model(**inputs)
    model.save_pretrained(tmp_path)
    for half in (ZidongModel(tiny_config()).eval(), ZidongModel.from_pretrained(tmp_path, dtype=torch.bfloat16)):
        if half.dtype != torch.bfloat16:  # a model cast after building
            half.load_state_dict(model.state_dict())
            half = half.to(torch.bfloat16)
        assert half.fbank.window.dtype == torch.float64
        assert half.fbank.mel_banks.dtype == torch.float32
        with torch.no_grad():
            out = half(**inputs)
        for modality in MODALITIES:
            embeds = getattr(out, f"{modality}_embeds")
            assert embeds.dtype == torch.bfloat16, modality
            expected = getattr(reference, f"{modality}_embeds")
            similarity = F.cosine_similarity(embeds.float(), expected, dim=-1)
            assert similarity.min() > 0.99, (modality, similarity)


def test_each_tower_keeps_its_own_attention_implementation(tmp_path: Path) -> None:
    ZidongModel(tiny_config()).save_pretrained(tmp_path)
    choice = {"text_config": "eager", "vision_config": "sdpa", "speech_config": "eager"}
    model = ZidongModel.from_pretrained(tmp_path, attn_implementation=choice)
    for modality, tower in model.towers().items():
        assert tower.config._attn_implementation == choice[f"{modality}_config"], modality
    config = tiny_config()
    config.vision_config._attn_implementation = "eager"  # a tower config's own setting
    assert ZidongModel(config).vision_model.config._attn_implementation == "eager"
    assert ZidongModel(tiny_config()).text_model.config._attn_implementation == "sdpa"  # the default


def test_towers_carry_no_pooler_and_older_weights_with_one_still_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config())
    assert not [name for name, _ in model.named_parameters() if ".pooler." in name]  # computed, untrained, saved
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    width = model.config.text_config.hidden_size
    for tower in ("text_model", "vision_model"):  # what an export written by an earlier zidong holds
        weights[f"{tower}.pooler.dense.weight"] = torch.zeros(width, width)
        weights[f"{tower}.pooler.dense.bias"] = torch.zeros(width)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = ZidongModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.text_projection.weight, model.text_projection.weight)


def _uniform_bound(linear: torch.nn.Linear) -> float:
    return (1 / linear.in_features) ** 0.5


def test_a_weight_missing_from_a_checkpoint_gets_its_towers_own_initialisation(tmp_path: Path) -> None:
    # Wav2Vec2-BERT initialises its feature projection uniform(-1/sqrt(in), 1/sqrt(in)) (std 0.046 for 160
    # inputs), not normal(0, 0.02) like a generic linear layer
    torch.manual_seed(0)
    built = ZidongModel(tiny_config())
    projection = built.speech_model.feature_projection.projection
    bound = _uniform_bound(projection)
    assert projection.weight.abs().max() <= bound
    assert projection.weight.std() > 0.035
    built.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["speech_model.feature_projection.projection.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = ZidongModel.from_pretrained(tmp_path).speech_model.feature_projection.projection
    assert reloaded.weight.abs().max() <= bound
    assert reloaded.weight.std() > 0.035
    assert torch.equal(reloaded.bias, projection.bias)  # present in the checkpoint: loaded, not re-initialised


def test_return_dict_false_gives_tuples() -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).eval()
    inputs = make_inputs({m: [True, True] for m in MODALITIES})
    with torch.no_grad():
        as_object = model(**inputs, return_loss=True)
        loss, _losses, text_embeds, *_ = model(**inputs, return_loss=True, return_dict=False)
    assert torch.equal(loss, as_object.loss)
    assert torch.equal(text_embeds, as_object.text_embeds)
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(**inputs), tuple)
    model.config.return_dict = True
    classifier = ZidongForClassification(tiny_config(classification_modality="text", id2label={0: "a", 1: "b"})).eval()
    with torch.no_grad():
        as_tuple = classifier(**inputs, labels=torch.tensor([0, 1]), return_dict=False)
        as_object = classifier(**inputs, labels=torch.tensor([0, 1]))
    assert torch.equal(as_tuple[0], as_object.loss)
    assert torch.equal(as_tuple[2], as_object.logits)
    assert as_tuple[2].shape == (2, 2)


def test_the_joint_forward_returns_each_towers_outputs_as_clip_does() -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).eval()
    present = {"text": [True, True, False], "vision": [True, False, True], "speech": [False, False, False]}
    inputs = make_inputs(present)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        text = model.text_model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["text_attention_mask"],
            output_hidden_states=True,
            output_attentions=True,
        )
        vision = model.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True)
        text_features = model.get_text_features(inputs["input_ids"], inputs["text_attention_mask"]).pooler_output
        image_features = model.get_image_features(inputs["pixel_values"]).pooler_output
    assert out.speech_model_output is None  # no sample has speech
    assert len(out.text_model_output.hidden_states) == model.config.text_config.num_hidden_layers + 1
    for got, want in zip(out.text_model_output.hidden_states, text.hidden_states, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(out.text_model_output.attentions, text.attentions, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(out.vision_model_output.hidden_states[-1], vision.hidden_states[-1], rtol=0, atol=0)
    # CLIP's logits over the whole batch: zero where a sample lacks text or vision
    expected = torch.zeros(3, 3)
    expected[:2][:, [0, 2]] = model.logit_scale.exp() * text_features @ image_features.T
    torch.testing.assert_close(out.logits_per_text, expected)
    torch.testing.assert_close(out.logits_per_image, expected.T)
    classifier = ZidongForClassification(tiny_config(classification_modality="text", id2label={0: "a", 1: "b"}))
    with torch.no_grad():
        classified = classifier.eval()(**inputs, output_hidden_states=True)
    assert len(classified.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert classified.hidden_states[0].shape[0] == 2  # the rows that have text


def test_features_follow_the_transformers_convention() -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).eval()
    inputs = make_inputs({m: [True, True] for m in MODALITIES})
    calls = {
        "text": lambda **o: model.get_text_features(inputs["input_ids"], inputs["text_attention_mask"], **o),
        "vision": lambda **o: model.get_vision_features(inputs["pixel_values"], **o),
        "speech": lambda **o: model.get_speech_features(inputs["input_values"], inputs["speech_attention_mask"], **o),
    }
    with torch.no_grad():
        joint = model(**inputs)
        for modality, call in calls.items():
            features = call(output_hidden_states=True)
            assert torch.equal(features.pooler_output, getattr(joint, f"{modality}_embeds")), modality
            assert features.last_hidden_state.shape[0] == 2
            assert len(features.hidden_states) == getattr(model.config, f"{modality}_config").num_hidden_layers + 1
            assert torch.equal(call(return_dict=False)[1], features.pooler_output), modality
    with pytest.raises(TypeError, match="output_hidden_state"):
        calls["text"](output_hidden_state=True)  # a misspelt switch is refused, not ignored


def test_clip_and_clap_feature_names_give_the_vision_and_speech_features() -> None:
    # evaluation tools written for CLIP / CLAP call get_image_features(pixel_values=...) and get_audio_features(...)
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).eval()
    inputs = make_inputs({m: [True, True] for m in MODALITIES}, seed=4)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        vision = model.get_vision_features(pixel_values=inputs["pixel_values"])
        audio = model.get_audio_features(
            input_values=inputs["input_values"], attention_mask=inputs["speech_attention_mask"]
        )
        speech = model.get_speech_features(inputs["input_values"], inputs["speech_attention_mask"])
        hidden = model.get_audio_features(inputs["input_values"], output_hidden_states=True, return_dict=False)
    assert torch.equal(image.pooler_output, vision.pooler_output)
    assert torch.equal(audio.pooler_output, speech.pooler_output)
    assert isinstance(hidden, tuple)
    assert len(hidden[2]) == model.config.speech_config.num_hidden_layers + 1


def test_features_take_a_whole_processor_batch_and_refuse_what_is_not_theirs() -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).eval()
    inputs = make_inputs({m: [True, True] for m in MODALITIES}, seed=5)
    flags = {f"{m}_present": inputs[f"{m}_present"] for m in MODALITIES}
    with torch.no_grad():
        batch = model.get_text_features(inputs["input_ids"], text_attention_mask=inputs["text_attention_mask"], **flags)
        plain = model.get_text_features(inputs["input_ids"], inputs["text_attention_mask"])
        speech = model.get_audio_features(
            inputs["input_values"], speech_attention_mask=inputs["speech_attention_mask"], **flags
        )
        speech_plain = model.get_speech_features(inputs["input_values"], inputs["speech_attention_mask"])
    assert torch.equal(batch.pooler_output, plain.pooler_output)
    assert torch.equal(speech.pooler_output, speech_plain.pooler_output)
    mask = inputs["speech_attention_mask"]
    with pytest.raises(TypeError, match="give the speech padding mask once"):
        model.get_speech_features(inputs["input_values"], attention_mask=mask, speech_attention_mask=mask)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        model.get_image_features(inputs["pixel_values"], pixel_mask=torch.ones(2, 64, 64))
