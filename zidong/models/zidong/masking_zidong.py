"""The `masked_text` / `masked_vision` / `masked_speech` objectives, in one extra pass of the towers.

Each masked modality's tower runs again on a masked copy of its input (BERT-style token masking, blanked image
patches, blanked 20 ms speech spans); the fusion encoder, seeing the other modalities unmasked, predicts the
masked tokens, the pixels (per-patch normalised) and the filterbank steps. With `modality_mask_probability` a
whole modality of a multi-modal sample is masked (modality-level masking).

Imports only torch so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .configuration_zidong import MODALITIES, ZidongConfig
from .lockstep_zidong import Lockstep
from .towers_zidong import Encoded, TowerOutput

if TYPE_CHECKING:
    from .modeling_zidong import ZidongModel


@dataclass
class MaskedInput:
    """A tower's pass over a masked input, and what the fusion encoder must predict where it was masked."""

    tower_output: TowerOutput  # the tower's states on the masked input
    chosen: torch.Tensor  # (n, tokens) bool: the token positions that are scored
    target: torch.Tensor  # (n, tokens) ids or (n, tokens, features) values to predict there
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (predicted, expected) -> (n, tokens) losses


def masked_modelling_objective(
    model: ZidongModel, encoded: Encoded, weights: dict[str, float], lockstep: Lockstep
) -> dict[str, torch.Tensor]:
    """`masked_<modality>` for every weighted modality some sample of this batch has (0 when none of its tokens
    was drawn)."""
    presence = encoded.presence
    targets = [m for m in encoded.outputs if weights.get(f"masked_{m}")]
    whole = modality_level_mask(targets, presence, model.config.modality_mask_probability)
    streams, masked = {}, {}
    for modality, tower_output in encoded.outputs.items():
        if modality in targets:
            real = presence.has(modality)
            if real:
                rows = whole[modality].index_select(0, presence.rows[modality])
            else:  # a lockstep placeholder row
                rows = torch.zeros(tower_output.pooled.shape[0], dtype=torch.bool, device=model.device)
            with lockstep.idle_work(not real):
                masked[modality] = MASKERS[modality](model, *encoded.inputs[modality], rows)
            tower_output = masked[modality].tower_output
        streams[modality] = model.fusion.stream(modality, tower_output, presence)
    fused = model.fusion(streams)
    heads = model.prediction_heads()
    losses = {}
    for modality, item in masked.items():
        if not presence.has(modality):  # a lockstep placeholder: nothing to score
            lockstep.idle(functools.partial(heads[modality], fused.modality(modality)[:1, :1]))
            continue
        states = fused.modality(modality).index_select(0, presence.rows[modality])
        states = states[:, states.shape[1] - item.chosen.shape[1] :]  # vision: skip CLS/prefix tokens
        # Every token is predicted and the loss averages over the chosen ones: selecting them instead would size
        # a tensor by how many were drawn, which the host must read from the device. The extra head work is
        # small (for the text head of `base`, under 1 % of a step).
        per_token = item.score(heads[modality](states).float(), item.target)
        weights = item.chosen.to(per_token.dtype)
        losses[f"masked_{modality}"] = (per_token * weights).sum() / weights.sum().clamp(min=1.0)
    return losses


def modality_level_mask(
    targets: list[str], presence: Mapping[str, torch.Tensor], probability: float
) -> dict[str, torch.Tensor]:
    """Per modality, which samples have it masked entirely: at most one modality per multi-modal sample."""
    batch, device = presence["text"].shape[0], presence["text"].device
    whole = {m: torch.zeros(batch, dtype=torch.bool, device=device) for m in MODALITIES}
    if not targets or not probability:
        return whole
    present = torch.stack([presence[m] for m in MODALITIES], dim=1)
    candidates = present & torch.tensor([m in targets for m in MODALITIES], device=device)
    drawn = (torch.rand(batch, device=device) < probability) & (present.sum(dim=1) >= 2)
    choice = torch.rand(candidates.shape, device=device).masked_fill(~candidates, -1.0).argmax(dim=1)
    drawn &= candidates.any(dim=1)
    for index, modality in enumerate(MODALITIES):
        whole[modality] = drawn & (choice == index)
    return whole


def mask_text(
    model: ZidongModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, whole: torch.Tensor
) -> MaskedInput:
    """BERT-style masking (80% mask token, 10% random token, 10% kept); cross-entropy on the chosen ones."""
    config = model.config
    if config.mask_token_id is None:
        raise ValueError(
            "ZidongConfig.mask_token_id is not set; masked_text needs the tokenizer's mask token id "
            "(the trainer sets it from the tokenizer)"
        )
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    special = torch.tensor(sorted(special_token_ids(config)), dtype=input_ids.dtype, device=input_ids.device)
    candidates = mask & ~torch.isin(input_ids, special)
    draws = torch.rand(input_ids.shape, device=input_ids.device)
    chosen = candidates & ((draws < config.text_mask_probability) | whole[:, None])
    replace = torch.rand(input_ids.shape, device=input_ids.device)
    random_ids = torch.randint_like(input_ids, config.text_config.vocab_size)
    masked = torch.where(chosen & (replace < 0.8), config.mask_token_id, input_ids)
    masked = torch.where(chosen & (replace >= 0.8) & (replace < 0.9), random_ids, masked)
    return MaskedInput(model.encode_text(masked, mask), chosen, input_ids, token_cross_entropy)


