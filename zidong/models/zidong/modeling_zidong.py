"""`ZidongModel`: three Hugging Face towers, a shared embedding space, a fusion encoder and the OPT-style heads.

    model = ZidongModel(ZidongConfig.from_preset("tiny"))
    out = model(input_ids=..., text_attention_mask=..., pixel_values=..., input_values=..., speech_attention_mask=...,
                text_present=..., vision_present=..., speech_present=...,
                return_loss=True, loss_weights={"contrastive": 1.0, "matching": 0.5, "masked_text": 0.5})
    out.text_embeds, out.vision_embeds, out.speech_embeds   # (batch, projection_dim), L2-normalised
    out.loss, out.losses                                      # weighted total; every objective and pair apart

Missing modalities. A batch of B samples carries per-modality inputs only for the samples that have that
modality (`text_present`, a (B,) bool mask, says which rows `input_ids` belongs to; likewise for vision and
speech). Each tower runs on its present rows only; the embeddings are scattered back to (B, D) with zeros for
absent rows, a pair loss uses only the samples that have both modalities, and the fusion encoder masks out the
modalities a sample lacks, so a missing modality never contributes a gradient.

Objectives (`loss_weights`; a weight of 0 or a missing key skips that objective's compute):
- `contrastive`: symmetric loss for every present modality pair, negatives gathered from all ranks.
- `matching`: the fusion encoder tells "matched" from "text / vision / speech was swapped" on negatives that
  swap one modality for the most similar other sample's (hard negatives, sampled from the contrastive scores).
- `masked_text` / `masked_vision` / `masked_speech`: one extra pass of the towers on masked inputs (BERT-style
  token masking, blanked image patches, blanked 20 ms speech spans); the fusion encoder, seeing the other
  modalities unmasked, predicts the masked tokens, pixels (per-patch normalised) and filterbank steps. With
  `modality_mask_probability` a whole modality of a multi-modal sample is masked (modality-level masking).

Lockstep (`lockstep=True`, used under DeepSpeed). ZeRO gathers and reduces parameters with collectives, so every
process must run the same modules in the same order and give every parameter a gradient, whatever its batch
holds. In lockstep a tower whose modality the batch lacks runs on a one-row placeholder, and a head with nothing
to score runs on one row; their outputs enter the loss multiplied by 0 (a zero gradient, the same call sequence
on every process). A forward with no inputs at all is a valid lockstep call (an idle evaluation batch).

Each tower is wrapped by an adapter that yields `TowerOutput(token_states, attention_mask, pooled)`: text and
speech pool by masked mean (independent of padding), vision takes its first (CLS) token.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_zidong import MODALITIES, ZidongConfig
from .feature_extraction_zidong import BatchedFbank, normalize_and_stack
from .fusion_zidong import ZidongFusionEncoder, ZidongFusionLayer, ZidongPredictionHead
from .losses_zidong import contrastive_losses, multiway_matching_loss, span_mask

OBJECTIVES = ("contrastive", "matching", "masked_text", "masked_vision", "masked_speech")
MATCHING_CLASSES = ("matched", "text_swapped", "vision_swapped", "speech_swapped")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class TowerOutput:
    token_states: torch.Tensor  # (n, tokens, hidden)
    attention_mask: torch.Tensor  # (n, tokens) bool, True on real tokens
    pooled: torch.Tensor  # (n, hidden)


@dataclass
class ZidongOutput(ModelOutput):
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    text_embeds: torch.Tensor | None = None
    vision_embeds: torch.Tensor | None = None
    speech_embeds: torch.Tensor | None = None
    text_present: torch.Tensor | None = None
    vision_present: torch.Tensor | None = None
    speech_present: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def modality_inputs(input_ids, text_attention_mask, pixel_values, input_values, speech_attention_mask) -> dict:
    """The forward's arguments grouped as modality -> (values, attention mask or None)."""
    return {
        "text": (input_ids, text_attention_mask),
        "vision": (pixel_values, None),
        "speech": (input_values, speech_attention_mask),
    }


