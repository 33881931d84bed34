"""Two gloo processes: local loss + gather-with-grad equals the naive loss over the global batch, in value and grad.

Each rank holds a slice of one global batch (slices of different sizes, one of them possibly empty) and a copy of
a small embedding network. After backward, the gradients are averaged over ranks as DDP does; the mean of the
ranks' losses and the averaged gradients must equal one process computing the textbook loss on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from zidong.models.zidong.losses_zidong import contrastive_pair_loss

WORLD = 2
GLOBAL = 7
WIDTH = 6


def make_problem() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs_a = torch.randn(GLOBAL, WIDTH, generator=generator, dtype=torch.float64)
    inputs_b = torch.randn(GLOBAL, WIDTH, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    network = torch.nn.Linear(WIDTH, 4, dtype=torch.float64)
    logit_scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    logit_bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    return inputs_a, inputs_b, network, logit_scale, logit_bias


def naive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    """The textbook loss of one process holding the whole batch."""
    logits = scale.exp() * a @ b.T
    if kind == "sigmoid":
        targets = 2 * torch.eye(len(a), dtype=a.dtype) - 1
        return -F.logsigmoid(targets * (logits + bias)).sum() / len(a)
    labels = torch.arange(len(a))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def gradients(loss: torch.Tensor, network: torch.nn.Module, scale: torch.Tensor, bias: torch.Tensor) -> list:
    params = [*network.parameters(), scale, bias]
    return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


def worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for kind in ("softmax", "sigmoid"):
            for split in (4, 0):  # 4 + 3 rows, and 0 + 7 rows
                check_case(rank, kind, split)
    finally:
        dist.destroy_process_group()


def check_case(rank: int, kind: str, split: int) -> None:
    inputs_a, inputs_b, network, scale, bias = make_problem()
    rows = slice(0, split) if rank == 0 else slice(split, GLOBAL)
    a = F.normalize(network(inputs_a[rows]), dim=-1)
    b = F.normalize(network(inputs_b[rows]), dim=-1)
    local = contrastive_pair_loss(a, b, scale, bias, kind)
    grads = gradients(local, network, scale, bias)
    for grad in grads:  # what DDP does to parameter gradients
        dist.all_reduce(grad)
        grad /= WORLD
    mean_loss = local.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= WORLD

    full_a = F.normalize(network(inputs_a), dim=-1)
    full_b = F.normalize(network(inputs_b), dim=-1)
    reference = naive_loss(full_a, full_b, scale, bias, kind)
    expected = gradients(reference, network, scale, bias)
    assert abs(mean_loss.item() - reference.item()) < 1e-6, (mean_loss.item(), reference.item())
    for got, want in zip(grads, expected, strict=True):
        assert (got - want).abs().max().item() < 1e-6, (kind, split, got, want)


def test_local_loss_equals_global_loss_on_two_processes(tmp_path) -> None:
    # spawn, not fork: a fork after torch has started its thread pools can deadlock
    mp.start_processes(worker, args=(str(tmp_path / "store"),), nprocs=WORLD, start_method="spawn")


def test_no_sample_anywhere_gives_no_loss() -> None:
    empty = torch.zeros(0, 4)
    assert contrastive_pair_loss(empty, empty, torch.tensor(1.0), torch.tensor(0.0), "softmax") is None
