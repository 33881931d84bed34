"""`zidong pretrain RECIPE.yaml --dry-run [--gpus N]`: sizes, FLOPs and memory of a recipe without allocating it.

The model is built on the meta device (shapes only, no storage), so a billion-parameter recipe is sized in
seconds on a laptop. FLOPs per sample use the usual 6 x parameters x tokens rule for each tower's non-embedding
parameters over its tokens at the recipe's caps (text: `data.max_text_tokens`; vision: patches + 1; speech: 50
steps per second of `data.max_speech_seconds`), plus the fusion encoder over all of them; attention's
quadratic term is left out. Memory per GPU is the model state under mixed precision (bf16 weights and gradients,
fp32 master weights and two Adam moments: 2 + 2 + 12 bytes per parameter) split as each ZeRO stage splits it;
activations come on top and depend on batch size and activation checkpointing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from zidong.models.zidong.configuration_zidong import MODALITIES, ZidongConfig
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.train.recipe import PretrainRecipe

SPEECH_STEPS_PER_SECOND = 50  # 10 ms filterbank frames stacked in pairs
BYTES_PER_PARAMETER = {"weights": 2, "gradients": 2, "optimizer": 12}


def dry_run_report(recipe: PretrainRecipe, gpus: int) -> str:
    """The dry-run table for `recipe` on `gpus` GPUs."""
    config, vocabulary_note = _config(recipe)
    with torch.device("meta"):
        model = ZidongModel(config)
    towers = model.towers()
    sizes = {m: _count(towers[m]) for m in MODALITIES}
    sizes["fusion"] = _count(model.fusion)
    total = _count(model)
    sizes["heads and projections"] = total - sum(sizes.values())
    tokens = _tokens_per_sample(recipe, config)
    flops = sum(6 * (sizes[m] - _embedding_count(towers[m])) * tokens[m] for m in MODALITIES)
    flops += 6 * sizes["fusion"] * (sum(tokens.values()) + 1)
    lines = [f"model: preset {recipe.model.preset}, {vocabulary_note}", "", f"{'parameters':<24}{'count':>16}"]
    lines += [f"{name:<24}{count:>16,}" for name, count in sizes.items()]
    lines += [f"{'total':<24}{total:>16,}  ({total / 1e9:.2f} B)", ""]
    lines.append("tokens per sample at the caps: " + ", ".join(f"{m} {n}" for m, n in tokens.items()))
    lines.append(f"training FLOPs per sample: {flops:.3e} (6 x parameters x tokens, attention excluded)")
    lines += ["", f"model state per GPU on {gpus} GPU(s), bf16 + fp32 Adam (activations not included):"]
    for stage in range(4):
        lines.append(f"  ZeRO-{stage}: {_state_bytes(total, gpus, stage) / 2**30:8.2f} GiB")
    return "\n".join(lines)


def _config(recipe: PretrainRecipe) -> tuple[ZidongConfig, str]:
    overrides: dict = {}
    note = "text vocabulary of the preset"
    tokenizer_folder = recipe.model.tokenizer
    if tokenizer_folder and (Path(tokenizer_folder) / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        overrides["text"] = {"vocab_size": len(tokenizer)}
        note = f"{len(tokenizer)}-token vocabulary from {tokenizer_folder}"
    for modality in MODALITIES:
        folder = getattr(recipe.model, modality).pretrained
        if folder:
            overrides[f"{modality}_config"] = AutoConfig.from_pretrained(folder).to_dict()
            overrides.pop(modality, None)
    return ZidongConfig.from_preset(recipe.model.preset, **overrides), note


def _tokens_per_sample(recipe: PretrainRecipe, config: ZidongConfig) -> dict[str, int]:
    vision = config.vision_config
    patches = (getattr(vision, "image_size", 224) // getattr(vision, "patch_size", 16)) ** 2 + 1
    return {
        "text": recipe.data.max_text_tokens,
        "vision": patches,
        "speech": int(SPEECH_STEPS_PER_SECOND * recipe.data.max_speech_seconds),
    }


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _embedding_count(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Embedding))


def _state_bytes(parameters: int, gpus: int, stage: int) -> float:
    weights, gradients, optimizer = (BYTES_PER_PARAMETER[k] * parameters for k in ("weights", "gradients", "optimizer"))
    if stage >= 1:
        optimizer /= gpus
    if stage >= 2:
        gradients /= gpus
    if stage >= 3:
        weights /= gpus
    return weights + gradients + optimizer
