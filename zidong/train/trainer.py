"""`zidong pretrain RECIPE.yaml`: the training loop, shared by pretraining and fine-tuning.

    zidong pretrain recipes/pretrain/tiny.yaml                                     one process
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m zidong pretrain ...       DDP (gloo on CPU)
    accelerate launch -m zidong pretrain ...                                       DDP / DeepSpeed / FSDP

`train(recipe, task)` sets up a `Run` (zidong/train/run.py), then loops: one optimizer step = `train.grad_accum`
micro-batches (gradients are all-reduced on the last one only), clipping, a skipped update when the gradient is
not finite, logging, evaluation, checkpoints. SIGTERM/SIGUSR1 (cluster preemption) finish the current step, save
a checkpoint and exit 0; relaunching the same command continues from the latest checkpoint, with the data stream
exactly where it was. What differs between pretraining and fine-tuning is a `Task` (zidong/train/task.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Iterator
from typing import Any

import torch

from zidong.errors import UserError
from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.train.checkpoint import save_checkpoint
from zidong.train.collectives import needs_exchange
from zidong.train.distributed import agree, averaged_over_processes
from zidong.train.optim import (
    clamp_temperature,
    clip_gradients,
    drop_gradients,
    fill_missing_gradients,
    frozen_now,
    learning_rates,
    objective_weights,
)
from zidong.train.parallelize import gradient_sync
from zidong.train.recipe import PretrainRecipe
from zidong.train.run import Run, setup
from zidong.train.step_cache import StepCache
from zidong.train.task import PretrainTask, Task
from zidong.utils.log import get_logger, progress

logger = get_logger(__name__)


class TrainingError(UserError):
    """The run cannot go on (too many non-finite steps): the message says what happened and what to try."""


def pretrain(recipe: PretrainRecipe) -> dict[str, float]:
    """Pretrain as the recipe says; returns the last retrieval metrics (empty without `data.eval`)."""
    return train(recipe, PretrainTask.for_recipe(recipe))


def train(recipe: PretrainRecipe, task: Task) -> dict[str, float]:
    """Set up, then step, log, evaluate and checkpoint; returns the last evaluation's metrics."""
    run = setup(recipe, task)
    counters, settings = run.counters, recipe.train
    stop = _PreemptionFlag()
    bar = progress(total=settings.max_steps, initial=counters.step, desc=task.name)
    metrics: dict[str, float] = {}
    stopping = False
    try:  # the loader's worker processes end with the loop, also when it raises
        while counters.step < settings.max_steps and not stopping:
            losses, grad_norm, rates, stopping = optimizer_step(run, stop.requested)
            bar.update(1)
            _check_finite_streak(run)
            done = counters.step == settings.max_steps
            if counters.step % settings.log_every == 0 or done:
                record = log_step(run, losses, grad_norm, rates)
                bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}")
            if run.held_out is not None and (done or _due(counters.step, recipe.eval.every_steps)):
                metrics = task.evaluate(run)
                run.log.write({"kind": "eval", "step": counters.step, **metrics})
            # never checkpoint a state that just went non-finite
            if (done or stopping or _due(counters.step, recipe.checkpoint.every_steps)) and (
                counters.bad_steps_in_a_row == 0
            ):
                _checkpoint(run)
    finally:
        bar.close()
        run.loader.close()
    if stopping:
        name = stop.signal_name or "a signal to another process"
        logger.info("stopped by %s at step %d after saving a checkpoint; relaunch to continue", name, counters.step)
    else:
        task.finish(run, metrics)
        if metrics:
            logger.info("held-out %s after %d steps:\n%s", task.evaluation, counters.step, task.results_table(metrics))
    run.accelerator.end_training()
    return metrics


