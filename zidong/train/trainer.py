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
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from transformers import AutoTokenizer, get_cosine_schedule_with_warmup
from transformers.integrations import unset_hf_deepspeed_config

from zidong.data.stream import StreamLoader, StreamSettings
from zidong.data.transforms import SamplePipeline
from zidong.errors import UserError
from zidong.models.zidong.configuration_zidong import MODALITIES, PRESETS
from zidong.models.zidong.modeling_zidong import OBJECTIVES, ZidongModel
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.train.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from zidong.train.evaluate import RECALL_AT, retrieval
from zidong.train.recipe import PretrainRecipe
from zidong.utils.log import get_logger, progress

logger = get_logger(__name__)
METRICS_FILE = "metrics.jsonl"
LEDGER_FILE = "ledger-rank{rank}.jsonl"


class TrainingError(UserError):
    """The run cannot go on (too many non-finite steps): the message says what happened and what to try."""


@dataclass
class Counters:
    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0


def pretrain(recipe: PretrainRecipe) -> dict[str, float]:
    """Train as the recipe says; returns the last retrieval metrics (empty without `data.eval`)."""
    accelerator = _accelerator(recipe)
    logger.info(
        "%d process(es), %s on %s", accelerator.num_processes, accelerator.distributed_type.value, accelerator.device
    )
    output_dir = Path(recipe.output_dir)
    resume_from = _resume_point(recipe, output_dir)
    set_seed(recipe.seed)
    _ensure_demo_corpus(recipe, accelerator)
    tokenizer = _tokenizer(recipe)
    with _built_whole(accelerator):
        model = _model(recipe, tokenizer, _lockstep(accelerator))
    processor = ZidongProcessor.for_model(model.config, tokenizer, recipe.model.vision.pretrained)
    optimizer = _optimizer(model, recipe, accelerator)
    scheduler = get_cosine_schedule_with_warmup(optimizer, recipe.train.warmup_steps, recipe.train.max_steps)
    _configure_deepspeed(accelerator, recipe)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    counters, data_state = Counters(), None
    if resume_from is not None:
        trainer_state, data_state = load_checkpoint(accelerator, resume_from)
        counters = Counters(**{k: v for k, v in trainer_state.items() if k in Counters.__dataclass_fields__})
        logger.info("resumed from %s (step %d)", resume_from, counters.step)
    loader = _train_loader(recipe, processor, accelerator, data_state)
    eval_pipeline = SamplePipeline(
        processor,
        train=False,
        max_text_tokens=recipe.data.max_text_tokens,
        max_speech_seconds=recipe.data.max_speech_seconds,
    )
    weights = {name: getattr(recipe.loss, name).weight for name in OBJECTIVES}
    stop = _PreemptionFlag()
    ledger = output_dir / LEDGER_FILE.format(rank=accelerator.process_index) if recipe.data.ledger else None
    metrics: dict[str, float] = {}
    bar = progress(total=recipe.train.max_steps, initial=counters.step, desc="pretrain")
    window = _Window()
    stopping = False
    while counters.step < recipe.train.max_steps and not stopping:
        model.train()
        losses, samples = _train_step(model, loader, weights, recipe, accelerator, window, ledger, counters.step + 1)
        # under DeepSpeed the engine has clipped and stepped already; this returns its global norm
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm))
        # every process must take the same decisions: skip the update, and stop after this step
        loss_finite, stopping = _agree(accelerator, math.isfinite(losses["loss"]), stop.requested)
        finite = bool(torch.isfinite(grad_norm)) and loss_finite
        if finite:
            optimizer.step()
            counters.bad_steps_in_a_row = 0
        else:
            counters.skipped_steps += 1
            counters.bad_steps_in_a_row += 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        counters.step += 1
        counters.samples += samples
        bar.update(1)
        if counters.bad_steps_in_a_row >= recipe.train.max_bad_steps:
            raise TrainingError(
                f"{counters.bad_steps_in_a_row} steps in a row had a non-finite loss or gradient (step "
                f"{counters.step}); nothing was checkpointed from them. Lower train.learning_rate, raise "
                "train.warmup_steps, or resume from an earlier checkpoint with resume=PATH"
            )
        if counters.step % recipe.train.log_every == 0 or counters.step == recipe.train.max_steps:
            record = window.summary(losses, grad_norm, scheduler.get_last_lr()[0], counters)
            bar.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{record['samples_per_s']:.0f}")
            _append_metrics(accelerator, output_dir, {"kind": "train", **record})
        done = counters.step == recipe.train.max_steps
        if recipe.data.eval and (done or (recipe.eval.every_steps and counters.step % recipe.eval.every_steps == 0)):
            metrics = retrieval(
                model, recipe.data.eval, eval_pipeline, recipe.train.batch_size, accelerator, _lockstep(accelerator)
            )
            _append_metrics(accelerator, output_dir, {"kind": "eval", "step": counters.step, **metrics})
        checkpoint_due = done or stopping or counters.step % recipe.checkpoint.every_steps == 0
        if checkpoint_due and counters.bad_steps_in_a_row == 0:  # never checkpoint a state that just went non-finite
            save_checkpoint(
                accelerator,
                output_dir,
                counters.step,
                dict(counters.__dict__),
                loader.state_dict(),
                recipe.checkpoint.keep_last,
            )
    bar.close()
    loader.close()
    if stopping:
        logger.info(
            "stopped by %s at step %d after saving a checkpoint; relaunch to continue",
            stop.signal_name or "a signal to another process",
            counters.step,
        )
    elif metrics:
        logger.info("held-out retrieval after %d steps:\n%s", counters.step, retrieval_table(metrics))
    accelerator.end_training()
    return metrics


