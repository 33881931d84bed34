"""FSDP2 and compilation for the trainer: the one module that knows how a zidong model is split into blocks, sharded
(`parallel.strategy=fsdp|hsdp`) and compiled (`train.compile`).

zidong applies PyTorch's `fully_shard` itself instead of driving Accelerate's FSDP plugin, for three reasons
measured with accelerate 1.16 and torch 2.11 (docs/architecture.md): Accelerate sets up FSDP only on accelerator
devices (on CPU it prepares DDP and says nothing), its transformer-based wrap shards embeddings that a model's
`_no_split_modules` lists twice and fails, and its plugin has no hybrid (HSDP) mesh. `fully_shard` itself runs the
same on a CPU mesh over gloo as on GPUs over NCCL, so the tests train this exact code.

The shard units are every transformer layer of each tower and of the fusion encoder (in transformers 5 every
such layer subclasses `GradientCheckpointingLayer`), then the root: what is left (embeddings, the audio front
end, pooling, projections, heads, `logit_scale`) is gathered once per forward. The model learns nothing of this;
`prepare_for_launcher` (zidong/train/distributed.py) makes every process call the same modules.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers.modeling_layers import GradientCheckpointingLayer

from zidong.errors import UserError
from zidong.train.recipe import ParallelSection, PretrainRecipe

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def check_parallel(recipe: PretrainRecipe, world_size: int, deepspeed: bool) -> None:
    """Refuse a `parallel` section that cannot run as written under this launch, before any work: DeepSpeed
    chosen by the launcher together with another strategy, an HSDP shard size that does not divide the processes,
    FSDP asked of Accelerate's launcher config, bf16 layers without bf16 autocast."""
    settings = recipe.parallel
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise UserError(
            "the launcher asks Accelerate for FSDP (an Accelerate config with `distributed_type: FSDP`, or "
            "ACCELERATE_USE_FSDP=true): zidong shards with FSDP2 itself, on CPU and GPUs alike. Launch without it "
            "(torchrun, or `accelerate launch` with no FSDP config) and set parallel.strategy=fsdp in the recipe "
            "(parallel.strategy=hsdp across nodes)"
        )
    if deepspeed and settings.strategy != "auto":
        raise UserError(
            f"parallel.strategy={settings.strategy}, but the launcher's Accelerate config chose DeepSpeed: the two "
            "disagree. Keep the DeepSpeed config and set parallel.strategy=auto, or launch with torchrun and keep "
            f"parallel.strategy={settings.strategy}"
        )
    if settings.strategy == "hsdp":
        shard_size = shard_group_size(settings, world_size)
        if world_size % shard_size:
            raise UserError(
                f"parallel.shard_size={shard_size}: HSDP needs the {world_size} processes in whole groups of "
                f"{shard_size}; use a shard size that divides {world_size} (the processes per node, usually)"
            )
    if settings.sharded and settings.param_dtype == "bf16" and recipe.train.mixed_precision != "bf16":
        raise UserError(
            "parallel.param_dtype=bf16 computes the sharded layers in bf16, but train.mixed_precision="
            f"{recipe.train.mixed_precision}: the float32 parts of the model would meet bf16 activations. Set "
            "train.mixed_precision=bf16 too, or parallel.param_dtype=float32"
        )


