"""`zidong pretrain RECIPE.yaml`: the pretraining loop.

    zidong pretrain recipes/pretrain/tiny.yaml                                     one process
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m zidong pretrain ...       DDP (gloo on CPU)
    accelerate launch -m zidong pretrain ...                                       DDP / DeepSpeed / FSDP

`pretrain(recipe)` reads top to bottom: set up (accelerator, corpus, tokenizer, model, optimizer, data stream,
resume), then the loop: one optimizer step = `train.grad_accum` micro-batches (gradients are all-reduced on the
last one only), clipping, a skipped update when the gradient is not finite, logging, evaluation, checkpoints.
SIGTERM/SIGUSR1 (cluster preemption) finish the current step, save a checkpoint and exit 0; relaunching the same
command continues from the latest checkpoint, with the data stream exactly where it was.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from transformers import AutoTokenizer
from transformers.integrations import unset_hf_deepspeed_config

from zidong.config import to_dict, to_yaml
from zidong.data.stream import StreamLoader, StreamSettings
from zidong.data.transforms import SamplePipeline
from zidong.errors import UserError
from zidong.evaluation.retrieval import HeldOut, retrieval, retrieval_table
from zidong.models.zidong.configuration_zidong import MODALITIES, PRESETS
from zidong.models.zidong.modeling_zidong import OBJECTIVES, ZidongModel
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.train.checkpoint import checkpoints, describe_model, load_checkpoint, save_checkpoint
from zidong.train.flops import StepFlops, measured_peak_flops
from zidong.train.metrics import MetricsLog, ThroughputWindow, check_trackers
from zidong.train.optim import (
    build_optimizer,
    build_scheduler,
    drop_gradients,
    fill_missing_gradients,
    freeze_for_good,
    frozen_now,
    learning_rates,
    objective_weights,
)
from zidong.train.recipe import PretrainRecipe
from zidong.utils.log import get_logger, progress

logger = get_logger(__name__)
LEDGER_FILE = "ledger-rank{rank}.jsonl"


class TrainingError(UserError):
    """The run cannot go on (too many non-finite steps): the message says what happened and what to try."""


@dataclass
class Counters:
    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0


class Task:
    """What a kind of training brings to the shared loop: pretraining here; fine-tuning tasks
    (zidong/train/finetune.py) override these methods."""

    name = "pretrain"
    evaluation = "retrieval"  # what `evaluate` measures, for the log
    objectives: tuple[str, ...] = OBJECTIVES  # the model objectives weighted by the recipe's `loss` section

    def build(self, recipe: PretrainRecipe, accelerator: Accelerator) -> tuple[torch.nn.Module, ZidongProcessor]:
        """The model (not yet prepared) and its processor; runs with DeepSpeed's config unregistered."""
        _ensure_demo_corpus(recipe, accelerator)
        tokenizer = _tokenizer(recipe)
        model = _model(recipe, tokenizer, lockstep=lockstep_enabled(accelerator))
        return model, ZidongProcessor.for_model(model.config, tokenizer, recipe.model.vision.pretrained)

    def pipeline_options(self, recipe: PretrainRecipe) -> dict[str, Any]:
        """Extra `SamplePipeline` settings for training and evaluation (modalities read, labels)."""
        return {}

    def loss_arguments(self, weights: dict[str, float]) -> dict[str, Any]:
        """What the model's forward takes, besides the batch, to return the training loss."""
        return {"return_loss": True, "loss_weights": weights}

    def evaluate(self, run: Run) -> dict[str, float]:
        """The held-out metrics (collective: every process calls it); only called when `data.eval` is set."""
        return retrieval(run.model, run.held_out)

    def report(self, metrics: dict[str, float]) -> str:
        """The end-of-run table (logged as "held-out evaluation after N steps")."""
        return retrieval_table(metrics)

    def finish(self, run: Run, metrics: dict[str, float]) -> None:
        """After the last step's checkpoint (every process calls it)."""


@dataclass
class Run:
    """Everything the loop works with, built by `_setup`."""

    task: Task
    recipe: PretrainRecipe
    accelerator: Accelerator
    output_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: StreamLoader
    held_out: HeldOut | None  # `data.eval`, read with evaluation transforms
    counters: Counters
    step_flops: StepFlops
    log: MetricsLog
    window: ThroughputWindow
    ledger: Path | None
    describe: Callable[[Path], None]  # writes the model config, processor and recipe into a checkpoint


