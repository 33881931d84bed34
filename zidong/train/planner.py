"""The cluster plan of `--dry-run`: bytes each GPU communicates per step under each strategy, whether that hides
under the step's compute, and the samples/s and days a sample budget takes.

The model of a step (what labs use to size runs; stated so it can be argued with):

- Compute: training FLOPs per sample (zidong/train/flops.py's rule) x samples per GPU per optimizer step, at
  `mfu` x the GPU's published dense bf16 peak.
- A collective over a group of G GPUs moves, per GPU, (G - 1) / G x S bytes for an all-gather or a
  reduce-scatter of S bytes, twice that for an all-reduce (ring algorithms), at the bandwidth of the group's
  slowest link: NVLink within one node, the network (one NIC per GPU) as soon as the group spans nodes.
- Per strategy: DDP all-reduces the float32 gradients; ZeRO-2 reduce-scatters the gradients and all-gathers the
  updated bf16 weights; ZeRO-3 and FSDP2 all-gather the weights in the forward and again in the backward and
  reduce-scatter the gradients, over all GPUs; HSDP does that within a shard group (one node) and all-reduces
  its gradient shard across the groups.
- Overlap: a gradient reduce runs under the backward pass (2/3 of the compute); FSDP2 / ZeRO-3 prefetch the
  next layer's weights under the current layer's compute (the whole step); ZeRO-2's weight all-gather follows the
  optimizer step, exposed. What does not fit its window adds to the step. The contrastive loss's embedding
  all-gather (forward, and its gradient's reduce-scatter in the backward) sits on the critical path: exposed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuKind:
    """Published peaks: dense bf16 tensor-core TFLOP/s, NVLink GB/s per GPU and direction, network GB/s per GPU."""

    name: str
    bf16_tflops: float
    nvlink_gbs: float
    network_gbs: float


# datasheet figures; network: one InfiniBand NIC per GPU (HDR 200 Gb/s with A100, NDR 400 Gb/s with H100/H200)
GPU_KINDS = {
    "a100": GpuKind("A100 SXM", 312.0, 300.0, 25.0),
    "h100": GpuKind("H100 SXM", 989.0, 450.0, 50.0),
    "h200": GpuKind("H200 SXM", 989.0, 450.0, 50.0),
}
BACKWARD_SHARE = 2 / 3  # of a step's compute: the window a gradient reduce overlaps


@dataclass(frozen=True)
class Workload:
    """One optimizer step of one GPU: what the plan needs of the model and the recipe."""

    parameters: int  # all of them (gathered by FSDP2 / ZeRO-3)
    trainable: int  # those with gradients (reduced)
    flops_per_sample: float
    samples_per_gpu: int  # per optimizer step: batch x gradient accumulation
    embedding_dim: int
    modalities: int  # embeddings gathered per sample
    gradient_bytes: int = 4  # DDP reduces the float32 gradients
    gather_bytes: int = 4  # FSDP2's parallel.param_dtype
    reduce_bytes: int = 4  # FSDP2's parallel.reduce_dtype


@dataclass(frozen=True)
class Transfer:
    what: str
    bytes_per_gpu: float
    link: str  # "nvlink" or "network"
    window: float  # share of the compute it can hide under (0: exposed)


@dataclass(frozen=True)
class StrategyPlan:
    strategy: str
    transfers: list[Transfer]
    compute_s: float
    communication_s: float
    exposed_s: float
    samples_per_s: float


def _all_gather(group: int, size: float) -> float:
    return (group - 1) / group * size


def _link(group_spans_nodes: bool) -> str:
    return "network" if group_spans_nodes else "nvlink"


def transfers(work: Workload, strategy: str, gpus: int, gpus_per_node: int, shard_size: int) -> list[Transfer]:
    """What each GPU sends per optimizer step under `strategy` (ddp, zero2, zero3, fsdp, hsdp)."""
    spans = gpus > gpus_per_node
    every = _link(spans)
    if strategy == "ddp":
        moved = [Transfer("gradient all-reduce", 2 * _all_gather(gpus, work.trainable * work.gradient_bytes), every,
                          BACKWARD_SHARE)]  # fmt: skip
    elif strategy == "zero2":
        moved = [
            Transfer("gradient reduce-scatter", _all_gather(gpus, work.trainable * work.gradient_bytes), every,
                     BACKWARD_SHARE),
            Transfer("weight all-gather after the step", _all_gather(gpus, work.trainable * 2), every, 0.0),
        ]  # fmt: skip
    elif strategy in ("zero3", "fsdp"):
        moved = [
            Transfer("weight all-gathers (forward + backward)", 2 * _all_gather(gpus, work.parameters * work.gather_bytes),
                     every, 1.0),
            Transfer("gradient reduce-scatter", _all_gather(gpus, work.trainable * work.reduce_bytes), every,
                     BACKWARD_SHARE),
        ]  # fmt: skip
    elif strategy == "hsdp":
        replicas = gpus // shard_size
        inside = _link(shard_size > gpus_per_node)
        moved = [
            Transfer("weight all-gathers in the shard group", 2 * _all_gather(shard_size, work.parameters *
                     work.gather_bytes), inside, 1.0),
            Transfer("gradient reduce-scatter in the shard group", _all_gather(shard_size, work.trainable *
                     work.reduce_bytes), inside, BACKWARD_SHARE),
            Transfer("gradient all-reduce across the groups", 2 * _all_gather(replicas, work.trainable *
                     work.reduce_bytes / shard_size), every, BACKWARD_SHARE),
        ]  # fmt: skip
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    embeddings = work.samples_per_gpu * work.embedding_dim * 4 * work.modalities  # float32, every micro-batch
    gathered = 2 * (gpus - 1) * embeddings  # forward all-gather, backward reduce-scatter
    return [*moved, Transfer("contrastive embedding all-gather", gathered, every, 0.0)]


def plan(work: Workload, kind: GpuKind, gpus: int, mfu: float, gpus_per_node: int = 8) -> list[StrategyPlan]:
    """Every strategy's step on `gpus` GPUs of `kind` at `mfu` (HSDP's shard group: one node)."""
    compute = work.flops_per_sample * work.samples_per_gpu / (kind.bf16_tflops * 1e12 * mfu)
    bandwidth = {"nvlink": kind.nvlink_gbs * 1e9, "network": kind.network_gbs * 1e9}
    strategies = ["ddp", "zero2", "zero3", "fsdp"] + (["hsdp"] if gpus > gpus_per_node else [])
    plans = []
    for strategy in strategies:
        moved = transfers(work, strategy, gpus, gpus_per_node, min(gpus_per_node, gpus))
        seconds = [transfer.bytes_per_gpu / bandwidth[transfer.link] for transfer in moved]
        hidden = [(s, transfer.window) for s, transfer in zip(seconds, moved, strict=True) if transfer.window > 0]
        window = max((share for _, share in hidden), default=0.0) * compute  # the overlapped transfers share it
        exposed = max(0.0, sum(s for s, _ in hidden) - window) + sum(
            s for s, transfer in zip(seconds, moved, strict=True) if transfer.window == 0
        )
        step = compute + exposed
        plans.append(StrategyPlan(strategy, moved, compute, sum(seconds), exposed, gpus * work.samples_per_gpu / step))
    return plans


NAMES = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP2", "hsdp": "HSDP"}


def plan_lines(
    work: Workload, kind: GpuKind, gpus: int, mfu: float, samples: float, gpus_per_node: int = 8
) -> list[str]:
    """The dry-run's cluster-plan table."""
    nodes = -(-gpus // gpus_per_node)
    lines = [
        f"cluster plan: {gpus} x {kind.name} ({kind.bf16_tflops:.0f} TFLOP/s bf16 dense, NVLink {kind.nvlink_gbs:.0f} "
        f"GB/s, network {kind.network_gbs:.0f} GB/s per GPU), {nodes} node(s) of {gpus_per_node}, MFU {mfu:.0%} "
        f"assumed, {work.samples_per_gpu} samples per GPU per step",
        f"  {'strategy':<9}{'GB/GPU/step':>12}{'comm s':>9}{'compute s':>11}{'exposed s':>11}{'samples/s':>12}"
        f"{'per GPU':>9}{'days':>9}",
    ]
    for each in plan(work, kind, gpus, mfu, gpus_per_node):
        traffic = sum(transfer.bytes_per_gpu for transfer in each.transfers) / 1e9
        days = samples / each.samples_per_s / 86400
        lines.append(
            f"  {NAMES[each.strategy]:<9}{traffic:>12.2f}{each.communication_s:>9.3f}{each.compute_s:>11.3f}"
            f"{each.exposed_s:>11.3f}{each.samples_per_s:>12,.0f}{each.samples_per_s / gpus:>9,.0f}{days:>9.2f}"
        )
    lines.append(
        f"  days: for {samples:.3g} samples; exposed: communication the compute cannot hide (docs/training.md)"
    )
    return lines