def shard_group_size(settings: ParallelSection, world_size: int) -> int:
    """Processes per shard group: all of them under `fsdp`; under `hsdp` `parallel.shard_size`, by default the
    processes of one node (LOCAL_WORLD_SIZE, which torchrun sets)."""
    if settings.strategy != "hsdp":
        return world_size
    return settings.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def ensure_process_group(device: torch.device) -> None:
    """A process group of one when a single process runs FSDP (a mesh of 1: the same code path, and checkpoints
    that a later launch on more processes reshards)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def device_mesh(settings: ParallelSection, device: torch.device) -> DeviceMesh:
    """The mesh FSDP2 shards over: 1-D (`shard`) for fsdp, 2-D (`replicate`, `shard`) for hsdp."""
    world_size = dist.get_world_size()
    shard_size = shard_group_size(settings, world_size)
    if settings.strategy == "hsdp":
        return init_device_mesh(
            device.type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
        )
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The transformer layers, outermost first found, in module order: each becomes an FSDP unit of its own."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, GradientCheckpointingLayer):
                units.append(child)
            else:
                visit(child)

    visit(model)
    return units


def apply_fsdp(model: nn.Module, settings: ParallelSection, mesh: DeviceMesh) -> list[nn.Module]:
    """`fully_shard` every transformer layer, then the root (in place: parameter names, and so checkpoints and
    exports, are unchanged; parameters become DTensors sharded on dim 0). Returns the layer units.

    The layers gather and compute in `param_dtype`; the root keeps float32 parameters (the audio front end,
    projections and logits stay float32, as without sharding), autocast casting its matmuls under bf16."""
    reduce_dtype = DTYPES[settings.reduce_dtype]
    layers = MixedPrecisionPolicy(param_dtype=DTYPES[settings.param_dtype], reduce_dtype=reduce_dtype)
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, mp_policy=layers)
    fully_shard(model, mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
                mp_policy=MixedPrecisionPolicy(reduce_dtype=reduce_dtype))  # fmt: skip
    return units


def describe(settings: ParallelSection, mesh: DeviceMesh, units: list[nn.Module]) -> str:
    """The start-up log's account of the sharding in use."""
    shape = " x ".join(f"{name} {size}" for name, size in zip(mesh.mesh_dim_names, mesh.shape, strict=True))
    kinds = sorted({type(unit).__name__ for unit in units})
    return (
        f"FSDP2 ({settings.strategy}) on a {mesh.device_type} mesh of {shape}: {len(units)} layer units "
        f"({', '.join(kinds)}) + the root; reshard_after_forward={settings.reshard_after_forward}, layers gathered "
        f"and computed in {settings.param_dtype}, gradients reduced in {settings.reduce_dtype}"
    )


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch: an FSDP2 model reduce-scatters its gradients only when `sync` (the last
    micro-batch of an optimizer step); elsewhere it keeps them unreduced. A no-op for any other model (DDP's
    `no_sync` is Accelerate's `accumulate`)."""
    if not isinstance(model, FSDPModule) or sync:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# Layer classes left eager when compiling on a device type, with the reason (measured with torch 2.11): inductor's
# CPU backward of the Wav2Vec2-BERT layer's attention fails a stride assertion under dynamic shapes ("expected size
# 19==19, stride 3968==16128": the CPU flash-attention kernel's fake implementation gives other strides).
EAGER_LAYERS = {
    "cpu": {
        "Wav2Vec2BertEncoderLayer": "torch 2.11's CPU inductor fails its attention backward under dynamic shapes",
    },
}


def compile_layers(model: nn.Module, device: torch.device) -> tuple[list[nn.Module], dict[str, str]]:
    """`torch.compile` every transformer layer (the shard units) on its own, as torchtitan compiles blocks, with
    dynamic shapes from the start (rows and lengths change every batch). Returns the compiled layers and the layer
    classes left eager on this device with the reason (EAGER_LAYERS).

    Each layer class compiles its own `forward`, under transformers' checkpointing wrapper: that wrapper is one
    function shared by every layer class, and compiling it would put all classes in one cache and exhaust
    dynamo's recompile limit within steps. Activation checkpointing still applies around the compiled forward,
    and FSDP2's hooks stay outside it."""
    eager = EAGER_LAYERS.get(device.type, {})
    compiled: dict[type, Callable] = {}
    layers = [layer for layer in shard_units(model) if type(layer).__name__ not in eager]
    for layer in layers:
        kind = type(layer)
        if kind not in compiled:
            compiled[kind] = torch.compile(getattr(kind.forward, "__wrapped__", kind.forward), dynamic=True)
        layer.forward = functools.partial(_checkpointed, layer, compiled[kind])
    skipped = {type(layer).__name__ for layer in shard_units(model)} & set(eager)
    return layers, {name: eager[name] for name in sorted(skipped)}


def _checkpointed(layer: nn.Module, forward: Callable, *args, **kwargs):
    """A compiled layer's forward, recomputed in backward when activation checkpointing is on (what transformers'
    wrapper does for the eager forward)."""
    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(functools.partial(forward, layer, **kwargs), *args)
    return forward(layer, *args, **kwargs)