def pretrain(recipe: PretrainRecipe) -> dict[str, float]:
    """Pretrain as the recipe says; returns the last retrieval metrics (empty without `data.eval`)."""
    return train(recipe, Task())


def train(recipe: PretrainRecipe, task: Task) -> dict[str, float]:
    """The shared loop: set up, step, log, evaluate, checkpoint; returns the last evaluation's metrics."""
    run = _setup(recipe, task)
    counters, settings = run.counters, recipe.train
    stop = _PreemptionFlag()
    bar = progress(total=settings.max_steps, initial=counters.step, desc=task.name)
    metrics: dict[str, float] = {}
    stopping = False
    try:  # the loader's worker processes end with the loop, also when it raises
        while counters.step < settings.max_steps and not stopping:
            losses, grad_norm, rates, stopping = _optimizer_step(run, stop.requested)
            bar.update(1)
            if counters.bad_steps_in_a_row >= settings.max_bad_steps:
                raise TrainingError(
                    f"{counters.bad_steps_in_a_row} steps in a row had a non-finite loss or gradient (step "
                    f"{counters.step}); nothing was checkpointed from them. Lower train.learning_rate, raise "
                    "train.warmup_steps, or resume from an earlier checkpoint with resume=PATH"
                )
            done = counters.step == settings.max_steps
            if counters.step % settings.log_every == 0 or done:
                losses = _averaged_over_processes(run.accelerator, losses)
                record = run.window.summary(counters.step, losses, {**rates, **_step_numbers(grad_norm, counters)})
                bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}")
                run.log.write({"kind": "train", **record})
            if run.held_out is not None and (
                done or (recipe.eval.every_steps and counters.step % recipe.eval.every_steps == 0)
            ):
                metrics = task.evaluate(run)
                run.log.write({"kind": "eval", "step": counters.step, **metrics})
            checkpoint_due = done or stopping or counters.step % recipe.checkpoint.every_steps == 0
            if (
                checkpoint_due and counters.bad_steps_in_a_row == 0
            ):  # never checkpoint a state that just went non-finite
                state = run.loader.state_dict()
                save_checkpoint(
                    run.accelerator,
                    run.output_dir,
                    counters.step,
                    {**counters.__dict__, "processes": run.accelerator.num_processes},
                    state,
                    recipe.checkpoint.keep_last,
                    describe=run.describe,
                )
    finally:
        bar.close()
        run.loader.close()
    if stopping:
        logger.info(
            "stopped by %s at step %d after saving a checkpoint; relaunch to continue",
            stop.signal_name or "a signal to another process",
            counters.step,
        )
    else:
        task.finish(run, metrics)
        if metrics:
            logger.info("held-out %s after %d steps:\n%s", task.evaluation, counters.step, task.report(metrics))
    run.accelerator.end_training()
    return metrics


def _optimizer_step(run: Run, stop_requested: bool) -> tuple[dict[str, float], torch.Tensor, dict[str, float], bool]:
    """One optimizer step: micro-batches, clipping, the (possibly skipped) update, the schedule.

    Returns the losses, the gradient norm, the learning rates the step used, and whether to stop after it."""
    recipe, accelerator, counters = run.recipe, run.accelerator, run.counters
    run.model.train()
    weights = objective_weights(recipe, counters.step + 1, run.task.objectives)
    losses, samples = _forward_backward(run, weights)
    if accelerator.state.deepspeed_plugin is None:  # DeepSpeed steps every parameter (fill_missing_gradients)
        fill_missing_gradients(run.model)
        drop_gradients(run.model, frozen_now(recipe, counters.step))  # frozen for now: no say in clipping or Adam
    # under DeepSpeed the engine has clipped and stepped already; this returns its global norm
    grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(run.model.parameters(), recipe.train.max_grad_norm))
    # every process must take the same decisions: skip the update, and stop after this step
    loss_finite, stopping = _agree(accelerator, math.isfinite(losses["loss"]), stop_requested)
    if bool(torch.isfinite(grad_norm)) and loss_finite:
        run.optimizer.step()
        counters.bad_steps_in_a_row = 0
    else:
        counters.skipped_steps += 1
        counters.bad_steps_in_a_row += 1
    rates = learning_rates(run.optimizer)  # those this step used
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    counters.step += 1
    counters.samples += samples
    run.window.end_step()
    return losses, grad_norm, rates, stopping


