"""`ZidongForClassification`: a linear classifier on one tower of `ZidongModel` (fine-tuning, linear probes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple

from .arguments_zidong import batch_presence, modality_inputs, text_mask_argument
from .configuration_zidong import MODALITIES, ZidongConfig
from .lockstep_zidong import Lockstep
from .modeling_zidong import ZidongModel, ZidongPreTrainedModel
from .towers_zidong import scatter_rows, tower_width


@dataclass
class ZidongClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None  # (batch, classes); zero rows where a sample lacks the modality
    present: torch.Tensor | None = None  # (batch,) bool: the rows that were classified
    # the classified tower's, on those rows, when asked for (as a transformers classifier returns its encoder's)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class ZidongForClassification(ZidongPreTrainedModel):
    """A linear classifier on one tower's pooled output (`config.classification_modality`, classes from
    `config.id2label`): the tower's pooled state as in `ZidongModel` (masked mean for text and speech; for
    vision, `vision_pooling`).

    Takes the processor's batch (other modalities are ignored) and `labels` (batch,), -1 for unlabelled rows;
    the loss is the cross-entropy over the rows that have the modality and a label. In lockstep
    (`prepare_for_launcher`) a batch without the modality still runs the tower on a placeholder row.
    """

    def __init__(self, config: ZidongConfig):
        super().__init__(config)
        if config.classification_modality not in MODALITIES:
            raise ValueError(
                f"ZidongForClassification needs config.classification_modality in {', '.join(MODALITIES)}, "
                f"got {config.classification_modality!r}"
            )
        self.zidong = ZidongModel(config)
        self.classifier = nn.Linear(tower_width(config, config.classification_modality), config.num_labels)
        self.post_init()

    def towers(self) -> dict[str, PreTrainedModel]:
        return self.zidong.towers()

    @can_return_tuple
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
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> ZidongClassifierOutput:
        """Logits for the rows that have the classified modality and, with `labels`, their cross-entropy; the
        classified tower's hidden states and attentions with `output_hidden_states` / `output_attentions`.
        `attention_mask` is accepted for `text_attention_mask`; an unknown keyword argument raises TypeError."""
        text_attention_mask = text_mask_argument(text_attention_mask, attention_mask, token_type_ids)
        modality = self.config.classification_modality
        inputs = modality_inputs(input_ids, text_attention_mask, pixel_values, input_values, speech_attention_mask)
        given = {"text": text_present, "vision": vision_present, "speech": speech_present}
        presence = batch_presence(inputs, given, self.device)
        present = presence[modality]
        lockstep = Lockstep(self.zidong, self.launch.lockstep)
        logits = self.classifier.weight.new_zeros(present.shape[0], self.config.num_labels)
        tower_output = None
        if presence.has(modality):
            switches = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
            tower_output = self.zidong.encode(modality, *inputs[modality], **switches)
            logits = scatter_rows(self.classifier(tower_output.pooled), present, presence.rows[modality])
        else:  # in lockstep the tower still runs, on a placeholder row
            lockstep.idle(lambda: self.classifier(self.zidong.encode(modality, *lockstep.placeholder(modality)).pooled))
        loss = None
        if labels is not None:
            labels = labels.to(present.device)
            scored = present & (labels >= 0)
            # the mean over scored rows, without reading how many there are (0 scored: a loss of 0 with a graph)
            summed = F.cross_entropy(logits.float(), labels.masked_fill(~scored, -100), reduction="sum")
            loss = lockstep.tie(summed / scored.sum().clamp(min=1) + self.classifier.bias.sum() * 0.0)
        return ZidongClassifierOutput(
            loss=loss,
            losses={"classify": loss} if loss is not None else None,
            logits=logits,
            present=present,
            hidden_states=tower_output.hidden_states if tower_output is not None else None,
            attentions=tower_output.attentions if tower_output is not None else None,
        )


__all__ = ["ZidongClassifierOutput", "ZidongForClassification"]
