"""Two gloo processes: local loss + gather-with-grad (`ProcessGather`) equals the naive loss over the global batch,
in value and grad.

Each rank holds a slice of one global batch (slices of different sizes, one of them possibly empty; some samples
lack the second modality) and a copy of a small embedding network. After backward, the gradients are averaged over
ranks as DDP does; the mean of the ranks' losses and the averaged gradients must equal one process computing the
textbook loss on the samples of the whole batch that have both modalities.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from zidong.models.zidong.contrastive_zidong import contrastive_losses
from zidong.train.collectives import ProcessGather, exchange_presence

WORLD = 2
GLOBAL = 7
WIDTH = 6
LACKS_SECOND = (2, 5)  # samples without the second modality


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
    """Parameter gradients by `backward()`, as training takes them (it runs every node, placeholders' too)."""
    params = [*network.parameters(), scale, bias]
    for param in params:
        param.grad = None
    loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for kind in ("softmax", "sigmoid"):
            for split in (4, 0):  # 4 + 3 rows, and 0 + 7 rows
                check_case(rank, kind, split, LACKS_SECOND)
            check_case(rank, kind, 2, (0, 1, 5))  # rank 0 has no second modality at all: None, as the model
    finally:
        dist.destroy_process_group()


def check_case(rank: int, kind: str, split: int, lacks_second: tuple[int, ...]) -> None:
    inputs_a, inputs_b, network, scale, bias = make_problem()
    has_second = torch.tensor([i not in lacks_second for i in range(GLOBAL)])
    rows = slice(0, split) if rank == 0 else slice(split, GLOBAL)
    a = F.normalize(network(inputs_a[rows]), dim=-1)
    b = F.normalize(network(inputs_b[rows]), dim=-1) * has_second[rows, None]  # zeros where absent, as the model
    if not has_second[rows].any():
        b = None  # as the model passes a modality none of this rank's samples has
    presence = {"first": torch.ones(len(a), dtype=torch.bool), "second": has_second[rows]}
    gather = ProcessGather(torch.device("cpu"))
    local = contrastive_losses({"first": a, "second": b}, presence, scale, bias, kind, network.out_features, gather)[
        "contrastive_first_second"
    ]
    grads = gradients(local, network, scale, bias)
    for grad in grads:  # what DDP does to parameter gradients
        dist.all_reduce(grad)
        grad /= WORLD
    mean_loss = local.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= WORLD

    full_a = F.normalize(network(inputs_a[has_second]), dim=-1)
    full_b = F.normalize(network(inputs_b[has_second]), dim=-1)
    reference = naive_loss(full_a, full_b, scale, bias, kind)
    expected = gradients(reference, network, scale, bias)
    assert abs(mean_loss.item() - reference.item()) < 1e-6, (mean_loss.item(), reference.item())
    for got, want in zip(grads, expected, strict=True):
        assert (got - want).abs().max().item() < 1e-6, (kind, split, got, want)


def test_local_loss_equals_global_loss_on_two_processes(tmp_path) -> None:
    # spawn, not fork: a fork after torch has started its thread pools can deadlock
    mp.start_processes(worker, args=(str(tmp_path / "store"),), nprocs=WORLD, start_method="spawn")


def test_no_sample_with_both_gives_no_loss() -> None:
    embeds = {"first": torch.randn(3, 4), "second": None}
    presence = {"first": torch.ones(3, dtype=torch.bool), "second": torch.zeros(3, dtype=torch.bool)}
    assert contrastive_losses(embeds, presence, torch.tensor(1.0), None, "softmax", 4) == {}
    embeds["second"] = torch.zeros(3, 4)
    assert contrastive_losses(embeds, presence, torch.tensor(1.0), None, "softmax", 4) == {}


# Each rank's micro-batches: (rows, modalities present per row as "tvs" letters); rank 1's second is empty.
MICRO_BATCHES = (
    [["tv", "t", "vs"], ["tvs", "s", "", "t", "v"], ["t"]],
    [["tvs", "v"], [], ["s", "ts", "tv", "vs", "tvs"]],
)
LETTERS = {"text": "t", "vision": "v", "speech": "s"}


def masks_of(rows: list[str]) -> dict[str, np.ndarray]:
    return {m: np.array([letter in row for row in rows], dtype=bool) for m, letter in LETTERS.items()}


class CollectiveCounter:
    """Counts `all_gather_into_tensor` calls: the presence exchange's (and the row counts') collective."""

    def __init__(self) -> None:
        self.calls = 0
        self.original = dist.all_gather_into_tensor

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def exchange_worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    counter = CollectiveCounter()
    dist.all_gather_into_tensor = counter
    try:
        mine = [masks_of(rows) for rows in MICRO_BATCHES[rank]]
        for capacity, collectives in ((5, 1), (None, 2)):
            counter.calls = 0
            exchanged = exchange_presence(mine, torch.device("cpu"), capacity)
            assert counter.calls == collectives, (capacity, counter.calls)
            for index, got in enumerate(exchanged):
                every = [MICRO_BATCHES[r][index] for r in range(WORLD)]
                assert got.counts == [len(rows) for rows in every]
                want = masks_of([row for rows in every for row in rows])
                assert got.masks.keys() == want.keys()
                for modality in want:
                    np.testing.assert_array_equal(got.masks[modality], want[modality])
        with pytest.raises(ValueError, match="exceeds the stated capacity of 2"):
            exchange_presence(mine, torch.device("cpu"), capacity=2)

        # the loss with the masks exchanged beforehand: the same value, and no presence collective of its own
        exchanged = exchange_presence(mine, torch.device("cpu"), capacity=5)
        generator = torch.Generator().manual_seed(rank)
        for presence, by_rank in zip(mine, exchanged, strict=True):
            embeds = {
                m: F.normalize(torch.randn(len(mask), WIDTH, generator=generator), dim=-1)
                * torch.from_numpy(mask)[:, None]
                for m, mask in presence.items()
            }
            scale = torch.tensor(1.0)
            counter.calls = 0
            gather = ProcessGather(torch.device("cpu"))
            gather.expect([by_rank])
            given = contrastive_losses(embeds, presence, scale, None, "softmax", WIDTH, gather)
            assert counter.calls == 0
            asked = contrastive_losses(embeds, presence, scale, None, "softmax", WIDTH, gather)
            assert counter.calls == 2
            assert given
            assert given.keys() == asked.keys()
            for name in given:
                torch.testing.assert_close(given[name], asked[name], rtol=0, atol=0)
        # masks exchanged for another batch are refused, on the host, before any collective
        gather.expect([exchanged[2]])
        with pytest.raises(ValueError, match=f"does not describe this batch on rank {rank}"):
            contrastive_losses(embeds, mine[0], scale, None, "softmax", WIDTH, gather)
    finally:
        dist.all_gather_into_tensor = counter.original
        dist.destroy_process_group()


def test_presence_of_a_whole_step_is_exchanged_in_one_collective(tmp_path) -> None:
    """Three micro-batches per rank, of different sizes (one empty): one collective with a known capacity, two
    without, the same masks as a concatenation by hand; the loss given them equals the loss that asks itself."""
    mp.start_processes(exchange_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, start_method="spawn")
