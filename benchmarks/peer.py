"""Measurement 11: zidong's training step against open_clip's at equal work, and what the trainer adds to a step.

Both sides train contrastive text–image pairs on random inputs (16 text tokens, fp32, AdamW) in this process, with
the same threads. The zidong side is the real trainer's step (`zidong.train.trainer.optimizer_step` and its
logging every `train.log_every` steps) on a run built by `setup` from the tiny recipe, the loss cut to the
contrastive objective and the speech tower frozen for the run (text–image data feeds it nothing), its batches
handed over in memory instead of from the shard stream. The open_clip side is open_clip's `CLIP` with the same
tower sizes, `ClipLoss` and AdamW as its training script builds them, and the temperature clamp that script
applies after each step. The two sides take turns step by step; a row is the median of the paired steps' ratios,
and its details give their quartiles as the spread.

The third row is the trainer's own cost: its step against the bare model step (forward, loss, backward, the same
fused AdamW over the same parameters) at batch 8, where fixed costs weigh most, with the time of each piece of
host work the trainer adds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import Result, Settings, median, timings
from zidong.config import load_config
from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.train import trainer
from zidong.train.optim import clip_gradients, fill_missing_gradients
from zidong.train.recipe import PretrainRecipe
from zidong.train.run import Run, setup
from zidong.train.task import PretrainTask

TEXT_TOKENS = 16
CONTRASTIVE = {"contrastive": 1.0}


@dataclass(frozen=True)
class Sizes:
    """The towers both sides build: (width, layers, heads) of each, MLP 4 x width."""

    name: str
    text: tuple[int, int, int]
    vision: tuple[int, int, int]
    image_size: int
    patch_size: int
    projection_dim: int


TINY = Sizes("the tiny preset's towers", (128, 2, 2), (128, 2, 2), 64, 8, 128)
VIT_B_32 = Sizes(
    "open_clip's ViT-B-32 vision tower, a BERT-base-sized text tower", (768, 12, 12), (768, 12, 12), 224, 32, 512
)

DIFFERENCES = [
    "text tower: zidong BERT (post-LN, bidirectional, token-type and learned position embeddings, [CLS] pooled); "
    "open_clip causal pre-LN transformer, learned positions, pooled at the argmax token, final LayerNorm",
    "vision tower: zidong HF ViT (pre-LN, [CLS] pooled, final LayerNorm); open_clip ViT (pre-LN, extra LayerNorm "
    "before the blocks, class token pooled)",
    "projections: zidong Linear without bias from each pooled state; open_clip a projection matrix per tower",
    "attention: both through torch's scaled_dot_product_attention (HF sdpa; open_clip nn.MultiheadAttention)",
    "loss: zidong's contrastive objective (logits over every present pair); open_clip ClipLoss",
    "step: zidong clips the gradient norm (train.max_grad_norm 1.0), runs fused AdamW, its schedule, skip "
    "decision and logging; open_clip's script by default does not clip, runs torch AdamW as built (per tensor "
    "on CPU) and clamps the temperature",
    "zidong's model also holds a speech tower, fusion encoder and heads: frozen for the run, so not stepped",
]


class InMemoryStream:
    """Stands in for the run's shard stream: the same collated batch every step (a fresh dict, as the loader's)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch
        self.last_refs: list = []

    def __next__(self) -> dict[str, torch.Tensor]:
        return dict(self.batch)

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}


def tower_overrides(sizes: Sizes) -> list[str]:
    def encoder(tower: str, width: int, layers: int, heads: int) -> list[str]:
        prefix = f"model.{tower}.config"
        return [
            f"{prefix}.hidden_size={width}",
            f"{prefix}.num_hidden_layers={layers}",
            f"{prefix}.num_attention_heads={heads}",
            f"{prefix}.intermediate_size={4 * width}",
        ]

    return [
        *encoder("text", *sizes.text),
        *encoder("vision", *sizes.vision),
        f"model.vision.config.image_size={sizes.image_size}",
        f"model.vision.config.patch_size={sizes.patch_size}",
        f"model.config.projection_dim={sizes.projection_dim}",
    ]


def zidong_recipe(settings: Settings, sizes: Sizes, batch: int, name: str) -> PretrainRecipe:
    corpus = settings.corpus
    overrides = [
        f"output_dir={settings.work / 'peer' / name}",
        "resume=never",
        f"model.tokenizer={corpus / 'tokenizer'}",
        f"data.train.0.path={corpus / 'train'}",
        "data.eval=null",
        "data.demo=null",
        "data.num_workers=0",
        "train.trackers=[]",
        f"train.batch_size={batch}",
        "train.max_steps=1000000",
        "train.warmup_steps=0",
        "checkpoint.every_steps=1000000",
        "model.speech.frozen_steps=-1",
        *(f"loss.{name}.weight=0" for name in ("matching", "masked_text", "masked_vision", "masked_speech")),
        *tower_overrides(sizes),
    ]
    return load_config(PretrainRecipe, settings.recipe, overrides)