def _forward_backward(run: Run, weights: dict[str, float]) -> tuple[dict[str, float], int]:
    """Forward/backward over `grad_accum` micro-batches; returns the losses averaged over them and the samples
    (gradients are all-reduced on the last micro-batch only, through `accelerator.accumulate`)."""
    accelerator, accumulation = run.accelerator, run.recipe.train.grad_accum
    totals: dict[str, float] = {}
    samples = 0
    for _ in range(accumulation):
        started = time.perf_counter()
        batch = next(run.loader)
        run.window.waited += time.perf_counter() - started
        if run.ledger is not None:
            with run.ledger.open("a") as stream:
                stream.write(json.dumps({"step": run.counters.step + 1, "samples": run.loader.last_refs}) + "\n")
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
        run.window.count(batch, run.step_flops.of_batch(batch, weights))
        samples += len(batch["text_present"])
        with accelerator.accumulate(run.model), accelerator.autocast():
            output = run.model(**batch, **run.task.loss_arguments(weights), lockstep=lockstep_enabled(run.accelerator))
            accelerator.backward(output.loss)
        for name, value in {"loss": output.loss, **output.losses}.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach()) / accumulation
    return totals, samples


def _step_numbers(grad_norm: torch.Tensor, counters: Counters) -> dict[str, float]:
    return {"grad_norm": float(grad_norm), "skipped_steps": counters.skipped_steps}


def _averaged_over_processes(accelerator: Accelerator, losses: dict[str, float]) -> dict[str, float]:
    """Each loss averaged over the processes that have it (collective). `loss` then is what the update minimised
    (gradients are averaged over processes); a per-objective loss that a process's batch had nothing for
    (a pair it lacked) is the mean over the others."""
    if accelerator.num_processes == 1:
        return losses
    every = gather_object([losses])
    names = dict.fromkeys(name for each in every for name in each)
    return {name: statistics.fmean(each[name] for each in every if name in each) for name in names}


def _agree(accelerator: Accelerator, loss_finite: bool, stop_requested: bool) -> tuple[bool, bool]:
    """(every process's loss is finite, some process was asked to stop), the same on every process."""
    if accelerator.num_processes == 1:
        return loss_finite, stop_requested
    flags = torch.tensor([float(not loss_finite), float(stop_requested)], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags[0] == 0), bool(flags[1] > 0)


def lockstep_enabled(accelerator: Accelerator) -> bool:
    """Under DeepSpeed and FSDP every process runs every tower and head on every step (placeholders where its batch has
    nothing for them, weighted 0): ZeRO reduces gradient buckets, and ZeRO-3 also gathers parameters, in the order
    modules run (FSDP likewise per sharded layer), so processes whose batches differ in modalities must still make
    the same calls. DDP instead
    runs with find_unused_parameters."""
    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


# ------------------------------------------------------------------------------------------ set-up


