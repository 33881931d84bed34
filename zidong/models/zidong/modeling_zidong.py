"""`ZidongModel`: three Hugging Face towers, projections into one shared space, and contrastive alignment.

    model = ZidongModel(ZidongConfig.from_preset("tiny"))
    out = model(input_ids=..., text_attention_mask=..., pixel_values=..., input_values=..., speech_attention_mask=...,
                text_present=..., vision_present=..., speech_present=..., return_loss=True)
    out.text_embeds, out.vision_embeds, out.speech_embeds   # (batch, projection_dim), L2-normalised
    out.loss, out.losses                                      # total and per modality pair

Missing modalities. A batch of B samples carries per-modality inputs only for the samples that have that
modality (`text_present`, a (B,) bool mask, says which rows `input_ids` belongs to; likewise for vision and
speech). Each tower runs on its present rows only; the embeddings are scattered back to (B, D) with zeros for
absent rows, and a pair loss uses only the samples that have both modalities, so a missing pair contributes no
gradient. Omitting a mask means "all B samples have it".

Each tower is wrapped by an adapter that yields `TowerOutput(token_states, attention_mask, pooled)`: text and
speech pool by masked mean (independent of padding), vision takes its first (CLS) token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_zidong import ZidongConfig
from .feature_extraction_zidong import BatchedFbank, normalize_and_stack

MODALITIES = ("text", "vision", "speech")


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


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `tensor` from every rank along dim 0, keeping the gradient path to each rank's own rows.

    Ranks may hold different row counts. Returns the concatenation and the index at which this rank's rows
    start in it; single-process (or no process group) returns `tensor` itself and 0.
    """
    if not _distributed():
        return tensor, 0
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=tensor.device))
    counts = [int(count.item()) for count in counts]
    padded = F.pad(tensor, (0, 0, 0, max(counts) - tensor.shape[0]))
    pieces = all_gather(padded)
    gathered = torch.cat([piece[:count] for piece, count in zip(pieces, counts, strict=True)])
    return gathered, sum(counts[: dist.get_rank()])


