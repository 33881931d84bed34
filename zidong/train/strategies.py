"""How the model is spread over the processes a launcher started: one `Strategy` per `parallel.strategy` name, in
`STRATEGIES` (`register_strategy` adds one from your own code).

A strategy says which `parallel` keys it reads (the recipe refuses them under any other strategy), what cannot run
under a launch (`check`, before anything is written), whether every process must call the same modules on every
step (`lockstep`: `prepare_for_launcher` in zidong/train/distributed.py tells the model), how it shards the model
before the optimizer sees it (`shard`), how it hands model, optimizer and schedule to Accelerate (`prepare`:
a strategy that shards the model itself returns `ShardedParts`, which checkpoints save with
torch.distributed.checkpoint), and what the start-up log says of it (`describe`).

`auto` is the launcher's choice: DeepSpeed under a DeepSpeed Accelerate config (the launcher owns its settings,
so it is not a recipe name), DDP otherwise; `chosen_strategy` resolves it. This module imports nothing heavy,
because recipes are checked before torch loads; a strategy imports its torch code when it runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from zidong.errors import UserError
from zidong.utils.log import get_logger

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from zidong.train.checkpoint import ShardedParts
    from zidong.train.recipe import ParallelSection, PretrainRecipe

logger = get_logger(__name__)


@dataclass
class Prepared:
    """Model, optimizer and schedule as the strategy prepared them; `sharded`: the parts a strategy that shards
    the model itself checkpoints (None: Accelerate's `save_state` writes the checkpoint)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sharded: ShardedParts | None = None


class Strategy:
    """One way to spread the model over the processes. Subclass it, set `name` (the `parallel.strategy` value) and
    `keys` (the `parallel` keys it reads beyond `strategy` and `collective_timeout_s`), override what differs from
    whole-model data parallelism, and register it."""

    name: ClassVar[str]
    keys: ClassVar[frozenset[str]] = frozenset()
    lockstep: ClassVar[bool] = False  # every process calls every tower and weighted head on every step

    def check(self, recipe: PretrainRecipe, world_size: int) -> None:
        """Raise UserError for settings that cannot run as written on `world_size` processes."""

    def shard(self, model: torch.nn.Module, recipe: PretrainRecipe, accelerator: Accelerator) -> None:
        """Shard `model` in place before the optimizer is built (nothing, for a strategy Accelerate applies)."""

    def prepare(
        self,
        accelerator: Accelerator,
        recipe: PretrainRecipe,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> Prepared:
        """Model, optimizer and schedule through `accelerator.prepare` (DDP on several processes)."""
        return Prepared(*accelerator.prepare(model, optimizer, scheduler))

    def describe(self, accelerator: Accelerator, recipe: PretrainRecipe) -> str:
        """The start-up log's account of how the model is spread over the processes."""
        if accelerator.num_processes > 1:
            return f"DDP over {accelerator.num_processes}"
        return "one process, whole model"


class DataParallel(Strategy):
    """`ddp`: every process holds the whole model; Accelerate wraps it in DDP on several processes."""

    name = "ddp"


class Auto(DataParallel):
    """`auto`: what the launcher set up (`chosen_strategy` resolves it to DeepSpeed or DDP)."""

    name = "auto"


class DeepSpeed(Strategy):
    """DeepSpeed ZeRO as the launcher's Accelerate config sets it (`auto` under a DeepSpeed config). ZeRO reduces
    gradient buckets, and ZeRO-3 gathers parameters, in the order modules run: lockstep."""

    name = "deepspeed"
    lockstep = True

    def prepare(self, accelerator, recipe, model, optimizer, scheduler) -> Prepared:
        """Batch size, accumulation and clipping come from the recipe (zidong prepares no DataLoader from which
        Accelerate could read the batch size), then Accelerate builds the engine."""
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            {
                "train_micro_batch_size_per_gpu": recipe.train.batch_size,
                "train_batch_size": recipe.train.batch_size * recipe.train.grad_accum * accelerator.num_processes,
                "gradient_accumulation_steps": recipe.train.grad_accum,
                "gradient_clipping": recipe.train.max_grad_norm,
            }
        )
        return super().prepare(accelerator, recipe, model, optimizer, scheduler)

    def describe(self, accelerator, recipe) -> str:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return f"DeepSpeed ZeRO-{stage} over {accelerator.num_processes}"


class FullyShard(Strategy):
    """`fsdp`: FSDP2 (`fully_shard`, applied by zidong/train/parallelize.py) over all processes, one shard unit per
    transformer layer of every tower and of the fusion encoder, then the rest. FSDP2 gathers and reduce-scatters
    per layer as modules run: lockstep. Accelerate prepares only the optimizer and schedule (it would wrap the
    model in DDP), and checkpoints go through torch.distributed.checkpoint (`ShardedParts`)."""

    name = "fsdp"
    keys = frozenset({"reshard_after_forward", "param_dtype", "reduce_dtype"})
    lockstep = True

    def group_size(self, settings: ParallelSection, world_size: int) -> int:
        """Processes per shard group."""
        return world_size

    def mesh_shape(self, settings: ParallelSection, world_size: int) -> dict[str, int]:
        """The device mesh's dimensions, outermost first."""
        return {"shard": world_size}

    def check(self, recipe, world_size) -> None:
        if recipe.parallel.param_dtype == "bf16" and recipe.train.mixed_precision != "bf16":
            raise UserError(
                "parallel.param_dtype=bf16 computes the sharded layers in bf16, but train.mixed_precision="
                f"{recipe.train.mixed_precision}: the float32 parts of the model would meet bf16 activations. Set "
                "train.mixed_precision=bf16 too, or parallel.param_dtype=float32"
            )

    def shard(self, model, recipe, accelerator) -> None:
        """FSDP2 as `parallel` says, in place, on the training device."""
        import torch.distributed as dist

        from zidong.train.parallelize import apply_fsdp, describe, device_mesh, ensure_process_group

        ensure_process_group(accelerator.device)
        model.to(accelerator.device)
        mesh = device_mesh(accelerator.device, self.mesh_shape(recipe.parallel, dist.get_world_size()))
        units = apply_fsdp(model, recipe.parallel, mesh)
        logger.info("sharding: %s", describe(recipe.parallel, mesh, units))

    def prepare(self, accelerator, recipe, model, optimizer, scheduler) -> Prepared:
        from zidong.train.checkpoint import ShardedParts

        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return Prepared(model, optimizer, scheduler, ShardedParts(model, optimizer, scheduler))

    def describe(self, accelerator, recipe) -> str:
        processes = accelerator.num_processes
        groups = processes // self.group_size(recipe.parallel, processes)
        return f"FSDP2 ({self.name}) over {processes}, {groups} replica group(s)"


class HybridShard(FullyShard):
    """`hsdp`: FSDP2 within groups of `shard_size` processes (by default the processes of one node,
    LOCAL_WORLD_SIZE, which torchrun sets), replicated across the groups: a 2-D mesh."""

    name = "hsdp"
    keys = FullyShard.keys | {"shard_size"}

    def group_size(self, settings, world_size) -> int:
        return settings.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))

    def mesh_shape(self, settings, world_size) -> dict[str, int]:
        shard_size = self.group_size(settings, world_size)
        return {"replicate": world_size // shard_size, "shard": shard_size}

    def check(self, recipe, world_size) -> None:
        shard_size = self.group_size(recipe.parallel, world_size)
        if world_size % shard_size:
            raise UserError(
                f"parallel.shard_size={shard_size}: HSDP needs the {world_size} processes in whole groups of "
                f"{shard_size}; use a shard size that divides {world_size} (the processes per node, usually)"
            )
        super().check(recipe, world_size)


STRATEGIES: dict[str, Strategy] = {kind.name: kind() for kind in (Auto, DataParallel, FullyShard, HybridShard)}


def register_strategy(strategy: Strategy) -> None:
    """Make `strategy` a `parallel.strategy` value (before the recipe naming it is read)."""
    if strategy.name in STRATEGIES:
        raise ValueError(f"a strategy named {strategy.name!r} is registered already")
    STRATEGIES[strategy.name] = strategy


def strategy_keys() -> dict[str, list[str]]:
    """Each strategy-specific `parallel` key -> the strategies that read it."""
    readers: dict[str, list[str]] = {}
    for name, strategy in STRATEGIES.items():
        for key in sorted(strategy.keys):
            readers.setdefault(key, []).append(name)
    return readers


def chosen_strategy(recipe: PretrainRecipe, world_size: int, deepspeed: bool) -> Strategy:
    """The strategy this launch runs (`deepspeed`: the launcher's Accelerate config chose DeepSpeed), after
    refusing what cannot run as written: FSDP asked of Accelerate, DeepSpeed together with a recipe strategy, and
    the strategy's own checks."""
    name = recipe.parallel.strategy
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise UserError(
            "the launcher asks Accelerate for FSDP (an Accelerate config with `distributed_type: FSDP`, or "
            "ACCELERATE_USE_FSDP=true): zidong shards with FSDP2 itself, on CPU and GPUs alike. Launch without it "
            "(torchrun, or `accelerate launch` with no FSDP config) and set parallel.strategy=fsdp in the recipe "
            "(parallel.strategy=hsdp across nodes)"
        )
    if deepspeed and name != "auto":
        raise UserError(
            f"parallel.strategy={name}, but the launcher's Accelerate config chose DeepSpeed: the two "
            "disagree. Keep the DeepSpeed config and set parallel.strategy=auto, or launch with torchrun and keep "
            f"parallel.strategy={name}"
        )
    strategy = DeepSpeed() if deepspeed else STRATEGIES[name]
    strategy.check(recipe, world_size)
    return strategy


def launched_with_deepspeed() -> bool:
    """Whether the launcher asks Accelerate for DeepSpeed (`accelerate launch` with a DeepSpeed config sets it)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


__all__ = ["STRATEGIES", "Prepared", "Strategy", "chosen_strategy", "register_strategy", "strategy_keys"]
