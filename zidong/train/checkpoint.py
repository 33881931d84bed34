"""Atomic training checkpoints: `OUTPUT_DIR/checkpoints/step-00000100/`.

A checkpoint folder holds what `Accelerator.save_state` writes (model, optimizer, scheduler, every process's RNG
states; sharded under DeepSpeed) or, under FSDP2, `sharded_model/` and `sharded_optimizer/` written by
`torch.distributed.checkpoint` (each process writes its own shards; a launch on another number of processes
reshards them as it loads) beside the scheduler and RNG files Accelerate writes, `trainer.json` (step, counters and the number of processes), one
`data-rank{r}.json` per process (its data-stream state) and `data-layout.json` (every process's state in summary,
written by rank 0; zidong/data/saved_stream.py), and what `describe` adds (the trainer: `model/` with the
model's `config.json` and processor files, and `recipe.yaml`, so `zidong export` needs nothing else;
`describe_model` writes them, `model_files`, `read_weights` and `read_recipe` read a checkpoint back).
Everything is written into `step-N.tmp` first; rank 0 renames it to `step-N` once every process has finished, so
a folder named `step-N` is always complete. An interrupted save leaves a `step-N.tmp` folder: resume ignores it,
and the next save of the same step replaces it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state
from safetensors.torch import load_file
from transformers import ProcessorMixin

from zidong.data.saved_stream import RANK_FILE, SavedStreams, layout_entry, write_layout
from zidong.errors import UserError

FOLDER = "checkpoints"
MODEL_FILES = "model"  # config.json + processor files inside a checkpoint
RECIPE_FILE = "recipe.yaml"
SHARDED_MODEL = "sharded_model"  # FSDP2: torch.distributed.checkpoint folders
SHARDED_OPTIMIZER = "sharded_optimizer"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class ShardedParts:
    """An FSDP2 run's model, its (prepared) optimizer and schedule: checkpointed with torch.distributed.checkpoint
    instead of `Accelerator.save_state`, which knows nothing of a model it did not wrap."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    folder = Path(output_dir) / FOLDER
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and _NAME.match(path.name)]
    return sorted(found, key=lambda path: int(_NAME.match(path.name).group(1)))


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    data_state: dict[str, Any],
    keep_last: int,
    describe: Callable[[Path], None] | None = None,
    sharded: ShardedParts | None = None,
) -> Path:
    """Write the checkpoint of `step` (collective: every process calls it) and prune to the last `keep_last`;
    `describe(folder)` runs on rank 0 to add files of its own; `sharded`: an FSDP2 run's parts."""
    final = Path(output_dir) / FOLDER / f"step-{step:08d}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if sharded is None:
        accelerator.save_state(str(partial))
    else:
        _save_sharded(accelerator, partial, sharded)
    (partial / RANK_FILE.format(rank=accelerator.process_index)).write_text(json.dumps(data_state))
    entries = _gather_on_main(accelerator, layout_entry(data_state))
    if accelerator.is_main_process:
        write_layout(partial, entries)
        (partial / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        if describe is not None:
            describe(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _gather_on_main(accelerator: Accelerator, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's `entry`, in rank order, on rank 0 only (the others get an empty list): a gather, not an
    all-gather, so the bytes moved grow with the number of processes, not with its square."""
    if accelerator.num_processes == 1:
        return [entry]
    gathered: list[Any] | None = [None] * accelerator.num_processes if accelerator.is_main_process else None
    torch.distributed.gather_object(entry, gathered, dst=0)
    return gathered or []


def _save_sharded(accelerator: Accelerator, folder: Path, parts: ShardedParts) -> None:
    """Model and optimizer as each process's shards (collective), then what Accelerate writes of the rest: the
    schedule, and every process's RNG states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optimizer = _unwrapped(parts.optimizer)
    dcp.save(get_model_state_dict(parts.model), checkpoint_id=folder / SHARDED_MODEL)
    dcp.save(get_optimizer_state_dict(parts.model, optimizer), checkpoint_id=folder / SHARDED_OPTIMIZER)
    save_accelerator_state(
        str(folder), [], [], [parts.scheduler], [], accelerator.process_index, accelerator.step, accelerator.scaler
    )


def _load_sharded(accelerator: Accelerator, folder: Path, parts: ShardedParts) -> None:
    """Restore what `_save_sharded` wrote, whatever number of processes wrote it (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    optimizer = _unwrapped(parts.optimizer)
    weights = get_model_state_dict(parts.model)
    dcp.load(weights, checkpoint_id=folder / SHARDED_MODEL)
    set_model_state_dict(parts.model, weights)
    state = get_optimizer_state_dict(parts.model, optimizer)  # placeholders of the right shapes, then filled
    dcp.load(state, checkpoint_id=folder / SHARDED_OPTIMIZER)
    set_optimizer_state_dict(parts.model, optimizer, state)
    restored = load_accelerator_state(
        str(folder), [], [], [parts.scheduler], [], accelerator.process_index, accelerator.scaler
    )
    accelerator.step = restored.get("step", accelerator.step)


def _unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper (its state dict is keyed by parameter names)."""
    return getattr(optimizer, "optimizer", optimizer)


def model_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2's `fully_shard` swaps in a subclass of it (`FSDPZidongForClassification`)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def describe_model(model: torch.nn.Module, processor: ProcessorMixin, recipe_yaml: str, folder: Path) -> None:
    """Write into checkpoint `folder` what rebuilds the model without the run: `model/` (its config, naming the
    class `zidong export` rebuilds, and the processor) and `recipe.yaml`."""
    config = model.config
    config.architectures = [model_class(model).__name__]
    config.save_pretrained(folder / MODEL_FILES)
    processor.save_pretrained(folder / MODEL_FILES)
    (folder / RECIPE_FILE).write_text(recipe_yaml)


def model_files(folder: Path) -> Path:
    """The `model/` folder of a checkpoint (config.json and processor files); UserError when it has none."""
    files = folder / MODEL_FILES
    if not (files / "config.json").is_file():
        raise UserError(
            f"{folder} has no {MODEL_FILES}/config.json: it was written by an older zidong that did not store the "
            "model configuration in checkpoints; resume the run for one more checkpoint and export that"
        )
    return files


def read_recipe(folder: Path) -> dict[str, Any] | None:
    """The recipe a checkpoint was trained with (None if it has none)."""
    path = folder / RECIPE_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model's full state dict from a checkpoint folder, whatever wrote it: `model.safetensors` (one
    process, DDP), DeepSpeed's `pytorch_model/` + `latest` (fp32 master weights gathered from every rank's shard
    files), zidong's FSDP2 `sharded_model/` or Accelerate's FSDP `pytorch_model_fsdp_0/` (both
    torch.distributed.checkpoint); on one CPU process."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (folder / SHARDED_MODEL).is_dir():
        return _read_dcp(folder / SHARDED_MODEL)
    if (folder / "pytorch_model").is_dir() and (folder / "latest").is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        return get_fp32_state_dict_from_zero_checkpoint(str(folder))
    if (folder / "pytorch_model_fsdp_0").is_dir():
        return _read_dcp(folder / "pytorch_model_fsdp_0")["model"]
    raise UserError(
        f"{folder} holds no model weights in a layout zidong knows (model.safetensors, DeepSpeed pytorch_model/ + "
        f"latest, FSDP2 {SHARDED_MODEL}/ or Accelerate's FSDP pytorch_model_fsdp_0/); is the checkpoint complete?"
    )


def _read_dcp(folder: Path) -> dict[str, Any]:
    """A torch.distributed.checkpoint folder, whole, in this one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        dcp_to_torch_save(folder, Path(scratch) / "state.pt")
        return torch.load(Path(scratch) / "state.pt", weights_only=True)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """`trainer.json` of checkpoint `folder` (UserError when it is missing or unreadable)."""
    try:
        return json.loads((folder / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{folder} is not a zidong checkpoint (no readable trainer.json: {err})") from None


def load_checkpoint(
    accelerator: Accelerator, folder: Path, sharded: ShardedParts | None = None
) -> tuple[dict[str, Any], SavedStreams]:
    """Restore model, optimizer, scheduler and RNG states from `folder` (`sharded`: an FSDP2 run's parts); returns
    (trainer state, the data-stream states of the processes that wrote the checkpoint, read lazily). A process the
    checkpoint has no RNG state for (it was written by fewer processes) keeps the seeded one."""
    trainer_state = read_trainer_state(folder)
    written_by = trainer_state.get("processes", accelerator.num_processes)
    if accelerator.state.deepspeed_plugin is not None and written_by != accelerator.num_processes:
        raise UserError(
            f"{folder} was written by {written_by} DeepSpeed processes and this launch has "
            f"{accelerator.num_processes}: ZeRO saves the optimizer (and under ZeRO-3 the weights) in one part per "
            f"process. Relaunch with --num_processes {written_by}, or export the checkpoint (`zidong export`) and "
            "start a new run from its towers"
        )
    written_sharded = (folder / SHARDED_MODEL).is_dir()
    if written_sharded != (sharded is not None):
        raise UserError(
            f"{folder} was written {'with' if written_sharded else 'without'} FSDP2 and this run "
            f"{'shards' if sharded is not None else 'does not shard'} the model: a checkpoint resumes under the "
            "parallel.strategy that wrote it (any number of processes for fsdp/hsdp). Set parallel.strategy as "
            "that run had it, or export the checkpoint (`zidong export`) and start a new run from its towers"
        )
    if sharded is None:
        accelerator.load_state(str(folder))
    else:
        _load_sharded(accelerator, folder, sharded)
    return trainer_state, SavedStreams.in_folder(folder)