def contrastive_pair_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None, kind: str
) -> torch.Tensor:
    """Local rows against global columns (gather-with-grad), InfoNCE ("softmax") or SigLIP ("sigmoid").

    With one process this is the ordinary symmetric loss over the batch.
    """
    gathered, offset = gather_with_grad(torch.cat([a, b], dim=1))  # one collective for both sides
    all_a, all_b = gathered.split([a.shape[1], b.shape[1]], dim=1)
    scale = logit_scale.exp()
    logits_ab = scale * a @ all_b.T
    logits_ba = scale * b @ all_a.T
    if kind == "sigmoid":
        targets = -torch.ones_like(logits_ab)
        rows = torch.arange(a.shape[0], device=a.device)
        targets[rows, rows + offset] = 1.0
        return -(F.logsigmoid(targets * (logits_ab + logit_bias)).sum() / all_a.shape[0])
    labels = torch.arange(a.shape[0], device=a.device) + offset
    return (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2


class ZidongPreTrainedModel(PreTrainedModel):
    config_class = ZidongConfig
    base_model_prefix = "zidong"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ZidongModel):
            module.logit_scale.data.fill_(self.config.logit_scale_init_value)
            module.logit_bias.data.fill_(self.config.logit_bias_init_value)
        elif isinstance(module, BatchedFbank):
            module.reset_buffers()
        elif isinstance(module, nn.Linear) and getattr(module, "_zidong_projection", False):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)


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
            spec_masks.append(torchaudio.transforms.FrequencyMasking(config.spec_augment_freq_mask))
        if config.spec_augment_time_mask:
            spec_masks.append(torchaudio.transforms.TimeMasking(config.spec_augment_time_mask))
        self.spec_augment = nn.Sequential(*spec_masks)
        self.text_projection = self._projection(config.text_config)
        self.vision_projection = self._projection(config.vision_config)
        self.speech_projection = self._projection(config.speech_config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
        self._no_split_modules = sorted(
            {name for tower in self.towers().values() for name in (tower._no_split_modules or [])}
        )
        self.post_init()

    def _projection(self, tower_config) -> nn.Linear:
        width = (
            getattr(tower_config, "output_hidden_size", None) if getattr(tower_config, "add_adapter", False) else None
        )
        layer = nn.Linear(width or tower_config.hidden_size, self.config.projection_dim, bias=False)
        layer._zidong_projection = True
        return layer

    def towers(self) -> dict[str, PreTrainedModel]:
        return {"text": self.text_model, "vision": self.vision_model, "speech": self.speech_model}

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
        lengths = attention_mask.long().sum(dim=1)
        if self.speech_model.main_input_name == "input_features":
            features, frame_mask = self.fbank(input_values, lengths)
            if self.training and len(self.spec_augment):
                features = self.spec_augment(features.transpose(1, 2)).transpose(1, 2)
            features, step_mask = normalize_and_stack(features, frame_mask, self.config.speech_frame_stack)
            output = self.speech_model(input_features=features, attention_mask=step_mask.long())
            input_mask = step_mask
        else:
            output = self.speech_model(input_values=input_values, attention_mask=attention_mask.long())
            input_mask = attention_mask
        states = output.last_hidden_state
        if states.shape[1] != input_mask.shape[1]:
            mask = self.speech_model._get_feature_vector_attention_mask(states.shape[1], input_mask.long()).bool()
        else:
            mask = input_mask.bool()
        return TowerOutput(states, mask, masked_mean(states, mask))

    # ---------------------------------------------------------------------------------- CLIP-style API

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_projection(self.encode_text(input_ids, attention_mask).pooled), dim=-1)

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_projection(self.encode_vision(pixel_values).pooled), dim=-1)

    def get_speech_features(
        self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.normalize(self.speech_projection(self.encode_speech(input_values, attention_mask).pooled), dim=-1)

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
        **kwargs,
    ) -> ZidongOutput:
        inputs = {"text": input_ids, "vision": pixel_values, "speech": input_values}
        presence = {"text": text_present, "vision": vision_present, "speech": speech_present}
        batch = self._batch_size(inputs, presence)
        embeds: dict[str, torch.Tensor | None] = {}
        for modality in MODALITIES:
            rows = inputs[modality]
            present = presence[modality]
            if rows is None or rows.shape[0] == 0:
                embeds[modality], presence[modality] = None, torch.zeros(batch, dtype=torch.bool, device=self.device)
                continue
            if present is None:
                present = torch.ones(batch, dtype=torch.bool, device=rows.device)
            if int(present.sum()) != rows.shape[0]:
                raise ValueError(
                    f"{modality}_present marks {int(present.sum())} samples but {rows.shape[0]} {modality} inputs were given"
                )
            if modality == "text":
                local = self.get_text_features(input_ids, text_attention_mask)
            elif modality == "vision":
                local = self.get_vision_features(pixel_values)
            else:
                local = self.get_speech_features(input_values, speech_attention_mask)
            full = local.new_zeros(batch, local.shape[1])
            full[present.bool()] = local
            embeds[modality], presence[modality] = full, present.bool()
        loss, losses = self.contrastive_losses(embeds, presence) if return_loss else (None, None)
        return ZidongOutput(
            loss=loss,
            losses=losses,
            text_embeds=embeds["text"],
            vision_embeds=embeds["vision"],
            speech_embeds=embeds["speech"],
            text_present=presence["text"],
            vision_present=presence["vision"],
            speech_present=presence["speech"],
            logit_scale=self.logit_scale,
        )

    def contrastive_losses(
        self, embeds: dict[str, torch.Tensor | None], presence: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One loss per modality pair over the samples that have both; the total is their mean."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=self.config.logit_scale_max)
        losses = {}
        for first, second in itertools.combinations(MODALITIES, 2):
            if embeds[first] is None or embeds[second] is None:
                continue
            both = presence[first] & presence[second]
            if not both.any() and not _distributed():
                continue  # no sample has this pair (ranks must still join the gather, hence the rank check)
            losses[f"contrastive_{first}_{second}"] = contrastive_pair_loss(
                embeds[first][both],
                embeds[second][both],
                self.logit_scale,
                self.logit_bias,
                self.config.contrastive_loss,
            )
        total = torch.stack(list(losses.values())).mean() if losses else self.logit_scale * 0.0
        return total, losses

    @staticmethod
    def _batch_size(inputs: dict, presence: dict) -> int:
        for modality in MODALITIES:
            if presence[modality] is not None:
                return presence[modality].shape[0]
        sizes = {rows.shape[0] for rows in inputs.values() if rows is not None}
        if len(sizes) != 1:
            raise ValueError(
                "inputs of different batch sizes need text_present / vision_present / speech_present masks"
            )
        return sizes.pop()


__all__ = ["ZidongModel", "ZidongPreTrainedModel"]