def optimizer_step(run: Run, stop_requested: bool) -> tuple[dict[str, float], float, dict[str, float], bool]:
    """One optimizer step: micro-batches, clipping, the (possibly skipped) update, the schedule.

    Returns the losses, the gradient norm, the learning rates the step used, and whether to stop after it."""
    recipe, accelerator, counters = run.recipe, run.accelerator, run.counters
    if not run.model.training:  # after an evaluation (train() walks every module: not on every step)
        run.model.train()
    weights = objective_weights(recipe, counters.step + 1, run.task.objectives)
    losses, samples = _forward_backward(run, weights)
    if accelerator.state.deepspeed_plugin is None:  # DeepSpeed steps every parameter (fill_missing_gradients)
        fill_missing_gradients(run.trainable)
        drop_gradients(run.model, frozen_now(recipe, counters.step))  # frozen for now: no say in clipping or Adam
    # under DeepSpeed the engine has clipped and stepped already; this returns its global norm
    norm = clip_gradients(accelerator, run.trainable, recipe.train.max_grad_norm, run.sharded is not None)
    losses, grad_norm = read_once(losses, norm)
    # every process must take the same decisions: skip the update, and stop after this step
    loss_finite, stopping = agree(accelerator, math.isfinite(losses["loss"]), stop_requested)
    if apply_update(run.optimizer, accelerator.scaler, math.isfinite(grad_norm) and loss_finite):
        counters.bad_steps_in_a_row = 0
    else:
        counters.skipped_steps += 1
        if not (loss_finite and scale_still_working(accelerator.scaler)):
            counters.bad_steps_in_a_row += 1
    clamp_temperature(run.inner, accelerator.state.deepspeed_plugin is not None)
    rates = learning_rates(run.optimizer)  # those this step used
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    counters.step += 1
    counters.samples += samples
    run.window.end_step()
    return losses, grad_norm, rates, stopping


def read_once(losses: dict[str, torch.Tensor], grad_norm: torch.Tensor | float) -> tuple[dict[str, float], float]:
    """The step's losses and gradient norm as numbers, in one read from the device: the one place a training step
    waits for it (the skip decision needs them)."""
    names = list(losses)
    device = losses["loss"].device
    values = torch.stack([*(losses[n].float() for n in names), torch.as_tensor(grad_norm, device=device).float()])
    *numbers, norm = values.tolist()
    return dict(zip(names, numbers, strict=True)), norm


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, sound: bool) -> bool:
    """Step the optimizer when the loss and gradient are finite (`sound`); returns whether it did.

    Under fp16 loss scaling the scaler must see every step: a sound one goes through `scaler.step` (inside the
    prepared optimizer), and a skipped one still updates the scaler, which halves the scale when the gradient
    overflowed (`clip_grad_norm_` unscaled it and recorded the overflow), so the next step can succeed."""
    if sound:
        optimizer.step()
        return True
    if scaler is not None:
        scaler.update()
    return False


def scale_still_working(scaler: torch.amp.GradScaler | None) -> bool:
    """Under fp16 loss scaling, an overflowing gradient with a finite loss is the scale's to fix (skipped, not
    counted towards `train.max_bad_steps`) until the scale has fallen below 1: then it is not a scale problem."""
    return scaler is not None and scaler.get_scale() >= 1.0


def _forward_backward(run: Run, weights: dict[str, float]) -> tuple[dict[str, torch.Tensor], int]:
    """Forward/backward over `grad_accum` micro-batches; returns the losses averaged over them (on the device, not
    yet read) and the samples (gradients are all-reduced on the last micro-batch only, through
    `accelerator.accumulate`).

    The step's micro-batches are all read before its first forward: throughput is counted on them while they are
    on the host, and with several processes their presence masks are exchanged in one collective for the whole
    step (`ProcessGather.exchange`), while the device has nothing queued to wait for. The masks stay on the host (as
    arrays, which no wrapper moves): the model decides from them which towers run and which rows a loss reads
    without waiting for the device. With `train.full_batch_negatives` the step cache embeds every micro-batch
    first and each forward below then scores its rows against the whole step (zidong/train/step_cache.py)."""
    accelerator, accumulation = run.accelerator, run.recipe.train.grad_accum
    batches = [_next_batch(run, weights) for _ in range(accumulation)]
    presence = [{m: batch[f"{m}_present"].numpy() for m in MODALITIES} for batch in batches]
    cache = run.launched.step_cache if weights.get("contrastive", 0.0) > 0 else None
    if cache is not None:
        cache.begin(presence)  # every process's masks of the whole step, when several
    elif needs_exchange(accelerator.num_processes, weights):
        run.launched.gather.exchange(presence)
    samples = sum(len(batch["text_present"]) for batch in batches)
    batches = [
        {key: value.numpy() if key.endswith("_present") else value.to(accelerator.device, non_blocking=True)
         for key, value in batch.items()}
        for batch in batches
    ]  # fmt: skip
    if cache is not None:
        _cache_embeddings(run, cache, batches, weights)
    totals: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(batches):
        with (
            accelerator.accumulate(run.model),
            gradient_sync(run.model, accelerator.sync_gradients),
            accelerator.autocast(),
            _replaying(cache, index, accelerator.device),
        ):
            output = run.model(**batch, **run.task.loss_arguments(weights))
            accelerator.backward(output.loss)
        for name, value in {"loss": output.loss, **output.losses}.items():
            totals[name] = totals.get(name, 0.0) + value.detach() / accumulation
    return totals, samples


