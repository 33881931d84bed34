"""fp16 loss scaling and the non-finite-step guard: a skipped step still updates the scaler (the scale falls after
an overflow, so training recovers), and overflows count as bad steps only once the scale has fallen below 1.

Run on CPU with torch's own GradScaler for the CPU device, through Accelerate's prepared optimizer (the object the
trainer steps): the same calls the trainer makes under fp16 on a GPU."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer

from zidong.train.trainer import apply_update, scale_still_working


@pytest.fixture
def setup() -> tuple[torch.nn.Linear, AcceleratedOptimizer, torch.amp.GradScaler]:
    Accelerator(cpu=True)  # the state the prepared optimizer reads
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1000)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), scaler=scaler)
    return layer, optimizer, scaler


def backward_and_unscale(layer, optimizer, scaler, poison: bool) -> bool:
    """One backward of a scaled loss, then what `clip_grad_norm_` does: unscale, norm. Returns whether it is finite."""
    loss = layer(torch.ones(2, 4)).pow(2).mean()
    scaler.scale(loss).backward()
    if poison:
        layer.weight.grad[0, 0] = float("inf")
    scaler.unscale_(optimizer.optimizer)
    return bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in layer.parameters()])))


def test_an_overflow_skips_the_update_and_halves_the_scale_then_training_goes_on(setup) -> None:
    layer, optimizer, scaler = setup
    before = layer.weight.detach().clone()
    sound = backward_and_unscale(layer, optimizer, scaler, poison=True)
    assert not sound
    assert not apply_update(optimizer, scaler, sound)
    optimizer.zero_grad()
    assert torch.equal(layer.weight, before)
    assert scaler.get_scale() == 2.0  # the scaler saw the skipped step
    assert scale_still_working(scaler)  # an overflow at scale 2: the scale's to fix, not a bad step
    sound = backward_and_unscale(layer, optimizer, scaler, poison=False)  # no "unscale_() already called" error
    assert sound
    assert apply_update(optimizer, scaler, sound)
    assert not torch.equal(layer.weight, before)


def test_overflows_below_scale_1_count_as_bad_steps(setup) -> None:
    layer, optimizer, scaler = setup
    working = []
    for _ in range(4):  # 4 -> 2 -> 1 -> 0.5 -> 0.25
        assert not apply_update(optimizer, scaler, backward_and_unscale(layer, optimizer, scaler, poison=True))
        optimizer.zero_grad()
        working.append(scale_still_working(scaler))
    assert working == [True, True, False, False]
    assert not scale_still_working(None)  # without loss scaling every skipped step is a bad step