def pairs_batch(vocab: int, image_size: int, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`size` text–image pairs as the loader collates them (no speech)."""
    return {
        "input_ids": torch.randint(5, vocab, (size, TEXT_TOKENS), generator=generator),
        "text_attention_mask": torch.ones(size, TEXT_TOKENS, dtype=torch.long),
        "pixel_values": torch.randn(size, 3, image_size, image_size, generator=generator),
        **{f"{m}_present": torch.full((size,), m != "speech") for m in MODALITIES},
    }


@contextmanager
def zidong_run(settings: Settings, sizes: Sizes, batch: int, name: str) -> Iterator[Run]:
    """A run set up by the trainer's own `setup`, its stream replaced by `InMemoryStream`."""
    from accelerate.state import AcceleratorState

    run = setup(zidong_recipe(settings, sizes, batch, name), PretrainTask())
    run.loader.close()
    config = run.accelerator.unwrap_model(run.model).config
    generator = torch.Generator().manual_seed(0)
    run.loader = InMemoryStream(
        pairs_batch(config.text_config.vocab_size, config.vision_config.image_size, batch, generator)
    )
    try:
        yield run
    finally:
        run.accelerator.end_training()
        AcceleratorState._reset_state(True)


def trainer_step(run: Run) -> Callable[[], None]:
    """The trainer's step, and its `train` record every `train.log_every` steps, as `trainer.train` runs them."""

    def step() -> None:
        losses, grad_norm, rates, _ = trainer.optimizer_step(run, stop_requested=False)
        if run.counters.step % run.recipe.train.log_every == 0:
            trainer.log_step(run, losses, grad_norm, rates)

    return step


def model_step(run: Run) -> Callable[[], None]:
    """The bare step of the same model: forward, loss, backward, a fused AdamW like the trainer's over the same
    trainable parameters (its own state, so the run's optimizer is left alone)."""
    model = run.model
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=True
    )
    batch = {k: v.numpy() if k.endswith("_present") else v for k, v in run.loader.batch.items()}

    def step() -> None:
        model(**batch, return_loss=True, loss_weights=CONTRASTIVE).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def open_clip_model(sizes: Sizes, vocab: int, context: int, seed: int = 0) -> torch.nn.Module:
    """open_clip's CLIP with `sizes`' towers over `vocab` token ids and `context` tokens, initialised from `seed`."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    text_width, text_layers, text_heads = sizes.text
    vision_width, vision_layers, vision_heads = sizes.vision
    torch.manual_seed(seed)
    return CLIP(
        embed_dim=sizes.projection_dim,
        vision_cfg=CLIPVisionCfg(
            layers=vision_layers,
            width=vision_width,
            head_width=vision_width // vision_heads,
            patch_size=sizes.patch_size,
            image_size=sizes.image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=context, vocab_size=vocab, width=text_width, heads=text_heads, layers=text_layers
        ),
        output_dict=True,
    )


def open_clip_optimizer(model: torch.nn.Module, learning_rate: float) -> torch.optim.AdamW:
    """AdamW as open_clip's training script builds it: weight decay 0.2 on matrices only (not on norms, biases,
    the temperature), betas 0.9/0.98, eps 1e-6."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
        ],
        lr=learning_rate,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def open_clip_side(sizes: Sizes, vocab: int, batch: int) -> tuple[torch.nn.Module, Callable[[], None], Callable]:
    """open_clip's CLIP with `sizes`, ClipLoss, AdamW as open_clip_train builds it, and the clamp after the step;
    returns (model, step, forward and backward of one batch)."""
    from open_clip.loss import ClipLoss

    model = open_clip_model(sizes, vocab, TEXT_TOKENS).train()
    optimizer = open_clip_optimizer(model, 5e-4)
    loss = ClipLoss()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, sizes.image_size, sizes.image_size, generator=generator)
    texts = torch.randint(5, vocab, (batch, TEXT_TOKENS), generator=generator)

    def forward_backward() -> None:
        out = model(images, texts)
        loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()

    def step() -> None:
        optimizer.zero_grad()
        forward_backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return model, step, forward_backward


