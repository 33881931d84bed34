"""Measurements 1-4: step time against the naive baseline, base-width MFU, padding, loader headroom.

The zidong side is the real trainer (`pretrain`) on the tiny recipe and the demo corpus, logging every step
(`seconds_per_step`, `data_wait_fraction`); the objectives are cut to the contrastive loss so both sides train
the same thing. The naive side (`benchmarks.baseline`) trains the same towers on the same corpus with a plain
loop. Loader passes iterate the recipe's stream alone, with its workers, bucketed and not.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.baseline import NaivePipeline, NaiveTriModal
from benchmarks.common import Result, Settings, median, synthetic_batch, timings
from zidong.config import load_config
from zidong.data.batching import PaddingMeter, long_tail_lengths, padding_efficiency
from zidong.models.zidong.configuration_zidong import ZidongConfig
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.train.checkpoint import MODEL_FILES, checkpoints
from zidong.train.flops import StepFlops, measured_peak_flops
from zidong.train.metrics import METRICS_FILE
from zidong.train.recipe import DataSection, PretrainRecipe
from zidong.train.run import train_loader
from zidong.train.trainer import pretrain

CONTRASTIVE_ONLY = ("loss.matching.weight=0", "loss.masked_text.weight=0")
BASE_LOSS_WEIGHTS = {"contrastive": 1.0, "matching": 0.25, "masked_text": 0.25}  # recipes/pretrain/base.yaml


@dataclass
class LoaderPass:
    """Batches drawn from a stream alone: its rate after the first few, padding, and some speech batches."""

    samples_per_s: float
    padding: PaddingMeter
    speech_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


STREAM_BUCKET_POOL = DataSection.bucket_pool  # the stream's own default, which measurements 3-5 judge


class TrainingBench:
    """Runs (once each, on first use) what measurements 1-5 share: the two training runs and the loader passes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        corpus = settings.corpus
        self.overrides = [
            f"model.tokenizer={corpus / 'tokenizer'}",
            f"data.train.0.path={corpus / 'train'}",
            "data.eval=null",
            "data.demo=null",
            "train.trackers=[]",
            "train.log_every=1",
        ]

    def recipe(self, *overrides: str) -> PretrainRecipe:
        return load_config(PretrainRecipe, self.settings.recipe, [*self.overrides, *overrides])

    @functools.cached_property
    def processor(self) -> ZidongProcessor:
        config = ZidongConfig.from_pretrained(self.zidong_run["model"])
        return ZidongProcessor.for_model(config, self.settings.corpus / "tokenizer")

    @functools.cached_property
    def zidong_run(self) -> dict[str, Any]:
        """The trainer on the tiny recipe, contrastive only: per-step seconds and data-wait after warm-up."""
        steps = self.settings.warmup_steps + self.settings.timed_steps
        output = self.settings.work / "zidong-run"
        recipe = self.recipe(
            f"output_dir={output}", f"train.max_steps={steps}", f"checkpoint.every_steps={steps}", *CONTRASTIVE_ONLY
        )
        pretrain(recipe)
        records = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
        timed = [r for r in records if r.get("kind") == "train"][self.settings.warmup_steps :]
        seconds = [r["seconds_per_step"] for r in timed]
        waited = sum(r["data_wait_fraction"] * r["seconds_per_step"] for r in timed)
        return {
            "seconds_per_step": seconds,
            "data_wait_fraction": waited / sum(seconds),
            "mfu": median([r["mfu"] for r in timed]),
            "model": checkpoints(output)[-1] / MODEL_FILES,
            "batch_size": recipe.train.batch_size,
        }

    @functools.cached_property
    def naive_run(self) -> dict[str, Any]:
        """The baseline on the same recipe: stock eager towers, kaldi.fbank in the loader, no bucketing."""
        recipe = self.recipe("data.bucket_pool=0")
        torch.manual_seed(recipe.seed)
        config = ZidongConfig.from_pretrained(self.zidong_run["model"])
        model = NaiveTriModal(config).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.train.learning_rate, weight_decay=recipe.train.weight_decay
        )
        front_end = {"num_mel_bins": config.num_mel_bins, "frame_stack": config.speech_frame_stack}
        loader = train_loader(recipe, self.processor, options=front_end, pipeline_type=NaivePipeline)
        padding = PaddingMeter()

        def step() -> None:
            batch = next(loader)
            padding.add(batch)
            model(batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = timings(step, self.settings.warmup_steps, self.settings.timed_steps)
        loader.close()
        return {"seconds_per_step": seconds, "padding": padding.efficiency()}

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one bench object per run)
    def loader_pass(self, bucketed: bool) -> LoaderPass:
        """Draw batches from the recipe's stream alone (its workers, nothing training beside it), bucketed by length
        with the stream's default pool (the tiny recipe itself draws at random: `data.bucket_pool: 0`) or not."""
        recipe = self.recipe(f"data.bucket_pool={STREAM_BUCKET_POOL if bucketed else 0}")
        loader = train_loader(recipe, self.processor)
        batches = 10 if self.settings.quick else 2 * 2160 // recipe.train.batch_size  # two epochs of the demo
        skipped = 3  # worker start-up
        padding = PaddingMeter()
        speech: list[tuple[torch.Tensor, torch.Tensor]] = []
        started, samples = time.perf_counter(), 0
        for index in range(batches):
            if index == skipped:
                started, samples = time.perf_counter(), 0
            batch = next(loader)
            samples += len(batch["text_present"])
            padding.add(batch)
            if "input_values" in batch and len(speech) < 8:
                speech.append((batch["input_values"], batch["speech_attention_mask"]))
        rate = samples / (time.perf_counter() - started)
        loader.close()
        return LoaderPass(rate, padding, speech)


