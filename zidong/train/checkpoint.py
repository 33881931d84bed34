"""Atomic training checkpoints: `OUTPUT_DIR/checkpoints/step-00000100/`.

A checkpoint folder holds what `Accelerator.save_state` writes (model, optimizer, scheduler, every process's RNG
states; sharded under DeepSpeed/FSDP), `trainer.json` (step, counters and the number of processes), one
`data-rank{r}.json` per process (its data-stream state), and what `describe` adds (the trainer: `model/` with the
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
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import ProcessorMixin

from zidong.errors import UserError

FOLDER = "checkpoints"
MODEL_FILES = "model"  # config.json + processor files inside a checkpoint
RECIPE_FILE = "recipe.yaml"
DATA_FILE = "data-rank{rank}.json"  # one per process: its data-stream state
_NAME = re.compile(r"^step-(\d{8})$")
_DATA_FILE = re.compile(r"^data-rank(\d+)\.json$")


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
) -> Path:
    """Write the checkpoint of `step` (collective: every process calls it) and prune to the last `keep_last`;
    `describe(folder)` runs on rank 0 to add files of its own."""
    final = Path(output_dir) / FOLDER / f"step-{step:08d}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    (partial / DATA_FILE.format(rank=accelerator.process_index)).write_text(json.dumps(data_state))
    if accelerator.is_main_process:
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


def describe_model(model: torch.nn.Module, processor: ProcessorMixin, recipe_yaml: str, folder: Path) -> None:
    """Write into checkpoint `folder` what rebuilds the model without the run: `model/` (its config, naming the
    class `zidong export` rebuilds, and the processor) and `recipe.yaml`."""
    config = model.config
    config.architectures = [type(model).__name__]
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
    files), or FSDP's `pytorch_model_fsdp_0/` (torch.distributed.checkpoint); on one CPU process."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model").is_dir() and (folder / "latest").is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        return get_fp32_state_dict_from_zero_checkpoint(str(folder))
    if (folder / "pytorch_model_fsdp_0").is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as scratch:
            dcp_to_torch_save(folder / "pytorch_model_fsdp_0", Path(scratch) / "model.pt")
            return torch.load(Path(scratch) / "model.pt", weights_only=True)["model"]
    raise UserError(
        f"{folder} holds no model weights in a layout zidong knows (model.safetensors, DeepSpeed pytorch_model/ + "
        "latest, or FSDP pytorch_model_fsdp_0/); is the checkpoint complete?"
    )


def load_checkpoint(accelerator: Accelerator, folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore model, optimizer, scheduler and RNG states from `folder`; returns (trainer state, the data-stream
    state of every process that wrote the checkpoint, in rank order). A process the checkpoint has no RNG state
    for (it was written by fewer processes) keeps the seeded one."""
    try:
        trainer_state = json.loads((folder / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{folder} is not a zidong checkpoint (no readable trainer.json: {err})") from None
    written_by = trainer_state.get("processes", accelerator.num_processes)
    if accelerator.state.deepspeed_plugin is not None and written_by != accelerator.num_processes:
        raise UserError(
            f"{folder} was written by {written_by} DeepSpeed processes and this launch has "
            f"{accelerator.num_processes}: ZeRO saves the optimizer (and under ZeRO-3 the weights) in one part per "
            f"process. Relaunch with --num_processes {written_by}, or export the checkpoint (`zidong export`) and "
            "start a new run from its towers"
        )
    accelerator.load_state(str(folder))
    ranks = sorted(int(match.group(1)) for path in folder.iterdir() if (match := _DATA_FILE.match(path.name)))
    return trainer_state, [json.loads((folder / DATA_FILE.format(rank=rank)).read_text()) for rank in ranks]