def flops_per_sample(forward_backward: Callable[[], Any], batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    return counter.get_total_flops() / batch


def paired(sides: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of `steps` steps of each side, the sides taking turns step by step (so that the machine's drift,
    large on a shared 2-core machine, falls on both alike), after `warmup` untimed steps of each."""
    for step in sides.values():
        timings(step, warmup, 0)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(steps):
        for name, step in sides.items():
            seconds[name].extend(timings(step, 0, 1))
    return seconds


def ratio_row(seconds: dict[str, list[float]], over: str, under: str) -> tuple[float, dict[str, Any]]:
    """The median of the step-by-step ratios `over` / `under`, with their quartiles as the spread."""
    ratios = [a / b for a, b in zip(seconds[over], seconds[under], strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return median(ratios), {
        "ratio_quartiles": [quartiles[0], quartiles[2]],
        "paired_steps": len(ratios),
        f"{over}_seconds_per_step": median(seconds[over]),
        f"{under}_seconds_per_step": median(seconds[under]),
    }


def against_open_clip(settings: Settings, sizes: Sizes, batch: int, target: str) -> Result:
    steps = 4 if settings.quick else (12 if sizes is VIT_B_32 else 150)
    with zidong_run(settings, sizes, batch, f"peer-{sizes.patch_size}-{batch}") as run:
        zidong = run.accelerator.unwrap_model(run.model)
        vocab = zidong.config.text_config.vocab_size
        oc_model, oc_step, oc_forward_backward = open_clip_side(sizes, vocab, batch)
        zidong_batch = {k: v.numpy() if k.endswith("_present") else v for k, v in run.loader.batch.items()}
        zidong_flops = flops_per_sample(
            lambda: zidong(**zidong_batch, return_loss=True, loss_weights=CONTRASTIVE).loss.backward(), batch
        )
        run.optimizer.zero_grad(set_to_none=True)
        open_clip_flops = flops_per_sample(oc_forward_backward, batch)
        oc_model.zero_grad(set_to_none=True)
        blocks = paired({"zidong": trainer_step(run), "open_clip": oc_step}, steps, warmup=2)
        trainable = sum(p.numel() for p in zidong.parameters() if p.requires_grad)
    value, details = ratio_row(blocks, "zidong", "open_clip")
    details.update(
        {
            "towers": sizes.name,
            "batch": f"{batch} pairs, {TEXT_TOKENS} text tokens, {sizes.image_size}px images, fp32",
            "zidong_gflop_per_sample": zidong_flops / 1e9,
            "open_clip_gflop_per_sample": open_clip_flops / 1e9,
            "zidong_trainable_parameters": trainable,
            "open_clip_parameters": sum(p.numel() for p in oc_model.parameters()),
            "differences": DIFFERENCES,
            "threads": torch.get_num_threads(),
        }
    )
    name = f"step time at equal work, zidong / open_clip, {'ViT-B/32' if sizes is VIT_B_32 else 'tiny'}, batch {batch}"
    return Result(11, name, value, target, details)


def host_work(run: Run) -> dict[str, float]:
    """Milliseconds of each piece of host work the trainer adds to a step, timed alone on the run's objects."""
    batch = next(run.loader)
    weights = CONTRASTIVE
    model = run.model
    model(**{k: v.numpy() if k.endswith("_present") else v for k, v in batch.items()}, return_loss=True).loss.backward()
    pieces = {
        "flop_count": lambda: run.step_flops.of_batch(batch, weights),
        "presence_to_host_arrays": lambda: {m: batch[f"{m}_present"].numpy() for m in MODALITIES},
        "fill_missing_gradients": lambda: fill_missing_gradients(run.trainable),
        "clip_gradients": lambda: clip_gradients(run.accelerator, run.trainable, run.recipe.train.max_grad_norm, False),
        "optimizer_step": run.optimizer.step,
        "scheduler_step": run.scheduler.step,
        "log_record_amortised": lambda: trainer.log_step(run, {"loss": 1.0}, 1.0, {"learning_rate": 1e-4}),
    }
    times = {name: 1e3 * statistics.median(timings(work, 3, 20)) for name, work in pieces.items()}
    times["log_record_amortised"] /= run.recipe.train.log_every
    run.optimizer.zero_grad(set_to_none=True)
    return times


def trainer_fixed_cost(settings: Settings, batch: int = 8) -> Result:
    steps = 4 if settings.quick else 300
    with zidong_run(settings, TINY, batch, f"fixed-{batch}") as run:
        blocks = paired({"trainer": trainer_step(run), "model": model_step(run)}, steps, warmup=3)
        pieces = host_work(run)
        tensors = sum(1 for p in run.model.parameters() if p.requires_grad)
    value, details = ratio_row(blocks, "trainer", "model")
    details.update(
        {
            "towers": TINY.name,
            "batch": f"{batch} pairs, {TEXT_TOKENS} text tokens, {TINY.image_size}px images, fp32",
            "trainable_tensors": tensors,
            "host_work_ms": pieces,
            "trainer_adds_ms": 1e3 * (details["trainer_seconds_per_step"] - details["model_seconds_per_step"]),
            "threads": torch.get_num_threads(),
        }
    )
    return Result(11, f"the trainer's step / the bare model step, tiny, batch {batch}", value, "<= 1.10", details)


def peer(settings: Settings) -> list[Result]:
    """Measurement 11's rows (the ViT-B/32 row in the full run only: minutes on 2 CPU cores)."""
    started = time.perf_counter()
    rows = [trainer_fixed_cost(settings), against_open_clip(settings, TINY, 32, "<= 0.90")]
    if not settings.quick:
        rows.append(against_open_clip(settings, VIT_B_32, 32, "<= 1.00"))
    for row in rows:
        row.details["measured_in_s"] = time.perf_counter() - started
    return rows