def token_cross_entropy(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, tokens, vocabulary) logits and (n, tokens) ids -> (n, tokens) cross-entropy."""
    return F.cross_entropy(predicted.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)


def token_squared_error(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, tokens, features) predictions and targets -> (n, tokens) mean squared error."""
    return F.mse_loss(predicted, target, reduction="none").mean(dim=-1)


def special_token_ids(config: ZidongConfig) -> set[int]:
    names = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "mask_token_id")
    ids = {getattr(config.text_config, name, None) for name in names} | {config.mask_token_id}
    return {token for token in ids if isinstance(token, int)}


def mask_vision(model: ZidongModel, pixel_values: torch.Tensor, _: None, whole: torch.Tensor) -> MaskedInput:
    """Blank a random `vision_mask_ratio` of patches; regress their per-patch normalised pixels."""
    config = model.config
    if model.vision_head is None:
        raise ValueError(
            "masked_vision needs a vision transformer (one token per image patch); "
            f"this {config.vision_config.model_type} vision tower is convolutional; set its loss weight to 0"
        )
    size = config.vision_config.patch_size
    batch, channels, height, width = pixel_values.shape
    grid = (height // size, width // size)
    patches = (
        pixel_values[:, :, : grid[0] * size, : grid[1] * size]
        .reshape(batch, channels, grid[0], size, grid[1], size)
        .permute(0, 2, 4, 3, 5, 1)
        .reshape(batch, grid[0] * grid[1], size * size * channels)
    )
    count = round(config.vision_mask_ratio * patches.shape[1])
    ranks = torch.rand(patches.shape[:2], device=pixel_values.device).argsort(dim=1).argsort(dim=1)
    chosen = (ranks < count) | whole[:, None]
    blanked = patches.masked_fill(chosen[..., None], 0.0)
    masked = pixel_values.clone()
    masked[:, :, : grid[0] * size, : grid[1] * size] = (
        blanked.reshape(batch, grid[0], grid[1], size, size, channels)
        .permute(0, 5, 1, 3, 2, 4)
        .reshape(batch, channels, grid[0] * size, grid[1] * size)
    )
    tower_output = model.encode_vision(masked)
    if tower_output.token_states.shape[1] < patches.shape[1]:
        raise ValueError(
            f"the vision tower returns {tower_output.token_states.shape[1]} tokens for {patches.shape[1]} patches; "
            "masked_vision needs one token per patch"
        )
    mean, variance = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    target = (patches - mean) / (variance + 1e-6).sqrt()
    return MaskedInput(tower_output, chosen, target.float(), token_squared_error)


def mask_speech(
    model: ZidongModel, input_values: torch.Tensor, attention_mask: torch.Tensor | None, whole: torch.Tensor
) -> MaskedInput:
    """Blank spans of 20 ms steps (features, or the waveform samples under them); regress the filterbank."""
    config = model.config
    if attention_mask is None:
        attention_mask = torch.ones_like(input_values, dtype=torch.long)
    steps, step_mask = model.speech_steps(input_values, attention_mask)
    chosen_steps = span_mask(step_mask, config.speech_mask_ratio, config.speech_mask_span)
    chosen_steps |= whole[:, None] & step_mask
    if model.speech_takes_features:
        tower_output = model.run_speech_tower(steps.masked_fill(chosen_steps[..., None], 0.0), step_mask)
    else:
        samples_per_step = model.fbank.window_shift * config.speech_frame_stack
        blank = chosen_steps.repeat_interleave(samples_per_step, dim=1)[:, : input_values.shape[1]]
        blank = F.pad(blank, (0, input_values.shape[1] - blank.shape[1]))
        tower_output = model.run_speech_tower(input_values.masked_fill(blank, 0.0), attention_mask.bool())
    tokens = tower_output.token_states.shape[1]  # the tower may subsample: targets follow its token grid
    chosen = F.adaptive_avg_pool1d(chosen_steps[:, None].float(), tokens)[:, 0] > 0.5
    target = F.adaptive_avg_pool1d(steps.transpose(1, 2), tokens).transpose(1, 2)
    return MaskedInput(tower_output, chosen & tower_output.attention_mask, target.float(), token_squared_error)


def span_mask(valid: torch.Tensor, ratio: float, span: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask about `ratio` of the True positions of `valid` (n, length) in runs of `span` (wav2vec2-style).

    Span starts are drawn with probability ratio / span; each start masks the next `span` positions.
    """
    if ratio <= 0:
        return torch.zeros_like(valid)
    draws = torch.rand(valid.shape, device=valid.device, generator=generator)
    starts = (draws < ratio / span) & valid
    spread = F.max_pool1d(F.pad(starts[:, None].float(), (span - 1, 0)), kernel_size=span, stride=1)[:, 0]
    return spread.bool() & valid


MASKERS = {"text": mask_text, "vision": mask_vision, "speech": mask_speech}

__all__ = [
    "MASKERS",
    "MaskedInput",
    "mask_speech",
    "mask_text",
    "mask_vision",
    "masked_modelling_objective",
    "modality_level_mask",
    "span_mask",
]
