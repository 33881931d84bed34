"""`zidong pretrain RECIPE.yaml --dry-run [--gpus N]`: sizes, FLOPs and memory of a recipe without allocating it.

The model is built on the meta device (shapes only, no storage), so a billion-parameter recipe is sized in
seconds on a laptop. FLOPs per sample are the trainer's MFU rule (`StepFlops`, zidong/train/flops.py) for one
triplet at the recipe's caps (text: `data.max_text_tokens`; vision: patches + 1, or a convolutional tower's
forward FLOPs as tokens; speech: 50 steps per second of
`data.max_speech_seconds`) with the recipe's objective weights (their warm-up done) and frozen towers. Memory per GPU is the model state under mixed precision (bf16 weights and gradients,
fp32 master weights and two Adam moments: 2 + 2 + 12 bytes per parameter) split as each ZeRO stage splits it.
FSDP2 and HSDP keep float32 parameters, gradients and both Adam moments (16 bytes per parameter) sharded over the
shard group, and hold gathered at once the root's parameters (float32) and two transformer layers (the one running
and the one prefetched; all of them between forward and backward with `parallel.reshard_after_forward=false`) in
`parallel.param_dtype`. Activations come on top and depend on batch size and activation checkpointing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from zidong.models.zidong.configuration_zidong import MODALITIES, ZidongConfig
from zidong.models.zidong.modeling_zidong import OBJECTIVES, ZidongModel
from zidong.models.zidong.towers_zidong import is_convolutional
from zidong.train.builders import model_config
from zidong.train.flops import StepFlops
from zidong.train.optim import freeze_for_good, freeze_heads, idle_heads, objective_weights
from zidong.train.parallelize import shard_units
from zidong.train.planner import GPU_KINDS, Workload, plan_lines
from zidong.train.recipe import PretrainRecipe

BYTES_PER_PARAMETER = {"weights": 2, "gradients": 2, "optimizer": 12}
FSDP_SHARDED_BYTES = 16  # float32 parameter, gradient and two Adam moments, all sharded
PARAM_BYTES = {"float32": 4, "bf16": 2}
GPUS_PER_NODE = 8  # HSDP's shard group when the recipe gives no parallel.shard_size


def dry_run_report(
    recipe: PretrainRecipe, gpus: int, gpu_kind: str = "h100", mfu: float = 0.35, samples: float | None = None
) -> str:
    """The dry-run table for `recipe` on `gpus` GPUs, with the cluster plan (zidong/train/planner.py) for that many
    GPUs of `gpu_kind` at `mfu`, and the days `samples` take (default: the recipe's steps x global batch)."""
    config, vocabulary_note = _config(recipe)
    with torch.device("meta"):
        model = ZidongModel(config)
    freeze_for_good(model, recipe)
    freeze_heads(model, idle_heads(recipe, OBJECTIVES))  # as the run will: the heads of objectives that are off
    towers = model.towers()
    sizes = {m: _count(towers[m]) for m in MODALITIES}
    sizes["fusion"] = _count(model.fusion)
    total = _count(model)
    sizes["heads and projections"] = total - sum(sizes.values())
    step_flops = StepFlops(model)
    vision = config.vision_config
    size = getattr(vision, "image_size", 224)
    tokens = step_flops.tokens_at_caps(
        recipe.data.max_text_tokens,
        (size, size) if isinstance(size, int) else tuple(size),
        recipe.data.max_speech_seconds,
        config.sampling_rate,
    )
    flops = step_flops.of_tokens(tokens, objective_weights(recipe, recipe.train.max_steps, OBJECTIVES))
    lines = [f"model: preset {recipe.model.preset}, {vocabulary_note}", "", f"{'parameters':<24}{'count':>16}"]
    lines += [f"{name:<24}{count:>16,}" for name, count in sizes.items()]
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    lines += [f"{'total':<24}{total:>16,}  ({total / 1e9:.2f} B)", f"{'trained':<24}{trainable:>16,}", ""]
    counts = ", ".join(f"{m} {int(n[0])}" for m, n in tokens.items())
    if is_convolutional(vision):
        counts += " (vision: a convolutional tower's forward FLOPs / (2 x parameters))"
    lines.append(f"tokens per sample at the caps: {counts}")
    lines.append(f"training FLOPs per sample: {flops:.3e} (6 x parameters x tokens, objectives included)")
    lines += ["", f"model state per GPU on {gpus} GPU(s), bf16 + fp32 Adam (activations not included):"]
    for stage in range(4):
        lines.append(f"  ZeRO-{stage}: {_state_bytes(total, gpus, stage) / 2**30:8.2f} GiB")
    lines += _fsdp_lines(recipe, model, total, gpus)
    settings = recipe.train
    work = Workload(
        parameters=total,
        trainable=trainable,
        flops_per_sample=flops,
        samples_per_gpu=settings.batch_size * settings.grad_accum,
        embedding_dim=config.projection_dim,
        modalities=len(MODALITIES),
        gather_bytes=PARAM_BYTES[recipe.parallel.param_dtype],
        reduce_bytes=PARAM_BYTES[recipe.parallel.reduce_dtype],
    )
    budget = samples or settings.max_steps * work.samples_per_gpu * gpus
    lines += ["", *plan_lines(work, GPU_KINDS[gpu_kind], gpus, mfu, budget, GPUS_PER_NODE)]
    return "\n".join(lines)


def _fsdp_lines(recipe: PretrainRecipe, model: ZidongModel, total: int, gpus: int) -> list[str]:
    """Memory per GPU under FSDP2 (one shard group of `gpus`) and HSDP (groups of `parallel.shard_size`, or of a
    node's 8 GPUs): the sharded state, and what is gathered at once (module docstring)."""
    settings = recipe.parallel
    layers = sorted((_count(unit) for unit in shard_units(model)), reverse=True)
    root = total - sum(layers)
    held = len(layers) if not settings.reshard_after_forward else min(2, len(layers))
    gathered = root * 4 + sum(layers[:held]) * PARAM_BYTES[settings.param_dtype]
    shard_size = min(settings.shard_size or GPUS_PER_NODE, gpus)
    lines = [f"  FSDP2 and HSDP (float32 state, layers gathered in {settings.param_dtype}; {len(layers)} layer units):"]
    for name, group in (("FSDP2", gpus), (f"HSDP {gpus // shard_size} x {shard_size}", shard_size)):
        sharded = total * FSDP_SHARDED_BYTES / group
        lines.append(
            f"  {name + ':':<14}{(sharded + gathered) / 2**30:8.2f} GiB  ({sharded / 2**30:.2f} sharded state + "
            f"{gathered / 2**30:.2f} gathered: the root and {held} layer(s))"
        )
    return lines


def _config(recipe: PretrainRecipe) -> tuple[ZidongConfig, str]:
    """The trainer's model config (`model_config`), with the recipe's tokenizer when it exists already."""
    tokenizer_folder = recipe.model.tokenizer
    if tokenizer_folder and (Path(tokenizer_folder) / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        return model_config(recipe, tokenizer), f"{len(tokenizer)}-token vocabulary from {tokenizer_folder}"
    return model_config(recipe), "text vocabulary of the preset"


def _count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _state_bytes(parameters: int, gpus: int, stage: int) -> float:
    weights, gradients, optimizer = (BYTES_PER_PARAMETER[k] * parameters for k in ("weights", "gradients", "optimizer"))
    if stage >= 1:
        optimizer /= gpus
    if stage >= 2:
        gradients /= gpus
    if stage >= 3:
        weights /= gpus
    return weights + gradients + optimizer
