"""Read a trained model back from wherever training left it, on one CPU process.

`find_checkpoint(path)` accepts a run's output folder (its latest checkpoint), a checkpoint folder
(`OUTPUT_DIR/checkpoints/step-N`), or an exported Hugging Face folder. `load_trained(path)` returns the model
(eval mode, fp32), its processor and, for checkpoints, the recipe that trained it.

Weights come from whichever layout the launch wrote (`read_weights` in zidong/train/checkpoint.py, the owner of
the checkpoint layout):
- `model.safetensors`: one process or DDP (`Accelerator.save_state`);
- `pytorch_model/` + `latest`: DeepSpeed ZeRO-1/2/3; the fp32 master weights are gathered from every rank's
  shard files with DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`, no cluster needed;
- `pytorch_model_fsdp_0/`: FSDP sharded state (torch.distributed.checkpoint), read with `dcp_to_torch_save`.
Anything else, a `.tmp` folder left by an interrupted save, or weights that do not fit the checkpoint's config
is a `UserError` naming the folder and what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

from zidong.errors import UserError
from zidong.models.zidong import ZidongForClassification, ZidongModel, ZidongPreTrainedModel
from zidong.models.zidong.configuration_zidong import ZidongConfig
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.train.checkpoint import MODEL_FILES, checkpoints, model_files, read_recipe, read_weights

_STEP = re.compile(r"^step-\d{8}$")


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint or export folder `path` names (a run folder: its latest checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder (give a run's output_dir, a checkpoint folder or an export folder)")
    if path.name.endswith(".tmp") and _STEP.match(path.name.removesuffix(".tmp")):
        raise UserError(
            f"{path} is an unfinished checkpoint (its save was interrupted); use a complete step-N folder beside it"
        )
    if (path / "trainer.json").is_file() or _is_export(path):
        return path
    found = checkpoints(path)
    if found:
        return found[-1]
    raise UserError(
        f"{path} is neither a run folder with checkpoints, nor a checkpoint (no trainer.json), nor an exported "
        "model (no config.json of model_type zidong)"
    )


def load_trained(path: str | Path) -> tuple[ZidongPreTrainedModel, ZidongProcessor, dict | None, Path]:
    """(model in eval mode, processor, recipe as a dict or None, the folder it came from). The model is a
    `ZidongModel`, or a `ZidongForClassification` when a classify fine-tuning wrote the checkpoint."""
    folder = find_checkpoint(path)
    if _is_export(folder):
        model = _model_class(ZidongConfig.from_pretrained(folder)).from_pretrained(folder).eval()
        return model, ZidongProcessor.from_pretrained(folder), None, folder
    files = model_files(folder)
    config = ZidongConfig.from_pretrained(files)
    model = _model_class(config)(config)
    _load_weights(model, folder)
    return model.eval(), ZidongProcessor.from_pretrained(files), read_recipe(folder), folder


def _load_weights(model: ZidongPreTrainedModel, folder: Path) -> None:
    weights = read_weights(folder)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    obsolete = [re.compile(pattern) for pattern in model._keys_to_ignore_on_load_unexpected or []]
    weights = {name: tensor for name, tensor in weights.items() if not any(p.search(name) for p in obsolete)}
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = sorted(n for n in set(expected) & set(weights) if expected[n].shape != weights[n].shape)
    if missing or unexpected or wrong_shape:
        details = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong_shape)):
            if names:
                details.append(f"{len(names)} {label} (e.g. {', '.join(names[:3])})")
        raise UserError(
            f"the weights in {folder} do not fit its {MODEL_FILES}/config.json: " + "; ".join(details) + ". "
            "Was the folder assembled from different runs?"
        )
    model.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in weights.items()})


def _model_class(config: ZidongConfig) -> type[ZidongPreTrainedModel]:
    classes = {cls.__name__: cls for cls in (ZidongModel, ZidongForClassification)}
    return classes.get((config.architectures or ["ZidongModel"])[0], ZidongModel)


def _is_export(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return ZidongConfig.get_config_dict(folder)[0].get("model_type") == ZidongConfig.model_type
    except (OSError, ValueError):
        return False