def _agree(accelerator: Accelerator, loss_finite: bool, stop_requested: bool) -> tuple[bool, bool]:
    """(every process's loss is finite, some process was asked to stop), the same on every process."""
    if accelerator.num_processes == 1:
        return loss_finite, stop_requested
    flags = torch.tensor([float(not loss_finite), float(stop_requested)], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    return bool(flags[0] == 0), bool(flags[1] > 0)


def _train_step(model, loader, weights, recipe, accelerator, window, ledger, step) -> tuple[dict[str, float], int]:
    """Forward/backward over `grad_accum` micro-batches; returns the losses averaged over them and the samples."""
    totals: dict[str, float] = {}
    samples = 0
    for _ in range(recipe.train.grad_accum):
        started = time.perf_counter()
        batch = next(loader)
        window.waited += time.perf_counter() - started
        if ledger is not None:
            with ledger.open("a") as stream:
                stream.write(json.dumps({"step": step, "samples": loader.last_refs}) + "\n")
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
        window.count(batch)
        samples += len(batch["text_present"])
        with accelerator.accumulate(model), accelerator.autocast():
            output = model(**batch, return_loss=True, loss_weights=weights, lockstep=_lockstep(accelerator))
            accelerator.backward(output.loss)
        for name, value in {"loss": output.loss, **output.losses}.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach()) / recipe.train.grad_accum
    return totals, samples


def _lockstep(accelerator: Accelerator) -> bool:
    """Under DeepSpeed every process runs every tower and head on every step (placeholders where its batch has
    nothing for them, weighted 0): ZeRO reduces gradient buckets, and ZeRO-3 also gathers parameters, in the order
    modules run, so processes whose batches differ in modalities must still make the same calls. DDP instead
    runs with find_unused_parameters."""
    return accelerator.state.deepspeed_plugin is not None


class _Window:
    """Throughput and data-wait accounting between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.samples = 0
        self.tokens = dict.fromkeys(MODALITIES, 0)
        self.waited = 0.0

    def count(self, batch: dict[str, torch.Tensor]) -> None:
        self.samples += len(batch["text_present"])
        if "text_attention_mask" in batch:
            self.tokens["text"] += int(batch["text_attention_mask"].sum())
        if "speech_attention_mask" in batch:
            self.tokens["speech"] += int(batch["speech_attention_mask"].sum()) // 160  # 10 ms frames
        if "pixel_values" in batch:
            self.tokens["vision"] += int(batch["pixel_values"].shape[0])  # images

    def summary(self, losses, grad_norm, learning_rate, counters: Counters) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {
            "step": counters.step,
            **{name: round(value, 5) for name, value in losses.items()},
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm),
            "samples_per_s": self.samples / elapsed,
            "text_tokens_per_s": self.tokens["text"] / elapsed,
            "speech_frames_per_s": self.tokens["speech"] / elapsed,
            "images_per_s": self.tokens["vision"] / elapsed,
            "data_wait_fraction": self.waited / elapsed,
            "skipped_steps": counters.skipped_steps,
        }
        if torch.cuda.is_available():
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.reset()
        return record


def retrieval_table(metrics: dict[str, float]) -> str:
    """The retrieval metrics as a fixed-width table, with the chance level of each k."""
    pairs = sorted({key.split("/")[0] for key in metrics if "/R@" in key})
    count = int(metrics.get("samples", 0))
    lines = [f"{'pair':<16}" + "".join(f"{'R@' + str(k):>8}" for k in RECALL_AT)]
    for pair in pairs:
        lines.append(f"{pair:<16}" + "".join(f"{metrics[f'{pair}/R@{k}']:>8.3f}" for k in RECALL_AT))
    if count:
        lines.append(f"{'chance':<16}" + "".join(f"{min(1.0, k / count):>8.3f}" for k in RECALL_AT))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ set-up


def _accelerator(recipe: PretrainRecipe) -> Accelerator:
    cpu = not torch.cuda.is_available()
    # a rank whose batch lacks a modality does not run that tower
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo" if cpu else "nccl"))
    # no `cpu=` here: it would override a DeepSpeed launch; a CPU box under torchrun needs ACCELERATE_USE_CPU=1
    return Accelerator(
        mixed_precision=recipe.train.mixed_precision if not cpu else "no",
        gradient_accumulation_steps=recipe.train.grad_accum,
        kwargs_handlers=handlers,
    )


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
    if recipe.train.activation_checkpointing:
        model.activation_checkpointing_enable()
    if lockstep:  # LayerDrop skips random layers, differently on each process: ZeRO needs the same calls
        for modality, tower in model.towers().items():
            if getattr(tower.config, "layerdrop", 0.0):
                logger.info("%s tower: layerdrop %.2f -> 0 under DeepSpeed", modality, tower.config.layerdrop)
                tower.config.layerdrop = 0.0
                getattr(model.config, f"{modality}_config").layerdrop = 0.0
    return model


def _optimizer(model: torch.nn.Module, recipe: PretrainRecipe, accelerator: Accelerator) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms, biases and scalars (the temperature) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = accelerator.device.type == "cuda"
    return torch.optim.AdamW(groups, lr=recipe.train.learning_rate, betas=(0.9, 0.98), eps=1e-6, fused=fused)


def _train_loader(recipe, processor, accelerator, state) -> StreamLoader:
    data = recipe.data
    pipeline = SamplePipeline(
        processor,
        train=True,
        max_text_tokens=data.max_text_tokens,
        max_speech_seconds=data.max_speech_seconds,
        crop_scale=(data.crop_scale_min, 1.0),
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
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        state=state,
        pin_memory=accelerator.device.type == "cuda",
    )


def _append_metrics(accelerator: Accelerator, output_dir: Path, record: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        with (output_dir / METRICS_FILE).open("a") as stream:
            stream.write(json.dumps(record) + "\n")


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