def step_time(bench: TrainingBench) -> Result:
    zidong, naive = bench.zidong_run, bench.naive_run
    ratio = median(zidong["seconds_per_step"]) / median(naive["seconds_per_step"])
    details = {
        "zidong_seconds_per_step": median(zidong["seconds_per_step"]),
        "naive_seconds_per_step": median(naive["seconds_per_step"]),
        "batch_size": zidong["batch_size"],
        "recipe": "recipes/pretrain/tiny.yaml, contrastive only",
    }
    return Result(1, "step time, zidong / naive stock towers", ratio, "<= 0.80", details)


def base_mfu(settings: Settings, device: torch.device) -> Result:
    """A `base`-width training step with the base recipe's objectives on a synthetic batch of triplets: fp32 on
    CPU (4 samples), bf16 autocast on CUDA (32 samples), against the matmul peak in that precision measured here."""
    gpu = device.type == "cuda"
    preset, size = ("tiny" if settings.quick else "base"), (32 if gpu else 4)
    dtype = torch.bfloat16 if gpu else torch.float32
    config = ZidongConfig.from_preset(preset, text={"vocab_size": 8000}, mask_token_id=4)
    torch.manual_seed(0)
    model = ZidongModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    generator = torch.Generator().manual_seed(0)
    batch = synthetic_batch(config, size, text_tokens=32, speech_seconds=4.0, generator=generator)
    # as the trainer hands it over: presence stays on the host
    batch = {key: value.numpy() if key.endswith("_present") else value.to(device) for key, value in batch.items()}
    flops = StepFlops(model).of_batch(batch, BASE_LOSS_WEIGHTS)
    peak = max(measured_peak_flops(device, dtype, side) for side in ((8192,) if gpu else (2048, 4096)))

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=gpu):
            loss = model(**batch, return_loss=True, loss_weights=BASE_LOSS_WEIGHTS).loss
        loss.backward()

    def step() -> None:
        forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize(device)

    with FlopCounterMode(display=False) as counter:  # a cross-check of the 6 x parameters x tokens count
        forward_backward()
    optimizer.zero_grad(set_to_none=True)
    seconds = median(timings(step, 2 if gpu else 1, 10 if gpu else (2 if settings.quick else 4)))
    details = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch": f"{size} triplets: 32 text tokens, {config.vision_config.image_size}px image, 4 s speech",
        "model_tflop_per_step": flops / 1e12,
        "flop_counter_tflop_per_step": counter.get_total_flops() / 1e12,
        "mfu_by_flop_counter": counter.get_total_flops() / seconds / peak,
        "seconds_per_step": seconds,
        "peak_tflops": peak / 1e12,
        "threads": torch.get_num_threads(),
    }
    name = f"{'GPU bf16' if gpu else 'CPU fp32'} MFU of a {preset}-width step"
    return Result(2, name, flops / seconds / peak, ">= 0.35", details)


def padding(bench: TrainingBench) -> list[Result]:
    """Bucketed efficiency per corpus and modality (worst of them), and naive ÷ bucketed padding fractions."""
    corpora = {
        "demo": {
            "naive": bench.loader_pass(bucketed=False).padding.efficiency(),
            "bucketed": bench.loader_pass(bucketed=True).padding.efficiency(),
        },
        "long_tail": padding_efficiency(long_tail_lengths(32 * 128 * (1 if bench.settings.quick else 6)), 32),
    }
    worst_efficiency = min(eff for corpus in corpora.values() for eff in corpus["bucketed"].values())
    reductions = {
        f"{name}/{modality}": (1 - corpus["naive"][modality]) / max(1 - corpus["bucketed"][modality], 1e-9)
        for name, corpus in corpora.items()
        for modality in corpus["bucketed"]
    }
    return [
        Result(3, "padding efficiency, bucketed (worst corpus x modality)", worst_efficiency, ">= 0.90", corpora),
        Result(3, "padding fraction, naive / bucketed (worst)", min(reductions.values()), ">= 2.5", reductions),
    ]


def loader_headroom(bench: TrainingBench) -> list[Result]:
    rate = bench.loader_pass(bucketed=True).samples_per_s
    zidong = bench.zidong_run
    consumed = zidong["batch_size"] / median(zidong["seconds_per_step"])
    details = {
        "loader_samples_per_s": rate,
        "training_samples_per_s": consumed,
        "workers": bench.recipe().data.num_workers,
    }
    return [
        Result(4, "loader headroom, loader / training samples/s", rate / consumed, ">= 1.5", details),
        Result(4, "data-wait fraction of a real run", zidong["data_wait_fraction"], "<= 0.05", {"mfu": zidong["mfu"]}),
    ]