def text_mask_argument(
    text_attention_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
) -> torch.Tensor | None:
    """The text padding mask, given as `text_attention_mask` (the processor's name) or `attention_mask` (what a
    tokenizer returns, the name CLIP and CLAP take). All-zero `token_type_ids` (from a BERT-style tokenizer) are
    the towers' default and ignored; other segment ids have no meaning here."""
    if attention_mask is not None and text_attention_mask is not None:
        raise TypeError("give the text padding mask once: attention_mask and text_attention_mask are the same input")
    if token_type_ids is not None and bool(token_type_ids.ne(0).any()):
        raise ValueError("token_type_ids must be all 0: zidong encodes one text segment per sample")
    return text_attention_mask if text_attention_mask is not None else attention_mask


def scatter_rows(rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Rows of the present samples -> a tensor over the whole batch, zeros (or False) where absent."""
    full = rows.new_zeros((present.shape[0], *rows.shape[1:]))
    full[present] = rows
    return full


class ZidongPreTrainedModel(PreTrainedModel):
    config_class = ZidongConfig
    base_model_prefix = "zidong"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # towers are built with attn_implementation="sdpa"; the fusion encoder calls SDPA

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # linear, embedding and norm layers outside the towers
        if isinstance(module, ZidongModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.constant_(module.logit_bias, self.config.logit_bias_init_value)
        elif isinstance(module, ZidongFusionEncoder):
            init.normal_(module.cls_token, std=self.config.initializer_range)
        elif isinstance(module, BatchedFbank):
            module.reset_buffers()


class ZidongModel(ZidongPreTrainedModel):
    def __init__(self, config: ZidongConfig):
        super().__init__(config)
        attention = config._attn_implementation or "sdpa"
        self.text_model = AutoModel.from_config(config.text_config, attn_implementation=attention)
        self.vision_model = AutoModel.from_config(config.vision_config, attn_implementation=attention)
        self.speech_model = AutoModel.from_config(config.speech_config, attn_implementation=attention)
        self.fbank = BatchedFbank(sampling_rate=config.sampling_rate, num_mel_bins=config.num_mel_bins)
        spec_masks: list[nn.Module] = []
        if config.spec_augment_freq_mask:
            spec_masks.append(torchaudio.transforms.FrequencyMasking(config.spec_augment_freq_mask, iid_masks=True))
        if config.spec_augment_time_mask:
            spec_masks.append(torchaudio.transforms.TimeMasking(config.spec_augment_time_mask, iid_masks=True))
        self.spec_augment = nn.Sequential(*spec_masks)
        widths = {modality: self._tower_width(modality) for modality in MODALITIES}
        self.text_projection = nn.Linear(widths["text"], config.projection_dim, bias=False)
        self.vision_projection = nn.Linear(widths["vision"], config.projection_dim, bias=False)
        self.speech_projection = nn.Linear(widths["speech"], config.projection_dim, bias=False)
        # shape (1,), not a 0-d scalar: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init_value)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(config.logit_bias_init_value)))
        self.fusion = ZidongFusionEncoder(config, widths)
        self.matching_head = nn.Linear(config.fusion_hidden_size, len(MATCHING_CLASSES))
        self.text_head = ZidongPredictionHead(config, config.text_config.vocab_size)
        vision = config.vision_config
        patch_size = getattr(vision, "patch_size", None)
        self.vision_head = (
            ZidongPredictionHead(config, patch_size * patch_size * getattr(vision, "num_channels", 3))
            if isinstance(patch_size, int)
            else None
        )
        self.speech_head = ZidongPredictionHead(config, config.num_mel_bins * config.speech_frame_stack)
        self._no_split_modules = sorted(
            {name for tower in self.towers().values() for name in (tower._no_split_modules or [])}
            | {ZidongFusionLayer.__name__}
        )
        self.post_init()

    def _tower_width(self, modality: str) -> int:
        tower_config = getattr(self.config, f"{modality}_config")
        if getattr(tower_config, "add_adapter", False) and getattr(tower_config, "output_hidden_size", None):
            return tower_config.output_hidden_size
        return tower_config.hidden_size

    def towers(self) -> dict[str, PreTrainedModel]:
        return {"text": self.text_model, "vision": self.vision_model, "speech": self.speech_model}

    @classmethod
    def from_pretrained_towers(
        cls,
        preset: str = "tiny",
        text: str | os.PathLike | None = None,
        vision: str | os.PathLike | None = None,
        speech: str | os.PathLike | None = None,
        **config_overrides,
    ) -> ZidongModel:
        """A new model whose towers start from local Hugging Face folders (the rest from `preset`).

        Each folder must hold a `config.json` and weights that `AutoModel.from_pretrained` reads; a tower given
        no folder is built from the preset. Raises ValueError naming the tower when a folder is unusable.
        """
        folders = {m: folder for m, folder in zip(MODALITIES, (text, vision, speech), strict=True) if folder}
        for modality, folder in folders.items():
            config_overrides[f"{modality}_config"] = _tower_config(modality, folder).to_dict()
        model = cls(ZidongConfig.from_preset(preset, **config_overrides))
        for modality, folder in folders.items():
            tower = AutoModel.from_pretrained(folder, attn_implementation=model.config._attn_implementation or "sdpa")
            model.towers()[modality].load_state_dict(tower.state_dict())
        return model

    # ---------------------------------------------------------------------------------------- adapters

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TowerOutput:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        states = self.text_model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        return TowerOutput(states, mask, masked_mean(states, mask))

    def encode_vision(self, pixel_values: torch.Tensor) -> TowerOutput:
        states = self.vision_model(pixel_values=pixel_values).last_hidden_state
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        return TowerOutput(states, mask, states[:, 0])

    def encode_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TowerOutput:
        """Waveforms (n, samples) at 16 kHz -> tower states; features run batched on the model's device."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_values, dtype=torch.long)
        if self._speech_takes_features:
            steps, step_mask = self.speech_steps(input_values, attention_mask, augment=self.training)
            return self._run_speech_tower(steps, step_mask)
        return self._run_speech_tower(input_values, attention_mask.bool())

    @property
    def _speech_takes_features(self) -> bool:
        return self.speech_model.main_input_name == "input_features"

    def speech_steps(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor, augment: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms -> normalised filterbank stacked to 20 ms steps (n, steps, bins x stack) and their mask."""
        features, frame_mask = self.fbank(input_values, attention_mask.long().sum(dim=1))
        if augment and len(self.spec_augment):
            # (n, 1, bins, frames): the 4-D layout under which torchaudio draws a different mask per utterance
            features = self.spec_augment(features.transpose(1, 2)[:, None])[:, 0].transpose(1, 2)
        return normalize_and_stack(features, frame_mask, self.config.speech_frame_stack)

    def _run_speech_tower(self, speech_inputs: torch.Tensor, input_mask: torch.Tensor) -> TowerOutput:
        if self._speech_takes_features:
            output = self.speech_model(input_features=speech_inputs, attention_mask=input_mask.long())
        else:
            output = self.speech_model(input_values=speech_inputs, attention_mask=input_mask.long())
        states = output.last_hidden_state
        if states.shape[1] != input_mask.shape[1]:  # the tower subsamples: map the mask onto its token grid
            mask = self.speech_model._get_feature_vector_attention_mask(states.shape[1], input_mask.long()).bool()
        else:
            mask = input_mask.bool()
        return TowerOutput(states, mask, masked_mean(states, mask))

    # ---------------------------------------------------------------------------------- CLIP-style API

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._embed("text", self.encode_text(input_ids, attention_mask))

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._embed("vision", self.encode_vision(pixel_values))

    def get_speech_features(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._embed("speech", self.encode_speech(input_values, attention_mask))

    def _embed(self, modality: str, tower_output: TowerOutput) -> torch.Tensor:
        projection = getattr(self, f"{modality}_projection")
        return F.normalize(projection(tower_output.pooled), dim=-1)

    # ------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        speech_attention_mask: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        vision_present: torch.Tensor | None = None,
        speech_present: torch.Tensor | None = None,
        return_loss: bool = False,
        loss_weights: Mapping[str, float] | None = None,
        lockstep: bool = False,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ZidongOutput:
        """Embeddings of every given modality and, with `return_loss`, the weighted objectives.

        `loss_weights` maps objective names (`OBJECTIVES`) to weights; by default only `contrastive` (1.0).
        `lockstep=True` runs every tower and every weighted head on every call (see the module docstring).
        `attention_mask` is accepted for `text_attention_mask` (`model(**tokenizer(texts, padding=True))`); an
        unknown keyword argument raises TypeError.
        """
        text_attention_mask = text_mask_argument(text_attention_mask, attention_mask, token_type_ids)
        weights = self._loss_weights(loss_weights) if return_loss else {}
        inputs = modality_inputs(input_ids, text_attention_mask, pixel_values, input_values, speech_attention_mask)
        presence = self._presence(inputs, {"text": text_present, "vision": vision_present, "speech": speech_present})
        idle: list[torch.Tensor] | None = [] if lockstep else None
        if lockstep:  # absent modalities run on a placeholder row; presence (all False) keeps it out of every loss
            inputs = {m: value if presence[m].any() else self._placeholder(m) for m, value in inputs.items()}
        towers: dict[str, TowerOutput] = {}
        embeds: dict[str, torch.Tensor | None] = dict.fromkeys(MODALITIES)
        for modality in MODALITIES:
            if presence[modality].any() or lockstep:
                with self._idle_if(not presence[modality].any()):
                    towers[modality] = self._encode(modality, *inputs[modality])
                embeds[modality] = scatter_rows(self._embed(modality, towers[modality]), presence[modality])
                if idle is not None:  # a projection that no pair loss reads still takes part
                    idle.append(embeds[modality])
        losses: dict[str, torch.Tensor] = {}
        if weights.get("contrastive"):
            losses.update(self.contrastive_losses(embeds, presence))
        if weights.get("matching"):
            losses.update(self.matching_loss(towers, embeds, presence, idle))
        if any(weights.get(f"masked_{modality}") for modality in MODALITIES):
            losses.update(self.masked_modelling_losses(inputs, towers, presence, weights, idle))
        loss = None
        if return_loss:
            loss = self.logit_scale[0] * 0.0  # keeps a graph even when nothing in the batch can be scored
            for objective, weight in weights.items():
                if objective in losses:
                    loss = loss + weight * losses[objective]
            for term in idle or []:
                loss = loss + 0.0 * term.float().sum()
        return ZidongOutput(
            loss=loss,
            losses=losses if return_loss else None,
            text_embeds=embeds["text"],
            vision_embeds=embeds["vision"],
            speech_embeds=embeds["speech"],
            text_present=presence["text"],
            vision_present=presence["vision"],
            speech_present=presence["speech"],
            logit_scale=self.logit_scale,
        )

    @contextlib.contextmanager
    def _idle_if(self, idle: bool):
        """Around lockstep placeholder work: leaves torch's and numpy's random state as it found them, so the
        real rows' dropout and masks are those of an ordinary forward."""
        if not idle:
            yield
            return
        numpy_state = np.random.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            yield
        np.random.set_state(numpy_state)

    def _placeholder(self, modality: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One short, valid input row for a tower (lockstep): two tokens, a blank image, half a second of silence."""
        if modality == "text":
            token = self.config.text_config.pad_token_id or 0
            return torch.full((1, 2), token, dtype=torch.long, device=self.device), None
        if modality == "vision":
            vision = self.config.vision_config
            size = getattr(vision, "image_size", 224)
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            channels = getattr(vision, "num_channels", 3)
            return torch.zeros(1, channels, height, width, dtype=self.dtype, device=self.device), None
        samples = self.config.sampling_rate // 2
        return torch.zeros(1, samples, device=self.device), torch.ones(1, samples, dtype=torch.long, device=self.device)

    def _encode(self, modality: str, values: torch.Tensor, mask: torch.Tensor | None) -> TowerOutput:
        if modality == "text":
            return self.encode_text(values, mask)
        if modality == "vision":
            return self.encode_vision(values)
        return self.encode_speech(values, mask)

    @staticmethod
    def _loss_weights(loss_weights: Mapping[str, float] | None) -> dict[str, float]:
        if loss_weights is None:
            return {"contrastive": 1.0}
        unknown = sorted(set(loss_weights) - set(OBJECTIVES))
        if unknown:
            raise ValueError(
                f"unknown objective(s) {', '.join(unknown)} in loss_weights; known: {', '.join(OBJECTIVES)}"
            )
        return {name: float(weight) for name, weight in loss_weights.items() if weight}

    def _presence(self, inputs: dict, given: dict) -> dict[str, torch.Tensor]:
        """Per-modality (B,) bool masks, checked against the number of rows each modality was given."""
        counts = {m: 0 if inputs[m][0] is None else inputs[m][0].shape[0] for m in MODALITIES}
        sizes = {given[m].shape[0] if given[m] is not None else counts[m] for m in MODALITIES}
        sizes -= {0} if len(sizes) > 1 else set()
        if len(sizes) > 1:
            raise ValueError(
                "inputs of different batch sizes need text_present / vision_present / speech_present masks"
            )
        batch = sizes.pop()
        presence = {}
        for modality in MODALITIES:
            mask = given[modality]
            if mask is None:
                mask = torch.full((batch,), counts[modality] > 0, dtype=torch.bool, device=self.device)
            mask = mask.to(device=self.device, dtype=torch.bool)
            if int(mask.sum()) != counts[modality]:
                raise ValueError(
                    f"{modality}_present marks {int(mask.sum())} samples but {counts[modality]} {modality} "
                    "inputs were given"
                )
            presence[modality] = mask
        return presence

    # ------------------------------------------------------------------------------------- objectives

    def contrastive_losses(
        self, embeds: dict[str, torch.Tensor | None], presence: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """`contrastive_<a>_<b>` for every pair some sample (on any rank) has, and `contrastive`, their mean."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=self.config.logit_scale_max)
        losses = contrastive_losses(
            embeds,
            presence,
            self.logit_scale[0],
            self.logit_bias[0],
            self.config.contrastive_loss,
            self.config.projection_dim,
        )
        if losses:
            losses["contrastive"] = torch.stack(list(losses.values())).mean()
        return losses

    def matching_loss(
        self,
        towers: dict[str, TowerOutput],
        embeds: dict[str, torch.Tensor | None],
        presence: dict[str, torch.Tensor],
        idle: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Multi-way matching on each multi-modal sample and one hard negative of it (one modality swapped).

        With nothing to score and an `idle` list (lockstep), the fusion encoder and head run on one row and
        their output is appended to `idle` instead."""
        streams = {m: self._fusion_stream(m, towers[m], presence[m]) for m in towers}
        present = torch.stack([presence[m] for m in MODALITIES], dim=1)  # (B, 3)
        eligible = present.sum(dim=1) >= 2
        with torch.no_grad():
            swapped, partner = self._mine_hard_negatives(embeds, present, eligible)
        negatives = swapped >= 0
        positive_rows, negative_rows = eligible.nonzero()[:, 0], negatives.nonzero()[:, 0]
        if positive_rows.numel() == 0:
            if idle is not None:
                with self._idle_if(True):
                    fused = self.fusion({m: (states[:1], mask[:1]) for m, (states, mask) in streams.items()})
                idle.append(self.matching_head(fused.states[:, 0]))
            return {}
        fused_inputs = {}
        for m, (states, mask) in streams.items():
            index = torch.where(
                swapped == MODALITIES.index(m), partner, torch.arange(len(partner), device=partner.device)
            )
            negative_index = index[negative_rows]
            # index_select, not states[...]: a partner can be drawn twice, and the backward of advanced indexing
            # accumulates repeated rows with atomic adds on CPU (run-to-run differences); index_add is ordered
            fused_inputs[m] = (
                torch.cat([states.index_select(0, positive_rows), states.index_select(0, negative_index)]),
                torch.cat([mask[positive_rows], mask[negative_index]]),
            )
        logits = self.matching_head(self.fusion(fused_inputs).states[:, 0])
        rows = torch.cat([positive_rows, negative_rows])
        allowed = torch.cat([torch.ones_like(rows, dtype=torch.bool)[:, None], present[rows]], dim=1)
        target = torch.zeros_like(allowed)
        target[: len(positive_rows), 0] = True
        negative_target = present[negative_rows].clone()  # a pair's negative: either side counts as "swapped"
        triplets = present[negative_rows].sum(dim=1) > 2
        negative_target[triplets] = F.one_hot(swapped[negative_rows][triplets], len(MODALITIES)).bool()
        target[len(positive_rows) :, 1:] = negative_target
        return {"matching": multiway_matching_loss(logits, allowed, target)}

    def _mine_hard_negatives(
        self, embeds: dict[str, torch.Tensor | None], present: torch.Tensor, eligible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each multi-modal sample: which modality to swap (-1: none possible) and whose to take instead.

        The partner is drawn in proportion to softmax(similarity / temperature) between the sample's other
        modalities and candidates' embeddings of the swapped one, so similar (hard) negatives dominate.
        """
        batch = present.shape[0]
        scale = self.logit_scale[0].exp()
        candidate_scores = torch.full((batch, len(MODALITIES), batch), float("-inf"), device=present.device)
        for index, modality in enumerate(MODALITIES):
            if embeds[modality] is None:
                continue
            similarity = torch.zeros(batch, batch, device=present.device)
            others = 0
            for other_index, other in enumerate(MODALITIES):
                if other != modality and embeds[other] is not None:
                    similarity += present[:, other_index, None] * (embeds[other] @ embeds[modality].T).float()
                    others = others + present[:, other_index, None].float()
            valid = eligible[:, None] & present[:, index, None] & present[None, :, index]
            valid &= ~torch.eye(batch, dtype=torch.bool, device=present.device)
            scores = scale * similarity / torch.as_tensor(others).clamp(min=1)
            candidate_scores[:, index] = scores.masked_fill(~valid, float("-inf"))
        possible = candidate_scores.isfinite().any(dim=2)  # (B, 3): a partner exists for that swap
        choice = torch.rand(possible.shape, device=present.device).masked_fill(~possible, -1.0)
        swapped = torch.where(possible.any(dim=1), choice.argmax(dim=1), -1)
        partner = torch.zeros(batch, dtype=torch.long, device=present.device)
        rows = (swapped >= 0).nonzero()[:, 0]
        if rows.numel():
            probabilities = candidate_scores[rows, swapped[rows]].softmax(dim=-1)
            partner[rows] = torch.multinomial(probabilities, 1)[:, 0]
        return swapped, partner

    def _fusion_stream(
        self, modality: str, tower_output: TowerOutput, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A tower's states, embedded for the fusion encoder, over the whole batch (absent rows fully masked)."""
        states = self.fusion.embed(modality, tower_output.token_states)
        return scatter_rows(states, present), scatter_rows(tower_output.attention_mask, present)

    def masked_modelling_losses(
        self,
        inputs: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]],
        towers: dict[str, TowerOutput],
        presence: dict[str, torch.Tensor],
        weights: dict[str, float],
        idle: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Masked text / vision / speech modelling through the fusion encoder, in one extra pass.

        With an `idle` list (lockstep), a head with nothing masked runs on one fused row, appended to `idle`."""
        targets = [m for m in towers if weights.get(f"masked_{m}")]
        whole = self._modality_level_mask(targets, presence)
        streams, predictions = {}, {}
        for modality, tower_output in towers.items():
            if modality in targets:
                masker = getattr(self, f"_mask_{modality}")
                rows = whole[modality][presence[modality]]
                if not presence[modality].any():  # a lockstep placeholder row
                    rows = torch.zeros(tower_output.pooled.shape[0], dtype=torch.bool, device=self.device)
                with self._idle_if(not presence[modality].any()):
                    tower_output, predictions[modality] = masker(*inputs[modality], rows)
            streams[modality] = self._fusion_stream(modality, tower_output, presence[modality])
        fused = self.fusion(streams)
        losses = {}
        for modality, (chosen, target, score) in predictions.items():
            chosen = chosen if presence[modality].any() else chosen[:0]
            if not chosen.any():
                if idle is not None:
                    idle.append(getattr(self, f"{modality}_head")(fused.modality(modality)[:1, :1]))
                continue
            states = fused.modality(modality)[presence[modality]]
            states = states[:, states.shape[1] - chosen.shape[1] :][chosen]  # vision: skip CLS/prefix tokens
            predicted = getattr(self, f"{modality}_head")(states).float()
            expected = target[chosen]
            losses[f"masked_{modality}"] = score(
                predicted, expected.float() if expected.is_floating_point() else expected
            )
        return losses

    def _modality_level_mask(self, targets: list[str], presence: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per modality, which samples have it masked entirely: at most one modality per multi-modal sample."""
        batch = presence["text"].shape[0]
        whole = {m: torch.zeros(batch, dtype=torch.bool, device=self.device) for m in MODALITIES}
        if not targets or not self.config.modality_mask_probability:
            return whole
        present = torch.stack([presence[m] for m in MODALITIES], dim=1)
        candidates = present & torch.tensor([m in targets for m in MODALITIES], device=self.device)
        drawn = (torch.rand(batch, device=self.device) < self.config.modality_mask_probability) & (
            present.sum(dim=1) >= 2
        )
        choice = torch.rand(candidates.shape, device=self.device).masked_fill(~candidates, -1.0).argmax(dim=1)
        drawn &= candidates.any(dim=1)
        for index, modality in enumerate(MODALITIES):
            whole[modality] = drawn & (choice == index)
        return whole

    def _mask_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, whole: torch.Tensor):
        """BERT-style masking (80% mask token, 10% random token, 10% kept); cross-entropy on the chosen ones."""
        if self.config.mask_token_id is None:
            raise ValueError(
                "ZidongConfig.mask_token_id is not set; masked_text needs the tokenizer's mask token id "
                "(the trainer sets it from the tokenizer)"
            )
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        special = torch.tensor(sorted(self._special_token_ids()), dtype=input_ids.dtype, device=input_ids.device)
        candidates = mask & ~torch.isin(input_ids, special)
        draws = torch.rand(input_ids.shape, device=input_ids.device)
        chosen = candidates & ((draws < self.config.text_mask_probability) | whole[:, None])
        replace = torch.rand(input_ids.shape, device=input_ids.device)
        random_ids = torch.randint_like(input_ids, self.config.text_config.vocab_size)
        masked = torch.where(chosen & (replace < 0.8), self.config.mask_token_id, input_ids)
        masked = torch.where(chosen & (replace >= 0.8) & (replace < 0.9), random_ids, masked)
        return self.encode_text(masked, mask), (chosen, input_ids, F.cross_entropy)

    def _special_token_ids(self) -> set[int]:
        names = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "mask_token_id")
        ids = {getattr(self.config.text_config, name, None) for name in names} | {self.config.mask_token_id}
        return {token for token in ids if isinstance(token, int)}

    def _mask_vision(self, pixel_values: torch.Tensor, _: None, whole: torch.Tensor):
        """Blank a random `vision_mask_ratio` of patches; regress their per-patch normalised pixels."""
        if self.vision_head is None:
            raise ValueError(
                "masked_vision needs a patch-based vision tower (vision_config.patch_size); "
                f"{self.config.vision_config.model_type} has none; set its loss weight to 0"
            )
        size = self.config.vision_config.patch_size
        batch, channels, height, width = pixel_values.shape
        grid = (height // size, width // size)
        patches = (
            pixel_values[:, :, : grid[0] * size, : grid[1] * size]
            .reshape(batch, channels, grid[0], size, grid[1], size)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(batch, grid[0] * grid[1], size * size * channels)
        )
        count = round(self.config.vision_mask_ratio * patches.shape[1])
        ranks = torch.rand(patches.shape[:2], device=pixel_values.device).argsort(dim=1).argsort(dim=1)
        chosen = (ranks < count) | whole[:, None]
        blanked = patches.masked_fill(chosen[..., None], 0.0)
        masked = pixel_values.clone()
        masked[:, :, : grid[0] * size, : grid[1] * size] = (
            blanked.reshape(batch, grid[0], grid[1], size, size, channels)
            .permute(0, 5, 1, 3, 2, 4)
            .reshape(batch, channels, grid[0] * size, grid[1] * size)
        )
        tower_output = self.encode_vision(masked)
        if tower_output.token_states.shape[1] < patches.shape[1]:
            raise ValueError(
                f"the vision tower returns {tower_output.token_states.shape[1]} tokens for {patches.shape[1]} patches; "
                "masked_vision needs one token per patch"
            )
        mean, variance = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        target = (patches - mean) / (variance + 1e-6).sqrt()
        return tower_output, (chosen, target, F.mse_loss)

    def _mask_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None, whole: torch.Tensor):
        """Blank spans of 20 ms steps (features, or the waveform samples under them); regress the filterbank."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_values, dtype=torch.long)
        steps, step_mask = self.speech_steps(input_values, attention_mask)
        chosen_steps = span_mask(step_mask, self.config.speech_mask_ratio, self.config.speech_mask_span)
        chosen_steps |= whole[:, None] & step_mask
        if self._speech_takes_features:
            tower_output = self._run_speech_tower(steps.masked_fill(chosen_steps[..., None], 0.0), step_mask)
        else:
            samples_per_step = self.fbank.window_shift * self.config.speech_frame_stack
            blank = chosen_steps.repeat_interleave(samples_per_step, dim=1)[:, : input_values.shape[1]]
            blank = F.pad(blank, (0, input_values.shape[1] - blank.shape[1]))
            tower_output = self._run_speech_tower(input_values.masked_fill(blank, 0.0), attention_mask.bool())
        tokens = tower_output.token_states.shape[1]  # the tower may subsample: targets follow its token grid
        chosen = F.adaptive_avg_pool1d(chosen_steps[:, None].float(), tokens)[:, 0] > 0.5
        target = F.adaptive_avg_pool1d(steps.transpose(1, 2), tokens).transpose(1, 2)
        return tower_output, (chosen & tower_output.attention_mask, target, F.mse_loss)


@dataclass
class ZidongClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None  # (batch, classes); zero rows where a sample lacks the modality
    present: torch.Tensor | None = None  # (batch,) bool: the rows that were classified


class ZidongForClassification(ZidongPreTrainedModel):
    """A linear classifier on one tower's pooled output (`config.classification_modality`, classes from
    `config.id2label`): the tower's mean-pooled (text, speech) or CLS (vision) state, as in `ZidongModel`.

    Takes the processor's batch (other modalities are ignored) and `labels` (batch,), -1 for unlabelled rows;
    the loss is the cross-entropy over the rows that have the modality and a label. `lockstep` as in
    `ZidongModel.forward`: a batch without the modality still runs the tower on a placeholder row.
    """

    def __init__(self, config: ZidongConfig):
        super().__init__(config)
        if config.classification_modality not in MODALITIES:
            raise ValueError(
                f"ZidongForClassification needs config.classification_modality in {', '.join(MODALITIES)}, "
                f"got {config.classification_modality!r}"
            )
        self.zidong = ZidongModel(config)
        self.classifier = nn.Linear(self.zidong._tower_width(config.classification_modality), config.num_labels)
        self.post_init()

    def towers(self) -> dict[str, PreTrainedModel]:
        return self.zidong.towers()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        speech_attention_mask: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        vision_present: torch.Tensor | None = None,
        speech_present: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        lockstep: bool = False,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ZidongClassifierOutput:
        """Logits for the rows that have the classified modality and, with `labels`, their cross-entropy.
        `attention_mask` is accepted for `text_attention_mask`; an unknown keyword argument raises TypeError."""
        text_attention_mask = text_mask_argument(text_attention_mask, attention_mask, token_type_ids)
        modality = self.config.classification_modality
        inputs = modality_inputs(input_ids, text_attention_mask, pixel_values, input_values, speech_attention_mask)
        given = {"text": text_present, "vision": vision_present, "speech": speech_present}
        present = self.zidong._presence(inputs, given)[modality]
        logits = self.classifier.weight.new_zeros(present.shape[0], self.config.num_labels)
        idle = None
        if present.any():
            rows = self.classifier(self.zidong._encode(modality, *inputs[modality]).pooled)
            logits = scatter_rows(rows, present)
        elif lockstep:
            with self.zidong._idle_if(True):
                idle = self.classifier(self.zidong._encode(modality, *self.zidong._placeholder(modality)).pooled)
        loss = None
        if labels is not None:
            scored = present & (labels.to(present.device) >= 0)
            loss = self.classifier.bias.sum() * 0.0  # a graph even when nothing in the batch can be scored
            if scored.any():
                loss = loss + F.cross_entropy(logits[scored].float(), labels.to(present.device)[scored])
            if idle is not None:
                loss = loss + 0.0 * idle.float().sum()
        return ZidongClassifierOutput(
            loss=loss, losses={"classify": loss} if loss is not None else None, logits=logits, present=present
        )


def _tower_config(modality: str, folder: str | os.PathLike):
    """The config of a local pretrained tower folder, after checking that the folder holds a model."""
    field = f"model.{modality}.pretrained"
    if not os.path.isdir(folder):
        raise ValueError(f"{field}: {folder} is not a folder (give a local Hugging Face model folder)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{field}: {folder} holds no config.json, so it is not a Hugging Face model folder")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise ValueError(f"{field}: {folder} holds no model weights (expected one of {', '.join(WEIGHT_FILES)})")
    return AutoConfig.from_pretrained(folder)


__all__ = [
    "MATCHING_CLASSES",
    "OBJECTIVES",
    "ZidongClassifierOutput",
    "ZidongForClassification",
    "ZidongModel",
    "ZidongOutput",
    "ZidongPreTrainedModel",
]