def _setup(recipe: PretrainRecipe, task: Task) -> Run:
    """Accelerator, corpus, tokenizer, model, optimizer, data stream, resume point, metrics sinks."""
    check_trackers(recipe.train.trackers)
    output_dir = Path(recipe.output_dir)
    accelerator = _accelerator(recipe, output_dir)
    logger.info(
        "%d process(es), %s on %s", accelerator.num_processes, accelerator.distributed_type.value, accelerator.device
    )
    if recipe.train.compile and accelerator.device.type != "cuda":
        # seen with torch 2.11: inductor's CPU backward of the towers' scaled-dot-product attention fails a
        # stride assertion after minutes of compiling
        raise UserError("train.compile=true needs a CUDA device (compiling the towers for CPU fails in torch 2.11)")
    resume_from = _resume_point(recipe, output_dir)
    set_seed(recipe.seed)
    with _built_whole(accelerator):
        model, processor = task.build(recipe, accelerator)
    frozen = freeze_for_good(model, recipe)
    if frozen:
        logger.info("frozen for the whole run: %s tower(s)", ", ".join(frozen))
    step_flops = StepFlops(model.base_model)  # a classifier: count the towers of its joint model
    if recipe.train.compile:
        _compile(model)
    optimizer = build_optimizer(model, recipe, fused=accelerator.device.type == "cuda")
    scheduler = build_scheduler(optimizer, recipe)
    _configure_deepspeed(accelerator, recipe)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    counters, data_states = Counters(), []
    if resume_from is not None:
        trainer_state, data_states = load_checkpoint(accelerator, resume_from)
        counters = Counters(**{k: v for k, v in trainer_state.items() if k in Counters.__dataclass_fields__})
        logger.info("resumed from %s (step %d)", resume_from, counters.step)
    held_out = None
    if recipe.data.eval:
        pipeline = SamplePipeline(
            processor,
            train=False,
            max_text_tokens=recipe.data.max_text_tokens,
            max_speech_seconds=recipe.data.max_speech_seconds,
            **task.pipeline_options(recipe),
        )
        held_out = HeldOut(
            recipe.data.eval, pipeline, recipe.train.batch_size, accelerator, lockstep_enabled(accelerator)
        )
    return Run(
        task=task,
        recipe=recipe,
        accelerator=accelerator,
        output_dir=output_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=train_loader(
            recipe,
            processor,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            saved=data_states,
            options=task.pipeline_options(recipe),
            pin_memory=accelerator.device.type == "cuda",
        ),
        held_out=held_out,
        counters=counters,
        step_flops=step_flops,
        log=MetricsLog(accelerator, output_dir, output_dir.name, to_dict(recipe)),
        window=ThroughputWindow(step_flops.samples_per_speech_frame, _peak_flops(recipe, accelerator)),
        ledger=output_dir / LEDGER_FILE.format(rank=accelerator.process_index) if recipe.data.ledger else None,
        describe=functools.partial(describe_model, accelerator.unwrap_model(model), processor, to_yaml(recipe)),
    )


def _peak_flops(recipe: PretrainRecipe, accelerator: Accelerator) -> float:
    if recipe.train.peak_tflops:
        return recipe.train.peak_tflops * 1e12
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    peak = measured_peak_flops(accelerator.device, dtype)
    logger.info("matmul peak measured on %s (%s): %.1f TFLOP/s per process", accelerator.device, dtype, peak / 1e12)
    return peak


def _compile(model: ZidongModel) -> None:
    """`torch.compile` each tower in place (parameter names unchanged, so checkpoints are the same)."""
    for tower in model.towers().values():
        tower.compile()


def _accelerator(recipe: PretrainRecipe, output_dir: Path) -> Accelerator:
    cpu = not torch.cuda.is_available()
    # a rank whose batch lacks a modality does not run that tower
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo" if cpu else "nccl"))
    # no `cpu=` here: it would override a DeepSpeed launch; a CPU box under torchrun needs ACCELERATE_USE_CPU=1
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision if not cpu else "no",
        gradient_accumulation_steps=recipe.train.grad_accum,
        # Our schedules count optimizer steps. Linked to the optimizer, Accelerate's scheduler wrapper would step
        # the schedule once per process on every call (it assumes a dataloader whose batch grows with the
        # processes), so warm-up and decay would run N times too fast on N processes.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        log_with=list(recipe.train.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.distributed_type == DistributedType.NO:
        raise UserError(
            f"{world} processes were launched, but Accelerate set up no distributed training for them on "
            f"{accelerator.device} (each would train alone and overwrite the others' files). FSDP needs GPUs; on "
            "CPU launch DDP with `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m zidong pretrain ...` or "
            "DeepSpeed with `accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml ...`"
        )
    return accelerator


