"""What `ZidongModel.forward` returns: `ZidongOutput`, with each tower's own output and CLIP's logits.

Imports only torch and transformers so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .towers_zidong import TowerOutput


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
    # CLIP's names: (B, B) text x vision similarity logits (exp(logit_scale) x cosine, + logit_bias for the sigmoid
    # loss; 0 or the bias where a sample lacks either), and its transpose
    logits_per_text: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    # each tower's own output on the rows that have its modality (None where no sample has it), as CLIP's
    # text_model_output: last_hidden_state, pooler_output (before the projection), and hidden states and
    # attentions when asked for (`output_hidden_states` / `output_attentions`, or the tower's config)
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    speech_model_output: BaseModelOutputWithPooling | None = None


def tower_model_output(tower_output: TowerOutput, pooled: torch.Tensor | None = None) -> BaseModelOutputWithPooling:
    """One tower's `TowerOutput` as transformers returns a tower's output; `pooled` stands for its pooled state
    where given (the features methods put the embedding there, as CLIP's do)."""
    return BaseModelOutputWithPooling(
        last_hidden_state=tower_output.token_states,
        pooler_output=tower_output.pooled if pooled is None else pooled,
        hidden_states=tower_output.hidden_states,
        attentions=tower_output.attentions,
    )


def text_vision_logits(
    embeds: dict[str, torch.Tensor | None], logit_scale: torch.Tensor, logit_bias: torch.Tensor, kind: str
) -> dict[str, torch.Tensor]:
    """CLIP's `logits_per_text` and `logits_per_image` (SigLIP's, with the bias, for the sigmoid loss); none
    when no sample has text or none has vision."""
    if embeds["text"] is None or embeds["vision"] is None:
        return {}
    logits = logit_scale.exp() * (embeds["text"].float() @ embeds["vision"].float().T)
    if kind == "sigmoid":
        logits = logits + logit_bias
    return {"logits_per_text": logits, "logits_per_image": logits.T}


__all__ = ["ZidongOutput", "text_vision_logits", "tower_model_output"]
