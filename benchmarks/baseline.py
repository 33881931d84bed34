"""The naive baseline zidong is measured against: what a lab would assemble from stock parts.

- `NaiveTriModal`: the same three towers as a `ZidongModel` (same configs, so the same parameters), built with
  `AutoModel.from_config(..., attn_implementation="eager")`, mean-pooled text and speech, CLS-pooled vision,
  linear projections, and the CLIP loss for every pair, written the usual way: gather every rank's embeddings
  with gradient and score the whole global batch against itself on every rank (`naive_contrastive_loss`).
- `NaivePipeline`: zidong's decoding and tokenising, but each utterance's filterbank is computed in the loader
  with `torchaudio.compliance.kaldi.fbank`, normalised and stacked to 20 ms steps, then padded into
  `input_features` (the speech tower then takes features, not waveforms). The stream runs with `bucket_pool=0`:
  batches of consecutive samples, no length bucketing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchaudio.compliance.kaldi import fbank
from transformers import AutoModel

from zidong.data.transforms import DecodedSample, SamplePipeline
from zidong.models.zidong.configuration_zidong import MODALITIES, ZidongConfig
from zidong.models.zidong.feature_extraction_zidong import normalize_and_stack
from zidong.models.zidong.towers_zidong import masked_mean
from zidong.train.collectives import distributed_world_size


def naive_contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch, computed whole on every rank (global x global logits)."""
    if distributed_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        a, b = torch.cat(all_gather(a)), torch.cat(all_gather(b))
    logits = logit_scale.exp() * a @ b.T
    targets = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class NaiveTriModal(nn.Module):
    """Stock towers with eager attention, projections and the naive pairwise contrastive loss."""

    def __init__(self, config: ZidongConfig):
        super().__init__()
        self.config = config
        self.towers = nn.ModuleDict(
            {m: AutoModel.from_config(getattr(config, f"{m}_config"), attn_implementation="eager") for m in MODALITIES}
        )
        self.projections = nn.ModuleDict(
            {
                m: nn.Linear(getattr(config, f"{m}_config").hidden_size, config.projection_dim, bias=False)
                for m in MODALITIES
            }
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))

    def embed(self, modality: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if modality == "text":
            mask = batch["text_attention_mask"]
            states = self.towers["text"](input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
            pooled = masked_mean(states, mask.bool())
        elif modality == "vision":
            pooled = self.towers["vision"](pixel_values=batch["pixel_values"]).last_hidden_state[:, 0]
        else:
            mask = batch["speech_attention_mask"]
            states = self.towers["speech"](input_features=batch["input_features"], attention_mask=mask)
            pooled = masked_mean(states.last_hidden_state, mask.bool())
        return F.normalize(self.projections[modality](pooled), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean of the pair losses over the pairs this batch has (every sample of the demo has 2+)."""
        embeds = {}
        for modality in MODALITIES:
            present = batch[f"{modality}_present"]
            if present.any():
                rows = self.embed(modality, batch)
                embeds[modality] = rows.new_zeros(len(present), rows.shape[1]).index_put((present,), rows)
        losses = []
        for first, second in itertools.combinations(MODALITIES, 2):
            if first in embeds and second in embeds:
                both = batch[f"{first}_present"] & batch[f"{second}_present"]
                if both.any():
                    losses.append(naive_contrastive_loss(embeds[first][both], embeds[second][both], self.logit_scale))
        return torch.stack(losses).mean()


@dataclass(frozen=True)
class NaivePipeline(SamplePipeline):
    """zidong's pipeline with the speech front end moved into the loader: one `kaldi.fbank` per utterance
    (`num_mel_bins` and `frame_stack`: the model config's `num_mel_bins` and `speech_frame_stack`)."""

    # no defaults: they must be the model's (a fixed frame count once fed a 4-frame model 2 frames a step)
    num_mel_bins: int = field(kw_only=True)
    frame_stack: int = field(kw_only=True)

    def collate(self, samples: list[DecodedSample]) -> dict[str, Any]:
        batch = super().collate(samples)
        if "input_values" not in batch:
            return batch
        waveforms, sample_mask = batch.pop("input_values"), batch.pop("speech_attention_mask")
        steps = []
        for waveform, length in zip(waveforms, sample_mask.sum(dim=1).tolist(), strict=True):
            features = fbank(waveform[None, :length] * 32768.0, num_mel_bins=self.num_mel_bins)
            frame_mask = torch.ones(1, len(features), dtype=torch.bool)
            steps.append(normalize_and_stack(features[None], frame_mask, self.frame_stack)[0][0])
        lengths = torch.tensor([len(step) for step in steps])
        batch["input_features"] = nn.utils.rnn.pad_sequence(steps, batch_first=True)
        batch["speech_attention_mask"] = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
        return batch


__all__ = ["NaivePipeline", "NaiveTriModal", "naive_contrastive_loss"]
