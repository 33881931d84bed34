"""The distributed set-up of a training run: the `Accelerator`, the strategy in use, how the model is prepared
for its launcher (lockstep, the contrastive gather), and the few decisions every process must take together.

Launchers (torchrun, `accelerate launch`, SLURM) set the environment; `make_accelerator` turns it into DDP (gloo on
CPU, NCCL on GPUs) or DeepSpeed ZeRO, and refuses a launch that would leave processes training alone or that
disagrees with the recipe's `parallel` section. Each `parallel.strategy` is one `Strategy` (zidong/train/strategies.py);
FSDP2 (`fsdp`, `hsdp`) runs over the same process group, applied by zidong/train/parallelize.py rather than by
Accelerate.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration, gather_object
from transformers.integrations import unset_hf_deepspeed_config

from zidong.errors import UserError
from zidong.train.collectives import ProcessGather
from zidong.train.recipe import PretrainRecipe
from zidong.train.step_cache import StepCache
from zidong.train.strategies import Strategy, chosen_strategy, launched_with_deepspeed
from zidong.utils.log import get_logger

logger = get_logger(__name__)


def make_accelerator(recipe: PretrainRecipe, output_dir: Path) -> Accelerator:
    cpu = not torch.cuda.is_available()
    check_launch(recipe)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # a rank whose batch lacks a modality does not run that tower. Lockstep would run it, but does not let DDP drop
    # this: measured on the tiny recipe under DDP x2 in lockstep without it, the first step's reduction never
    # finished ("parameters that were not used in producing loss"): the heads of objectives weighted 0, the
    # sigmoid loss's bias under softmax, and a speech tower's masked_spec_embed (also with every objective on)
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        timeout = timedelta(seconds=recipe.parallel.collective_timeout_s)
        handlers.append(InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=timeout))
    # no `cpu=` here: it would override a DeepSpeed launch; a CPU box under torchrun needs ACCELERATE_USE_CPU=1
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        # Our schedules count optimizer steps. Linked to the optimizer, Accelerate's scheduler wrapper would step
        # the schedule once per process on every call (it assumes a dataloader whose batch grows with the
        # processes), so warm-up and decay would run N times too fast on N processes.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        log_with=list(recipe.train.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
    )
    if world > 1 and accelerator.distributed_type == DistributedType.NO:
        raise UserError(
            f"{world} processes were launched, but Accelerate set up no distributed training for them on "
            f"{accelerator.device} (each would train alone and overwrite the others' files). On CPU launch with "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m zidong pretrain ...` (DDP, or FSDP2 with "
            "parallel.strategy=fsdp) or DeepSpeed with `accelerate launch --config_file "
            "recipes/accelerate/deepspeed_zero2.yaml ...`"
        )
    return accelerator


def strategy_in_use(accelerator: Accelerator, recipe: PretrainRecipe) -> Strategy:
    """The strategy of the run as Accelerate actually set it up (DeepSpeed where it prepared DeepSpeed)."""
    return chosen_strategy(recipe, accelerator.num_processes, accelerator.state.deepspeed_plugin is not None)


def check_launch(recipe: PretrainRecipe) -> Strategy:
    """Refuse settings this machine or launch cannot train with, before anything is written: a
    `train.mixed_precision` it cannot do (instead of training in float32 unasked), and a `parallel` section the
    launcher disagrees with (`chosen_strategy`). Returns the strategy the launch runs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = chosen_strategy(recipe, world, launched_with_deepspeed())
    settings, cpu = recipe.train, not torch.cuda.is_available()
    if settings.mixed_precision == "fp16" and cpu:
        raise UserError(
            "train.mixed_precision=fp16 needs a GPU: on CPU Accelerate has neither fp16 autocast nor loss scaling "
            "(it would train in float32). Use train.mixed_precision=bf16 (CPU autocast) or no"
        )
    if settings.mixed_precision == "bf16" and not cpu and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"train.mixed_precision=bf16: {torch.cuda.get_device_name()} has no bf16 support; use "
            "train.mixed_precision=fp16 (loss scaling) or no"
        )
    return strategy


