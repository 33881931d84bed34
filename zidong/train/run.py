"""Everything a training run is built from, before its first step: `setup(recipe, task) -> Run`.

The task builds the model (zidong/train/task.py, from the builders in zidong/train/builders.py); `setup` applies
the recipe's training settings to it, then freezes, compiles, shards and prepares it, and builds the optimizer,
data stream, resume point and held-out set. The distributed side (the `Accelerator`, how the model is prepared for
its launcher) is zidong/train/distributed.py; how the model is sharded and prepared, the `Strategy` of
`parallel.strategy` (zidong/train/strategies.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from zidong.config import to_dict, to_yaml
from zidong.data.remote import ShardCache
from zidong.data.stream import StreamLoader, StreamSettings
from zidong.data.transforms import SamplePipeline
from zidong.errors import UserError
from zidong.evaluation.retrieval import HeldOut
from zidong.train.builders import apply_train_settings
from zidong.train.checkpoint import ShardedParts, checkpoints, describe_model, load_checkpoint, read_trainer_state
from zidong.train.distributed import (
    Launched,
    built_whole,
    make_accelerator,
    precision_in_use,
    prepare_for_launcher,
    strategy_in_use,
)
from zidong.train.flops import StepFlops, measured_peak_flops
from zidong.train.metrics import MetricsLog, ThroughputWindow, check_trackers
from zidong.train.optim import build_optimizer, build_scheduler, freeze_for_good, freeze_heads, idle_heads
from zidong.train.parallelize import compile_layers
from zidong.train.recipe import DataSection, PretrainRecipe
from zidong.utils.log import get_logger

if TYPE_CHECKING:
    from zidong.train.task import Task

logger = get_logger(__name__)
LEDGER_FILE = "ledger-rank{rank}.jsonl"


@dataclass
class Counters:
    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0


@dataclass
class Run:
    """Everything the loop works with, built by `setup`."""

    task: Task
    recipe: PretrainRecipe
    accelerator: Accelerator
    output_dir: Path
    model: torch.nn.Module
    launched: Launched  # how the launcher runs the model's forward (collective, the contrastive gather)
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
    idle_heads: list[str]  # heads frozen because their objectives are off (checkpoints record them)
    inner: torch.nn.Module  # the prepared model unwrapped (unwrapping looks up installed packages: once)
    trainable: list[torch.nn.Parameter]  # the prepared model's parameters that train (each step fills, clips them)
    sharded: ShardedParts | None  # under FSDP2: what checkpoints save with torch.distributed.checkpoint


def setup(recipe: PretrainRecipe, task: Task) -> Run:
    """Accelerator, model (from the task), optimizer, data stream, resume point, held-out set, metrics sinks."""
    check_trackers(recipe.train.trackers)
    output_dir = Path(recipe.output_dir)
    accelerator = make_accelerator(recipe, output_dir)
    logger.info(
        "%d process(es), %s on %s", accelerator.num_processes, accelerator.distributed_type.value, accelerator.device
    )
    strategy = strategy_in_use(accelerator, recipe)
    logger.info("strategy: %s", strategy.describe(accelerator, recipe))
    logger.info("precision: %s", precision_in_use(accelerator))
    resume_from = resume_point(recipe, output_dir)
    set_seed(recipe.seed)
    with built_whole(accelerator):
        model, processor = task.build(recipe, accelerator)
    apply_train_settings(model, recipe)
    launched = prepare_for_launcher(model, accelerator, recipe, strategy)
    frozen = freeze_for_good(model, recipe)
    if frozen:
        logger.info("frozen for the whole run: %s tower(s)", ", ".join(frozen))
    idle = heads_to_freeze(recipe, task, resume_from)
    if idle:
        count = freeze_heads(model, idle)
        logger.info("not trained (their objectives are off): %s (%d tensors frozen)", ", ".join(idle), count)
    step_flops = StepFlops(model.base_model)  # a classifier: count the towers of its joint model
    if recipe.train.compile:
        layers, eager = compile_layers(model, accelerator.device)
        logger.info("compiled: %d transformer layers, each on its own (dynamic shapes)", len(layers))
        for name, reason in eager.items():
            logger.warning("train.compile: %s layers stay eager on %s: %s", name, accelerator.device.type, reason)
    strategy.shard(model, recipe, accelerator)  # before the optimizer sees the parameters
    optimizer = build_optimizer(model, recipe)
    prepared = strategy.prepare(accelerator, recipe, model, optimizer, build_scheduler(optimizer, recipe))
    model, optimizer, scheduler, sharded = prepared.model, prepared.optimizer, prepared.scheduler, prepared.sharded
    counters, data_states = Counters(), []
    if resume_from is not None:
        trainer_state, data_states = load_checkpoint(accelerator, resume_from, sharded)
        counters = Counters(**{k: v for k, v in trainer_state.items() if k in Counters.__dataclass_fields__})
        logger.info("resumed from %s (step %d)", resume_from, counters.step)
    options = task.pipeline_options(recipe)
    inner = accelerator.unwrap_model(model)
    return Run(
        task=task,
        recipe=recipe,
        accelerator=accelerator,
        output_dir=output_dir,
        model=model,
        launched=launched,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=train_loader(
            recipe,
            processor,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            saved=data_states,
            options=options,
            pin_memory=accelerator.device.type == "cuda",
        ),
        held_out=held_out(recipe, processor, accelerator, options, launched.collective_forward),
        counters=counters,
        step_flops=step_flops,
        log=MetricsLog(accelerator, output_dir, output_dir.name, to_dict(recipe)),
        window=ThroughputWindow(step_flops.samples_per_speech_frame, peak_flops(recipe, accelerator)),
        ledger=output_dir / LEDGER_FILE.format(rank=accelerator.process_index) if recipe.data.ledger else None,
        describe=functools.partial(describe_model, inner, processor, to_yaml(recipe)),
        sharded=sharded,
        idle_heads=idle,
        inner=inner,
        trainable=[parameter for parameter in model.parameters() if parameter.requires_grad],
    )


# ------------------------------------------------------------------------------------------ builders


def resume_point(recipe: PretrainRecipe, output_dir: Path) -> Path | None:
    """The checkpoint to continue from, as `resume` says (`auto`, `never` or a checkpoint folder)."""
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


def heads_to_freeze(recipe: PretrainRecipe, task: Task, resume_from: Path | None) -> list[str]:
    """The heads this run freezes: those of the objectives it leaves off (`idle_heads`), or, when it resumes, the
    ones its checkpoint froze (they hold no optimizer state there). Switching an objective off mid-run keeps its
    heads trainable (they get zero gradients, as before); switching on one whose heads the checkpoint froze is
    refused (UserError): the optimizer state it needs was never made."""
    idle = idle_heads(recipe, task.objectives)
    if resume_from is None:
        return idle
    # a checkpoint written before heads were frozen has no list: every head trained
    saved = read_trainer_state(resume_from).get("idle_heads", [])
    needed = sorted(set(saved) - set(idle))
    if needed:
        raise UserError(
            f"resume: {resume_from} was trained with {', '.join(needed)} frozen (no objective of its run used them), "
            "and this recipe turns on an objective that trains them, which that checkpoint's optimizer holds no "
            "state for. Keep the loss weights the run started with, or continue from its weights with a new "
            f"optimizer: zidong finetune retrieval RECIPE finetune.source={resume_from} (the recipe's loss section "
            "applies there; docs/training.md#objectives-that-are-off)"
        )
    return sorted(saved)


def train_loader(
    recipe: PretrainRecipe,
    processor,
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
        cache=shard_cache(data),
        worker_timeout_s=data.worker_timeout_s,
    )


def held_out(
    recipe: PretrainRecipe, processor, accelerator: Accelerator, options: dict[str, Any], collective_forward: bool
) -> HeldOut | None:
    """`data.eval` read with evaluation transforms (None without it); `collective_forward` as in `Launched`."""
    if not recipe.data.eval:
        return None
    pipeline = SamplePipeline(
        processor,
        train=False,
        max_text_tokens=recipe.data.max_text_tokens,
        max_speech_seconds=recipe.data.max_speech_seconds,
        **options,
    )
    return HeldOut(
        recipe.data.eval, pipeline, recipe.train.batch_size, accelerator, collective_forward, shard_cache(recipe.data)
    )


def shard_cache(data: DataSection) -> ShardCache:
    """The cache that shard folders at URLs are fetched to (created on first use of a remote folder)."""
    return ShardCache(data.cache_dir, int(data.cache_gb * 1e9))


def peak_flops(recipe: PretrainRecipe, accelerator: Accelerator) -> float:
    """`train.peak_tflops`, or a matmul measured on this device (the MFU denominator)."""
    if recipe.train.peak_tflops:
        return recipe.train.peak_tflops * 1e12
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    peak = measured_peak_flops(accelerator.device, dtype)
    logger.info("matmul peak measured on %s (%s): %.1f TFLOP/s per process", accelerator.device, dtype, peak / 1e12)
    return peak
