"""FSDP2 and compilation for the trainer: the one module that knows how a zidong model is split into blocks, sharded
(`parallel.strategy=fsdp|hsdp`, whose `Strategy` in zidong/train/strategies.py calls it) and compiled
(`train.compile`).

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
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers.modeling_layers import GradientCheckpointingLayer

from zidong.train.recipe import ParallelSection

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def ensure_process_group(device: torch.device) -> None:
    """A process group of one when a single process runs FSDP (a mesh of 1: the same code path, and checkpoints
    that a later launch on more processes reshards)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def device_mesh(device: torch.device, shape: dict[str, int]) -> DeviceMesh:
    """The mesh FSDP2 shards over, its dimensions named and sized by `shape` (outermost first): (`shard`) for
    fsdp, (`replicate`, `shard`) for hsdp (zidong/train/strategies.py)."""
    return init_device_mesh(device.type, tuple(shape.values()), mesh_dim_names=tuple(shape))


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