def precision_in_use(accelerator: Accelerator) -> str:
    """The start-up log's account of the precision a run trains in."""
    precision = accelerator.mixed_precision
    if precision == "no":
        return "float32 (train.mixed_precision=no)"
    if accelerator.state.deepspeed_plugin is not None:
        return f"{precision} (DeepSpeed: {precision} weights and activations, float32 master weights in the optimizer)"
    scaling = ", dynamic loss scaling" if accelerator.scaler is not None else ""
    return (
        f"{precision} autocast on {accelerator.device.type}{scaling}: weights, gradients, optimizer "
        "state, the audio front end, contrastive logits and losses in float32"
    )


@dataclass(frozen=True)
class Launched:
    """What the launcher asks of every forward: `collective_forward` (parameters are gathered inside the
    forward, so every process makes as many calls, evaluation's idle ones included) and the contrastive loss's
    `gather` of every process's embeddings (None on one process)."""

    collective_forward: bool
    gather: ProcessGather | None
    step_cache: StepCache | None = None  # `train.full_batch_negatives` with accumulation: the model's gather


def prepare_for_launcher(
    model: torch.nn.Module, accelerator: Accelerator, recipe: PretrainRecipe, strategy: Strategy
) -> Launched:
    """Set, once, how the model runs under this launcher (`ZidongPreTrainedModel.prepare_for_launcher`).

    Under DeepSpeed and FSDP2 every process runs every tower and head on every step, in lockstep (placeholders
    where its batch has nothing for them, weighted 0): ZeRO reduces gradient buckets, and ZeRO-3 also gathers
    parameters, in the order modules run (FSDP2 likewise gathers and reduce-scatters per sharded layer), so
    processes whose batches differ in modalities must still make the same calls; LayerDrop, which skips random
    layers differently on each process, is turned off there. DDP instead runs with find_unused_parameters. On
    several processes the contrastive loss gathers every process's embeddings (`ProcessGather`); with
    `train.full_batch_negatives` and accumulation, those of every micro-batch of the step too (`StepCache`)."""
    lockstep = strategy.lockstep
    settings, several = recipe.train, accelerator.num_processes > 1
    gather = ProcessGather(accelerator.device, settings.batch_size) if several else None
    cache = None
    if settings.full_batch_negatives and settings.grad_accum > 1:  # zidong/train/step_cache.py
        step = ProcessGather(accelerator.device, settings.batch_size * settings.grad_accum) if several else None
        cache = StepCache(settings.grad_accum, step)
    zidong = model.base_model  # a classifier wraps the joint model
    zidong.prepare_for_launcher(lockstep=lockstep, gather=cache or gather)
    if lockstep:
        for modality, tower in zidong.towers().items():
            if getattr(tower.config, "layerdrop", 0.0):
                logger.info("%s tower: layerdrop %.2f -> 0 (lockstep)", modality, tower.config.layerdrop)
                tower.config.layerdrop = 0.0
                getattr(zidong.config, f"{modality}_config").layerdrop = 0.0
    return Launched(collective_forward=lockstep, gather=gather, step_cache=cache)


@contextlib.contextmanager
def built_whole(accelerator: Accelerator):
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


def agree(accelerator: Accelerator, loss_finite: bool, stop_requested: bool) -> tuple[bool, bool]:
    """(every process's loss is finite, some process was asked to stop), the same on every process."""
    if accelerator.num_processes == 1:
        return loss_finite, stop_requested
    flags = torch.tensor([float(not loss_finite), float(stop_requested)], device=accelerator.device)
    not_finite, stop = accelerator.reduce(flags, reduction="sum").tolist()  # one read
    return not_finite == 0, stop > 0


def averaged_over_processes(accelerator: Accelerator, losses: dict[str, float]) -> dict[str, float]:
    """Each loss averaged over the processes that have it (collective). `loss` then is what the update minimised
    (gradients are averaged over processes); a per-objective loss that a process's batch had nothing for
    (a pair it lacked) is the mean over the others."""
    if accelerator.num_processes == 1:
        return losses
    every = gather_object([losses])
    names = dict.fromkeys(name for each in every for name in each)
    return {name: statistics.fmean(each[name] for each in every if name in each) for name in names}