def _configure_deepspeed(accelerator: Accelerator, recipe: PretrainRecipe) -> None:
    """Under DeepSpeed, batch size, accumulation and clipping come from the recipe (we prepare no DataLoader
    from which Accelerate could read the batch size)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config.update(
            {
                "train_micro_batch_size_per_gpu": recipe.train.batch_size,
                "train_batch_size": recipe.train.batch_size * recipe.train.grad_accum * accelerator.num_processes,
                "gradient_accumulation_steps": recipe.train.grad_accum,
                "gradient_clipping": recipe.train.max_grad_norm,
            }
        )


def _resume_point(recipe: PretrainRecipe, output_dir: Path) -> Path | None:
    if recipe.resume == "never":
        if checkpoints(output_dir):
            raise UserError(
                f"{output_dir} already holds checkpoints and resume=never; choose another output_dir or use resume=auto"
            )
        return None
    if recipe.resume == "auto":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(recipe.resume)
    if not (path / "trainer.json").is_file():
        raise UserError(f"resume={recipe.resume}: not a checkpoint folder (expected {path}/trainer.json)")
    return path


def _ensure_demo_corpus(recipe: PretrainRecipe, accelerator: Accelerator) -> None:
    if recipe.data.demo is None:
        return
    folder = Path(recipe.data.demo)
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (folder / "tokenizer" / "tokenizer.json").is_file():
            from zidong.data.demo import make_demo

            logger.info("building the demo corpus into %s (first run only)", folder)
            make_demo(folder)


def _tokenizer(recipe: PretrainRecipe):
    source = recipe.model.tokenizer or recipe.model.text.pretrained
    if source is None:
        raise UserError("model.tokenizer is not set: give a tokenizer folder (see `zidong tokenizer train`)")
    if not Path(source).is_dir():
        raise UserError(f"model.tokenizer={source}: no such folder (train one with `zidong tokenizer train`)")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"model.tokenizer={source}: cannot load a tokenizer there ({err})") from None


@contextlib.contextmanager
def _built_whole(accelerator: Accelerator):
    """Build the model whole on every process, then let DeepSpeed partition it in `prepare`.

    Accelerate registers its DeepSpeed config with transformers whatever `zero3_init_flag` says, and under
    ZeRO-3 transformers would then build the towers inside `deepspeed.zero.Init`, where their weight
    initialisation fails on partitioned (empty) tensors."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _model(recipe: PretrainRecipe, tokenizer, lockstep: bool) -> ZidongModel:
    folders = {m: getattr(recipe.model, m).pretrained for m in MODALITIES}
    overrides: dict[str, Any] = {"mask_token_id": tokenizer.mask_token_id}
    if folders["text"] is None:  # a from-scratch text tower takes its vocabulary from the tokenizer
        overrides["text_config"] = {
            **PRESETS[recipe.model.preset]["text_config"],
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
        }
    try:
        model = ZidongModel.from_pretrained_towers(recipe.model.preset, **folders, **overrides)
    except ValueError as err:
        raise UserError(str(err)) from None
    return apply_train_settings(model, recipe, lockstep)


def apply_train_settings(model: torch.nn.Module, recipe: PretrainRecipe, lockstep: bool) -> torch.nn.Module:
    """Activation checkpointing as the recipe says; LayerDrop off in lockstep (it skips random layers,
    differently on each process, and ZeRO/FSDP need the same calls everywhere)."""
    zidong = model.base_model  # a classifier wraps the joint model
    if recipe.train.activation_checkpointing:
        zidong.activation_checkpointing_enable()
    if lockstep:
        for modality, tower in zidong.towers().items():
            if getattr(tower.config, "layerdrop", 0.0):
                logger.info("%s tower: layerdrop %.2f -> 0 (lockstep)", modality, tower.config.layerdrop)
                tower.config.layerdrop = 0.0
                getattr(zidong.config, f"{modality}_config").layerdrop = 0.0
    return model


def train_loader(
    recipe: PretrainRecipe,
    processor: ZidongProcessor,
    rank: int = 0,
    world_size: int = 1,
    saved: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    pin_memory: bool = False,
    pipeline_type: type[SamplePipeline] = SamplePipeline,
) -> StreamLoader:
    """The training stream the recipe describes for one process (`saved`: every process's stream state from the
    checkpoint resumed; `options`: extra `pipeline_type` settings)."""
    data = recipe.data
    pipeline = pipeline_type(
        processor,
        train=True,
        max_text_tokens=data.max_text_tokens,
        max_speech_seconds=data.max_speech_seconds,
        crop_scale=(data.crop_scale_min, 1.0),
        **(options or {}),
    )
    settings = StreamSettings(
        batch_size=recipe.train.batch_size,
        seed=recipe.seed,
        shuffle_window=data.shuffle_window,
        bucket_pool=data.bucket_pool,
        max_bad_fraction=data.max_bad_fraction,
    )
    return StreamLoader(
        [(source.path, source.weight) for source in data.train],
        settings,
        pipeline,
        num_workers=data.num_workers,
        rank=rank,
        world_size=world_size,
        saved=saved,
        pin_memory=pin_memory,
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
