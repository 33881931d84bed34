"""The recipes: the typed schema of `recipes/pretrain/*.yaml` and, with a `finetune` section, `recipes/finetune/*.yaml`.

Every key a recipe may hold is a field here, with its type, default and allowed values; `zidong.config`
parses YAML and `key=value` overrides into these classes and reports any mismatch before training starts.
See docs/recipes.md for the grammar and a description of every section.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Literal

from zidong.config import InvalidValue
from zidong.modalities import MODALITIES
from zidong.objectives import OBJECTIVE_NAMES
from zidong.train.strategies import STRATEGIES, strategy_keys


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise InvalidValue(field_name, message)


@dataclass
class TowerSection:
    """One modality tower: built from the preset (with `config` keys replacing the preset's tower config keys, or
    the whole tower config when `config` names another `model_type`), or loaded from a local Hugging Face folder;
    its learning rate is `train.learning_rate x lr_multiplier`; `frozen_steps` freezes it (see
    zidong/train/optim.py)."""

    pretrained: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    lr_multiplier: float = 1.0
    frozen_steps: int = 0

    def __post_init__(self) -> None:
        _require(self.lr_multiplier > 0, "lr_multiplier", f"must be greater than 0, got {self.lr_multiplier}")
        _require(
            self.frozen_steps >= -1,
            "frozen_steps",
            f"must be 0 (never frozen), N (frozen for the first N steps) or -1 (the whole run), got {self.frozen_steps}",
        )


@dataclass
class ModelSection:
    """The model: a preset, its tokenizer, top-level `ZidongConfig` fields that replace the preset's (`config`,
    e.g. `projection_dim` or `speech_frame_stack`), and one section per tower."""

    preset: Literal["tiny", "base", "large"] = "tiny"
    tokenizer: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    text: TowerSection = field(default_factory=TowerSection)
    vision: TowerSection = field(default_factory=TowerSection)
    speech: TowerSection = field(default_factory=TowerSection)


@dataclass
class DataSource:
    """A folder of shards written by `zidong data build` / `zidong data demo` (a path, or a URL such as
    `https://host/shards/train` or `s3://bucket/train`), and its share of the mix."""

    path: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.weight > 0, "weight", f"must be greater than 0, got {self.weight}")


@dataclass
class DataSection:
    """Where the samples come from and how the stream reads, augments and batches them (docs/data.md)."""

    train: list[DataSource]
    eval: str | None = None
    demo: str | None = None
    ledger: bool = False
    num_workers: int = 2
    max_text_tokens: int = 64
    max_speech_seconds: float = 15.0
    crop_scale_min: float = 0.9
    shuffle_window: int = 10_000
    bucket_pool: int = 128
    max_bad_fraction: float = 0.01
    cache_dir: str = "~/.cache/zidong/shards"  # where shard folders at URLs are fetched to (per machine)
    cache_gb: float = 20.0  # the most that cache folder holds
    worker_timeout_s: float = 600.0  # no batch from the data workers for this long ends the run, naming the shard
    # fsspec settings per protocol for data at URLs, e.g. {s3: {endpoint_url: "http://minio:9000", key: "$S3_KEY"}}
    # ($NAME: an environment variable, expanded when read); zidong/data/remote.py `configure_storage`
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(len(self.train) > 0, "train", "must list at least one {path, weight} source")
        _require(self.num_workers >= 0, "num_workers", f"must be 0 or more, got {self.num_workers}")
        _require(self.max_text_tokens >= 3, "max_text_tokens", f"must be at least 3, got {self.max_text_tokens}")
        _require(self.max_speech_seconds > 0, "max_speech_seconds", f"must be > 0, got {self.max_speech_seconds}")
        _require(0 < self.crop_scale_min <= 1, "crop_scale_min", f"must be in (0, 1], got {self.crop_scale_min}")
        _require(self.shuffle_window >= 1, "shuffle_window", f"must be at least 1, got {self.shuffle_window}")
        _require(self.bucket_pool >= 0, "bucket_pool", f"must be 0 (no bucketing) or more, got {self.bucket_pool}")
        _require(
            0 <= self.max_bad_fraction < 1,
            "max_bad_fraction",
            f"must be in [0, 1), got {self.max_bad_fraction}",
        )
        _require(self.cache_gb > 0, "cache_gb", f"must be greater than 0, got {self.cache_gb}")
        _require(
            self.worker_timeout_s > 0,
            "worker_timeout_s",
            f"must be greater than 0 (seconds), got {self.worker_timeout_s}",
        )


@dataclass
class TrainSection:
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    full_batch_negatives: bool = False  # the contrastive loss over every micro-batch of a step (GradCache)
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    activation_checkpointing: bool = False
    max_bad_steps: int = 5
    log_every: int = 10
    compile: bool = False
    trackers: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "max_bad_steps", "log_every"):
            value = getattr(self, name)
            _require(value >= 1, name, f"must be at least 1, got {value}")
        _require(self.learning_rate > 0, "learning_rate", f"must be greater than 0, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be 0 or more, got {self.warmup_steps}")
        _require(
            self.peak_tflops is None or self.peak_tflops > 0,
            "peak_tflops",
            f"must be greater than 0 (TFLOP/s per device) or null (measure it), got {self.peak_tflops}",
        )


@dataclass
class ParallelSection:
    """How the model is spread over the processes a launcher started (docs/training.md, "Choosing a strategy").

    `strategy` names a `Strategy` of zidong/train/strategies.py. `auto`: what the launcher set up (DeepSpeed under
    a DeepSpeed Accelerate config, DDP otherwise). `ddp`: every process holds the whole model. `fsdp`: FSDP2
    (`fully_shard`) over all processes, one shard unit per transformer layer of every tower and of the fusion
    encoder, then the rest. `hsdp`: FSDP2 within groups of `shard_size` processes (a node), replicated across the
    groups. `param_dtype` is the dtype a sharded layer is gathered and computed in (bf16 needs
    `train.mixed_precision=bf16`), `reduce_dtype` the dtype its gradients are reduced in.
    `collective_timeout_s`: how long any collective (gradient reduce, gather, the barriers of a checkpoint) waits
    for every process before the run ends with an error, under every strategy: a process that dies or hangs ends
    the job instead of stalling it."""

    strategy: str = "auto"
    shard_size: int | None = None
    reshard_after_forward: bool = True
    param_dtype: Literal["float32", "bf16"] = "float32"
    reduce_dtype: Literal["float32", "bf16"] = "float32"
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _require(
            self.strategy in STRATEGIES,
            "strategy",
            f"must be one of {', '.join(STRATEGIES)} (zidong/train/strategies.py), got {self.strategy!r}",
        )
        _require(
            self.collective_timeout_s > 0,
            "collective_timeout_s",
            f"must be greater than 0 (seconds a collective may wait for every process), got {self.collective_timeout_s}",
        )
        _require(
            self.shard_size is None or self.shard_size >= 1,
            "shard_size",
            f"must be at least 1 (processes per shard group), got {self.shard_size}",
        )
        # a key only some strategies read: set under another strategy it would be ignored, so it is refused
        defaults = {name: field.default for name, field in self.__dataclass_fields__.items()}
        for name, readers in strategy_keys().items():
            _require(
                self.strategy in readers or getattr(self, name) == defaults[name],
                name,
                f"only applies to parallel.strategy={' or '.join(readers)} (got strategy {self.strategy}); remove "
                f"it or choose {'/'.join(readers)}",
            )


@dataclass
class CheckpointSection:
    every_steps: int = 500
    keep_last: int = 3

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "every_steps", f"must be at least 1, got {self.every_steps}")
        _require(self.keep_last >= 1, "keep_last", f"must be at least 1, got {self.keep_last}")


@dataclass
class EvalSection:
    """Held-out retrieval every `every_steps` steps (0: only at the end of training)."""

    every_steps: int = 0

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "every_steps", f"must be 0 or more, got {self.every_steps}")


@dataclass
class ObjectiveSection:
    """One training objective; weight 0 switches it off and skips its compute. With `warmup_steps` the weight
    ramps linearly from weight/warmup_steps at step 1 to `weight` at step `warmup_steps`."""

    weight: float = 1.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _require(self.weight >= 0, "weight", f"must be 0 or more, got {self.weight}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be 0 or more, got {self.warmup_steps}")


# one section per objective, from the registry's names (zidong/objectives.py)
LossSection = make_dataclass(
    "LossSection",
    [(name, ObjectiveSection, field(default_factory=ObjectiveSection)) for name in OBJECTIVE_NAMES],
)
LossSection.__module__ = __name__  # (make_dataclass takes `module=` from Python 3.12 on)


@dataclass(kw_only=True)
class PretrainRecipe:
    """A whole pretraining run. `output_dir` and `data.train` have no defaults: every recipe sets them."""

    output_dir: str
    resume: str = "auto"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    loss: LossSection = field(default_factory=LossSection)

    def __post_init__(self) -> None:
        _require(bool(self.output_dir.strip()), "output_dir", "must name a folder, got an empty string")
        _require(
            bool(self.resume.strip()),
            "resume",
            "must be `auto` (latest checkpoint in output_dir), `never`, or a checkpoint path",
        )


@dataclass
class LoraSection:
    """LoRA adapters (peft) on towers, every other weight of the model frozen (a classifier's head still trains):
    `rank`, `alpha` (the update is scaled by alpha / rank), `dropout` on the adapters' input, the `towers` adapted
    (default: `finetune.modalities`) and, per tower, the `target_modules` (linear layers by name; default: the
    attention's query and value projections, peft's choice for BERT). docs/finetune.md."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    towers: list[Literal["text", "vision", "speech"]] | None = None
    target_modules: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "rank", f"must be at least 1, got {self.rank}")
        _require(self.alpha > 0, "alpha", f"must be greater than 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, "dropout", f"must lie in [0, 1), got {self.dropout}")
        if self.towers is not None and (not self.towers or len(set(self.towers)) != len(self.towers)):
            raise InvalidValue("towers", f"must list distinct modalities, got {self.towers}")
        for modality, names in self.target_modules.items():
            _require(modality in MODALITIES, "target_modules", f"{modality!r} is not a tower: {', '.join(MODALITIES)}")
            _require(bool(names), f"target_modules.{modality}", "must name at least one linear layer")


@dataclass
class FinetuneSection:
    source: str
    modalities: list[Literal["text", "vision", "speech"]] = field(default_factory=lambda: list(MODALITIES))
    labels: str | None = None
    lora: LoraSection | None = None

    def __post_init__(self) -> None:
        if len(set(self.modalities)) != len(self.modalities) or not self.modalities:
            raise InvalidValue("modalities", f"must list distinct modalities, got {self.modalities}")
        if self.lora is None:
            return
        if self.lora.towers is None:
            self.lora.towers = list(self.modalities)
        outside = [m for m in self.lora.towers if m not in self.modalities]
        _require(not outside, "lora.towers", f"{', '.join(outside)} not among finetune.modalities {self.modalities}")
        stray = [m for m in self.lora.target_modules if m not in self.lora.towers]
        _require(not stray, "lora.target_modules", f"{', '.join(stray)}: no adapter on that tower (lora.towers)")


@dataclass(kw_only=True)
class FinetuneRecipe(PretrainRecipe):
    """A pretraining recipe plus the `finetune` section (source, modalities, labels, lora: docs/finetune.md)."""

    finetune: FinetuneSection

    def __post_init__(self) -> None:
        super().__post_init__()
        for modality in self.finetune.lora.towers if self.finetune.lora else ():
            _require(
                getattr(self.model, modality).frozen_steps != -1,
                f"model.{modality}.frozen_steps",
                f"-1 would freeze the LoRA adapter of the {modality} tower too (finetune.lora freezes its base "
                "weights already): leave it 0, or N to hold the adapter still for the first N steps",
            )
