"""How `ZidongModel.forward` and `ZidongForClassification.forward` read their arguments: the inputs grouped by
modality and checked against the presence masks, the text mask under either of its names, and the output switches
they pass to a tower.

Imports only torch and numpy so exported folders load with `trust_remote_code=True`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .configuration_zidong import MODALITIES


def modality_inputs(input_ids, text_attention_mask, pixel_values, input_values, speech_attention_mask) -> dict:
    """The forward's arguments grouped as modality -> (values, attention mask or None)."""
    return {
        "text": (input_ids, text_attention_mask),
        "vision": (pixel_values, None),
        "speech": (input_values, speech_attention_mask),
    }


def given_switches(switches: dict[str, bool | None]) -> dict[str, bool]:
    """The towers' output switches that were set (a tower is called exactly as before when none is)."""
    unknown = set(switches) - {"output_hidden_states", "output_attentions"}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {name: value for name, value in switches.items() if value is not None}


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


def features_arguments(
    modality: str, attention_mask: torch.Tensor | None, rest: dict
) -> tuple[torch.Tensor | None, dict[str, bool | None]]:
    """(padding mask, output switches) of a `get_*_features` call that may pass a whole `ZidongProcessor` batch,
    as tools written for CLIP and CLAP do (`model.get_text_features(**processor(text=texts))`): the batch's
    `{modality}_attention_mask` stands for `attention_mask`, its presence flags are accepted and unused (the
    features are those of the rows given), text's `token_type_ids` as in `forward`. What remains must be output
    switches (checked by the tower call)."""
    switches = {name: value for name, value in rest.items() if name not in {f"{m}_present" for m in MODALITIES}}
    own_mask = switches.pop(f"{modality}_attention_mask", None)
    if modality == "text":
        return text_mask_argument(own_mask, attention_mask, switches.pop("token_type_ids", None)), switches
    if own_mask is not None and attention_mask is not None:
        raise TypeError(
            f"give the {modality} padding mask once: attention_mask and {modality}_attention_mask are the same input"
        )
    return (own_mask if own_mask is not None else attention_mask), switches


@dataclass
class Presence:
    """Which of a batch's B samples have each modality, on the device and on the host.

    Decisions that depend on what a batch holds (does a tower run, which rows does a loss read) are taken from the
    host copy, and rows are picked with index tensors built there: reading a mask on an accelerator, or indexing
    with a boolean mask (whose result size depends on its values), would make the host wait for the device. The
    trainer hands the collated masks over still on the host; masks given on an accelerator are read back once.
    """

    masks: dict[str, torch.Tensor]  # (B,) bool on the model's device
    host: dict[str, np.ndarray]  # (B,) bool
    rows: dict[str, torch.Tensor]  # (count,) long on the model's device: the indices of the present rows

    @classmethod
    def from_host(cls, host: Mapping[str, np.ndarray | torch.Tensor], device: torch.device | str = "cpu") -> Presence:
        """From (B,) bool masks on the host (arrays or CPU tensors)."""
        arrays = {m: np.asarray(mask, dtype=bool) for m, mask in host.items()}
        return cls(
            masks={m: torch.from_numpy(a).to(device, non_blocking=True) for m, a in arrays.items()},
            host=arrays,
            rows={m: torch.from_numpy(np.flatnonzero(a)).to(device, non_blocking=True) for m, a in arrays.items()},
        )

    def __getitem__(self, modality: str) -> torch.Tensor:
        return self.masks[modality]

    def has(self, modality: str) -> bool:
        """Does any sample of this batch have `modality`?"""
        return bool(self.host[modality].any())


def batch_presence(inputs: dict, given: dict, device: torch.device) -> Presence:
    """Per-modality presence, checked against the number of rows each modality was given."""
    counts = {m: 0 if inputs[m][0] is None else inputs[m][0].shape[0] for m in MODALITIES}
    sizes = {given[m].shape[0] if given[m] is not None else counts[m] for m in MODALITIES}
    sizes -= {0} if len(sizes) > 1 else set()
    if len(sizes) > 1:
        raise ValueError("inputs of different batch sizes need text_present / vision_present / speech_present masks")
    batch = sizes.pop()
    host = {}
    for modality in MODALITIES:
        mask = given[modality]
        if mask is None:
            host[modality] = np.full(batch, counts[modality] > 0)
        elif isinstance(mask, np.ndarray):  # as the trainer passes them
            host[modality] = mask.astype(bool)
        else:  # `.numpy()` refuses an accelerator tensor, so only a mask given there is copied back
            host[modality] = (mask if mask.device.type == "cpu" else mask.cpu()).numpy().astype(bool)
        if int(host[modality].sum()) != counts[modality]:
            raise ValueError(
                f"{modality}_present marks {int(host[modality].sum())} samples but {counts[modality]} {modality} "
                "inputs were given"
            )
    return Presence.from_host(host, device)


__all__ = [
    "Presence",
    "batch_presence",
    "given_switches",
    "modality_inputs",
    "text_mask_argument",
]