def _cache_embeddings(run: Run, cache: StepCache, batches: list[dict], weights: dict[str, float]) -> None:
    """Phase 1 and 2 of `train.full_batch_negatives` (zidong/train/step_cache.py): every micro-batch embedded
    without gradients, then the whole step's contrastive loss and its gradient for each cached row."""
    arguments = run.task.loss_arguments({"contrastive": weights["contrastive"]})
    with torch.no_grad(), cache.recording(), run.accelerator.autocast():
        for index, batch in enumerate(batches):
            with cache.randomness(index, [run.accelerator.device]):
                run.model(**batch, **arguments)
    config = run.inner.base_model.config
    cache.solve(config.contrastive_loss, config.projection_dim)


@contextlib.contextmanager
def _replaying(cache: StepCache | None, index: int, device: torch.device) -> Iterator[None]:
    """Micro-batch `index`'s forward with gradients against the step's cache (nothing without one)."""
    if cache is None:
        yield
        return
    with cache.randomness(index, [device]), cache.replay(index):
        yield


def _next_batch(run: Run, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """The next micro-batch from the loader (on the host), recorded in the ledger and the throughput window."""
    started = time.perf_counter()
    batch = next(run.loader)
    run.window.waited += time.perf_counter() - started
    if run.ledger is not None:
        with run.ledger.open("a") as stream:
            stream.write(json.dumps({"step": run.counters.step + 1, "samples": run.loader.last_refs}) + "\n")
    run.window.count(batch, run.step_flops.of_batch(batch, weights))
    return batch


def _due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def _check_finite_streak(run: Run) -> None:
    bad, limit = run.counters.bad_steps_in_a_row, run.recipe.train.max_bad_steps
    if bad >= limit:
        raise TrainingError(
            f"{bad} steps in a row had a non-finite loss or gradient (step {run.counters.step}); nothing was "
            "checkpointed from them. Lower train.learning_rate, raise train.warmup_steps, or resume from an "
            "earlier checkpoint with resume=PATH"
        )


def log_step(run: Run, losses: dict[str, float], grad_norm: float, rates: dict[str, float]) -> dict:
    """Writes one `train` record (losses averaged over processes: collective) and returns it."""
    losses = averaged_over_processes(run.accelerator, losses)
    numbers = {"grad_norm": grad_norm, "skipped_steps": run.counters.skipped_steps}
    record = run.window.summary(run.counters.step, losses, {**rates, **numbers})
    run.log.write({"kind": "train", **record})
    return record


def _checkpoint(run: Run) -> None:
    counters = run.counters
    save_checkpoint(
        run.accelerator,
        run.output_dir,
        counters.step,
        {**counters.__dict__, "processes": run.accelerator.num_processes, "idle_heads": run.idle_heads},
        run.loader.state_dict(),
        run.recipe.checkpoint.keep_last,
        describe=run.describe,
        sharded=run.sharded,
    )


class _PreemptionFlag:
    """SIGTERM / SIGUSR1 ask the loop to checkpoint after the current step and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        for number in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, self._handle)

    def _handle(self, number: int, _frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(number).name
