"""The fusion encoder of `ZidongModel` and the heads that read it.

The fusion encoder sees one sequence per sample: a CLS token, then the token states of each modality the sample
has (text, vision, speech), each projected to the fusion width and tagged with a modality-type embedding. A
modality the sample lacks takes no place in attention (its key positions are masked), so a sample's fused states
do not depend on its neighbours or on padding. Pre-LayerNorm transformer layers; attention runs through
`torch.nn.functional.scaled_dot_product_attention`; every layer supports activation checkpointing.

Imports only torch and transformers so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .arguments_zidong import Presence
from .configuration_zidong import MODALITIES, ZidongConfig
from .towers_zidong import TowerOutput, scatter_rows


@dataclass
class FusedStreams:
    states: torch.Tensor  # (batch, 1 + tokens of every stream, fusion_hidden_size); position 0 is CLS
    mask: torch.Tensor  # (batch, same) bool, True where a real token of a present modality sits
    spans: dict[str, tuple[int, int]]  # modality -> [start, end) of its tokens in the sequence

    def modality(self, name: str) -> torch.Tensor:
        start, end = self.spans[name]
        return self.states[:, start:end]


class ZidongFusionAttention(nn.Module):
    def __init__(self, config: ZidongConfig):
        super().__init__()
        self.num_heads = config.fusion_num_heads
        self.dropout = config.fusion_dropout
        self.qkv = nn.Linear(config.fusion_hidden_size, 3 * config.fusion_hidden_size)
        self.output = nn.Linear(config.fusion_hidden_size, config.fusion_hidden_size)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        query, key, value = (
            self.qkv(hidden).view(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=key_mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.output(attended.transpose(1, 2).reshape(batch, length, width))


class ZidongFusionLayer(GradientCheckpointingLayer):
    def __init__(self, config: ZidongConfig):
        super().__init__()
        width = config.fusion_hidden_size
        self.attention_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attention = ZidongFusionAttention(config)
        self.mlp_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.fusion_intermediate_size),
            nn.GELU(),
            nn.Linear(config.fusion_intermediate_size, width),
        )
        self.dropout = nn.Dropout(config.fusion_dropout)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.dropout(self.attention(self.attention_norm(hidden), key_mask))
        return hidden + self.dropout(self.mlp(self.mlp_norm(hidden)))


class ZidongFusionEncoder(nn.Module):
    def __init__(self, config: ZidongConfig, tower_widths: dict[str, int]):
        super().__init__()
        width = config.fusion_hidden_size
        self.input_projections = nn.ModuleDict({m: nn.Linear(tower_widths[m], width) for m in MODALITIES})
        self.modality_embeddings = nn.Embedding(len(MODALITIES), width)
        self.cls_token = nn.Parameter(torch.zeros(width))
        self.layers = nn.ModuleList(ZidongFusionLayer(config) for _ in range(config.fusion_num_layers))
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def embed(self, modality: str, token_states: torch.Tensor) -> torch.Tensor:
        """Tower states (n, tokens, tower width) -> fusion inputs (n, tokens, fusion width) with the type tag."""
        # through the module call, not `.weight[...]`: ZeRO-3 gathers a module's parameters when it is called
        index = torch.tensor(MODALITIES.index(modality), device=token_states.device)
        return self.input_projections[modality](token_states) + self.modality_embeddings(index)

    def stream(self, modality: str, tower_output: TowerOutput, presence: Presence) -> tuple[torch.Tensor, torch.Tensor]:
        """A tower's states, embedded, over the whole batch (absent rows fully masked): one entry of `forward`'s
        `streams`."""
        states = self.embed(modality, tower_output.token_states)
        present, index = presence[modality], presence.rows[modality]
        return scatter_rows(states, present, index), scatter_rows(tower_output.attention_mask, present, index)

    def forward(self, streams: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> FusedStreams:
        """`streams` maps a modality to (embedded states (batch, tokens, width), mask (batch, tokens) bool) with
        all-False mask rows for samples that lack it; modalities no sample has are simply left out."""
        first = next(iter(streams.values()))[0]
        batch = first.shape[0]
        cls = self.cls_token.to(first.dtype).expand(batch, 1, -1)
        pieces, masks, spans, position = [cls], [first.new_ones(batch, 1, dtype=torch.bool)], {}, 1
        for modality in MODALITIES:
            if modality in streams:
                states, mask = streams[modality]
                pieces.append(states)
                masks.append(mask)
                spans[modality] = (position, position + states.shape[1])
                position += states.shape[1]
        hidden, key_mask = torch.cat(pieces, dim=1), torch.cat(masks, dim=1)
        for layer in self.layers:
            hidden = layer(hidden, key_mask)
        return FusedStreams(self.norm(hidden), key_mask, spans)


class ZidongPredictionHead(nn.Module):
    """Dense -> GELU -> LayerNorm -> linear to `out_features` (the BERT masked-LM head shape)."""

    def __init__(self, config: ZidongConfig, out_features: int):
        super().__init__()
        width = config.fusion_hidden_size
        self.transform = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=config.layer_norm_eps)
        )
        self.decoder = nn.Linear(width, out_features)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(states))

    @torch.no_grad()
    def resize_output(self, size: int, mean_resizing: bool = True) -> None:
        """A decoder of `size` outputs (a resized vocabulary): the kept rows unchanged, new rows at the mean of the
        old ones (`mean_resizing`) or at zero."""
        old = self.decoder
        if old.out_features == size:
            return
        new = nn.Linear(old.in_features, size, device=old.weight.device, dtype=old.weight.dtype)
        kept = min(size, old.out_features)
        new.weight.zero_()
        new.bias.zero_()
        if mean_resizing and size > kept:
            new.weight[kept:] = old.weight.mean(dim=0)
            new.bias[kept:] = old.bias.mean()
        new.weight[:kept] = old.weight[:kept]
        new.bias[:kept] = old.bias[:kept]
        self.decoder = new


__all__ = ["FusedStreams", "ZidongFusionEncoder", "ZidongFusionLayer", "ZidongPredictionHead"]
