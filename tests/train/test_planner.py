"""The dry-run's cluster plan: bytes per strategy against hand-computed ring collectives, the overlap rule, and
the estimate against a published run (open_clip's ViT-B/32 on LAION-400M, 128 A100s)."""

from __future__ import annotations

import pytest

from zidong.train.planner import GPU_KINDS, Workload, plan, transfers

BILLION = Workload(
    parameters=10**9, trainable=10**9, flops_per_sample=1e12, samples_per_gpu=32, embedding_dim=512, modalities=3
)


def by_what(strategy: str, gpus: int = 16) -> dict[str, tuple[float, str]]:
    return {
        t.what: (t.bytes_per_gpu, t.link) for t in transfers(BILLION, strategy, gpus, gpus_per_node=8, shard_size=8)
    }


def test_each_strategy_moves_what_its_ring_collectives_move() -> None:
    # 16 GPUs in 2 nodes, 1B float32 parameters (4 GB): a ring all-gather or reduce-scatter moves 15/16 of it per
    # GPU, an all-reduce twice that; HSDP keeps its gathers inside a node and all-reduces a 1/8 shard across 2
    embeddings = 2 * 15 * 32 * 512 * 4 * 3
    assert by_what("ddp") == {
        "gradient all-reduce": (7.5e9, "network"),
        "contrastive embedding all-gather": (embeddings, "network"),
    }
    assert by_what("fsdp")["weight all-gathers (forward + backward)"] == (7.5e9, "network")
    assert by_what("fsdp")["gradient reduce-scatter"] == (3.75e9, "network")
    hsdp = by_what("hsdp")
    assert hsdp["weight all-gathers in the shard group"] == (7e9, "nvlink")
    assert hsdp["gradient reduce-scatter in the shard group"] == (3.5e9, "nvlink")
    assert hsdp["gradient all-reduce across the groups"] == (0.5e9, "network")
    assert by_what("ddp", gpus=8)["gradient all-reduce"] == (7e9, "nvlink")  # one node: NVLink only


def test_communication_beyond_its_window_adds_to_the_step() -> None:
    kind = GPU_KINDS["h100"]
    heavy = plan(BILLION, kind, 16, mfu=0.4)  # compute 32e12 / 395.6e12 = 0.081 s; DDP's 7.5 GB take 0.15 s
    ddp = next(each for each in heavy if each.strategy == "ddp")
    compute = 32e12 / (989e12 * 0.4)
    assert ddp.compute_s == pytest.approx(compute)
    hidden_under_backward = 2 / 3 * compute
    embedding_s = 2 * 15 * 32 * 512 * 4 * 3 / 50e9
    assert ddp.exposed_s == pytest.approx(7.5e9 / 50e9 - hidden_under_backward + embedding_s)
    assert ddp.samples_per_s == pytest.approx(16 * 32 / (compute + ddp.exposed_s))


def test_the_estimate_matches_open_clips_vit_b_32_run_at_its_published_mfu() -> None:
    """open_clip's docs/PRETRAINED.md: ViT-B/32 on LAION-400M, 128 A100s, 256 samples per GPU, 725-773 samples/s
    per GPU, about 11 % MFU. The model: ViT-B/32 (12 layers of width 768, 49 patches + 1 token) and a text
    transformer of 12 layers of width 512 over 77 tokens, 151M parameters, embeddings of 512. Training FLOPs per
    sample by the trainer's rule (6 x parameters x tokens, per tower): at 11 % of the A100's 312 TFLOP/s the plan
    must land in the published range, i.e. zidong counts the FLOPs open_clip counted."""
    vision = 12 * 12 * 768**2 + 3 * 32 * 32 * 768  # layers (attention 4 d^2 + MLP 8 d^2) and the patch projection
    text = 12 * 12 * 512**2
    flops = 6 * (vision * 50 + text * 77)
    clip = Workload(151_277_313, 151_277_313, flops, 256, 512, modalities=2)
    ddp = next(each for each in plan(clip, GPU_KINDS["a100"], 128, mfu=0.11) if each.strategy == "ddp")
    per_gpu = ddp.samples_per_s / 128
    assert 725 * 0.95 <= per_gpu <= 773 * 1.05, per_gpu
    assert ddp.exposed_s < 0.05 * ddp.compute_s  # the gradient all-reduce hides under the backward
