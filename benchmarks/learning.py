"""Measurement 12: what the main job learns against open_clip trained on the same pairs with the same budget.

The peer is open_clip's `CLIP` with the tiny preset's tower sizes, trained on the demo corpus's text+image training
pairs: `ClipLoss`, AdamW as open_clip's training script builds it (betas 0.9/0.98, eps 1e-6, weight decay 0.2 on
matrices only, no clipping), the temperature clamp after each step, and the main job's schedule (its learning rate,
warm-up and cosine over its steps), with as many image pairs a step as the main job's batches hold on average.
Its embeddings of the held-out split go through the retrieval code `zidong eval` uses (`recall_at_k`), so both
sides are scored by one metric. The zidong side is the main job itself: trained here in two seeds
(`zidong pretrain recipes/pretrain/tiny.yaml`), or read from run folders given with `--main-job`.

Rows: zidong's mean dup@1 minus the peer's mean for text->vision and vision->text (details: strict R@1, each
seed, wall time and samples seen on both sides), and the main job's own levels on the pairs the peer lacks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Result, Settings
from benchmarks.peer import TINY, open_clip_model, open_clip_optimizer
from zidong.config import load_config
from zidong.data.shards import ShardFolder
from zidong.data.transforms import SamplePipeline
from zidong.evaluation.retrieval import folder_captions, recall_at_k, sample_refs
from zidong.models.zidong.processing_zidong import ZidongProcessor
from zidong.train.builders import load_tokenizer, model_config
from zidong.train.recipe import PretrainRecipe
from zidong.utils.run_info import git_state

PAIRS = ("text", "vision")
CONTEXT = 48  # caption tokens the peer reads, its end token included (the demo's longest caption is under 40)
PEER_SEEDS = (0, 1, 2)
MAIN_JOB_SEEDS = (0, 1)
QUICK_STEPS, QUICK_WARMUP = 6, 2  # both sides' steps in the quick run
DIFFERENCES = [
    "data: the peer trains on the text+image pairs only (1,616 of the 2,160 training samples); zidong on every "
    "sample, two or three modalities each, every present pair scored",
    "pairs per step: the peer takes round(batch x text+image share) pairs a step (24 of 32), the number of "
    "text+image pairs a zidong batch holds on average",
    "augmentation: none for the peer (the centre square, as evaluation reads it); zidong's training crop takes "
    "90-100 % of the area at aspect 3:4 to 4:3 (data.crop_scale_min)",
    "text: the peer reads the demo tokenizer's pieces without its [CLS]/[SEP] and an end token appended (a new "
    "id, the largest, which open_clip's argmax pooling picks), causal attention; zidong reads them with "
    "[CLS]/[SEP], bidirectional, pooled as its text tower pools",
    "towers: open_clip's own transformer and ViT (pre-LN, LayerNorm before the ViT blocks, its own init); zidong's "
    "HF BERT and ViT from the preset, plus a speech tower the peer does not have",
    "loss: ClipLoss on one pair, one temperature; zidong's contrastive objective, the mean over every pair present",
    "optimizer: as open_clip's script builds it; zidong's as the recipe says (both AdamW 0.9/0.98, eps 1e-6; "
    "zidong's clipping and weight decay are the recipe's)",
    "the same learning rate, warm-up, cosine schedule and number of steps on both sides; images normalised by "
    "the same processor",
]


@dataclass
class Pairs:
    """Text+image pairs decoded once: token ids (n, CONTEXT), pixel values (n, 3, H, W), captions, and the size of
    the peer's vocabulary (the tokenizer's and the end token)."""

    tokens: torch.Tensor
    pixels: torch.Tensor
    captions: list[str]
    vocab: int


def read_pairs(folder: Path, processor: ZidongProcessor) -> Pairs:
    """Every sample of a shard folder with text and image, decoded as evaluation reads it (centre square)."""
    pipeline = SamplePipeline(processor, train=False, modalities=PAIRS)
    shards = ShardFolder(folder)
    captions, images = [], []
    for shard, position in sample_refs(shards):
        sample = pipeline.decode(shards.read(shard, position), np.random.default_rng(0))
        if sample.text is not None and sample.image is not None:
            captions.append(sample.text)
            images.append(sample.image)
    shards.close()
    vocab = len(processor.tokenizer)
    tokens = torch.zeros(len(captions), CONTEXT, dtype=torch.long)
    for row, caption in enumerate(captions):
        pieces = processor.tokenizer(caption, add_special_tokens=False)["input_ids"][: CONTEXT - 1]
        tokens[row, : len(pieces) + 1] = torch.tensor([*pieces, vocab])  # the end token: the largest id
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return Pairs(tokens, pixels, captions, vocab + 1)


def cosine_with_warmup(step: int, base: float, warmup: int, total: int) -> float:
    """open_clip's `cosine_lr`: linear warm-up over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base


def train_peer(train: Pairs, recipe: PretrainRecipe, pairs_per_step: int, seed: int) -> torch.nn.Module:
    """open_clip's CLIP trained as open_clip's script trains it, on `train`'s pairs in seeded random order."""
    from open_clip.loss import ClipLoss

    model = open_clip_model(TINY, train.vocab, CONTEXT, seed).train()
    optimizer = open_clip_optimizer(model, recipe.train.learning_rate)
    loss = ClipLoss()
    order = np.random.default_rng(seed)
    queue: list[int] = []
    for step in range(recipe.train.max_steps):
        while len(queue) < pairs_per_step:  # epochs of a fresh permutation each, cut into batches
            queue.extend(order.permutation(len(train.captions)).tolist())
        rows, queue = queue[:pairs_per_step], queue[pairs_per_step:]
        rate = cosine_with_warmup(step, recipe.train.learning_rate, recipe.train.warmup_steps, recipe.train.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = rate
        out = model(train.pixels[rows], train.tokens[rows])
        optimizer.zero_grad()
        loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return model.eval()


@torch.no_grad()
def peer_metrics(model: torch.nn.Module, held_out: Pairs) -> dict[str, float]:
    """The retrieval metrics of `zidong eval` on the peer's embeddings of the held-out pairs."""
    texts = torch.cat([model.encode_text(block, normalize=True) for block in held_out.tokens.split(64)])
    images = torch.cat([model.encode_image(block, normalize=True) for block in held_out.pixels.split(64)])
    count = len(held_out.captions)
    presence = {m: torch.full((count,), m in PAIRS) for m in ("text", "vision", "speech")}
    embeds = {"text": texts, "vision": images, "speech": torch.zeros_like(texts)}
    return recall_at_k(embeds, presence, held_out.captions)


def main_job_recipe(settings: Settings, output: Path, seed: int) -> list[str]:
    """Overrides of the tiny recipe that point the main job at the measurement's corpus and scratch folder."""
    corpus = settings.corpus
    overrides = [
        f"output_dir={output}",
        f"seed={seed}",
        "resume=never",
        "train.trackers=[]",
        f"model.tokenizer={corpus / 'tokenizer'}",
        f"data.train.0.path={corpus / 'train'}",
        f"data.eval={corpus / 'eval'}",
        "data.demo=null",
    ]
    if settings.quick:
        overrides += [f"train.max_steps={QUICK_STEPS}", f"train.warmup_steps={QUICK_WARMUP}"]
        overrides += [f"checkpoint.every_steps={QUICK_STEPS}", f"eval.every_steps={QUICK_STEPS}"]
    return overrides


def train_main_job(settings: Settings, seed: int) -> Path:
    """The main job (`zidong pretrain` on the tiny recipe) in a process of its own; returns its run folder."""
    output = settings.work / "learning" / f"main-job-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "zidong",
        "pretrain",
        str(settings.recipe),
        *main_job_recipe(settings, output, seed),
    ]
    subprocess.run(command, check=True, env={**os.environ, "ZIDONG_PROGRESS": "0"})
    return output


def final_evaluation(run: Path) -> dict[str, Any]:
    """The last held-out evaluation record of a run folder; ValueError (naming the folder) where it has none."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file() or not (run / "launches.jsonl").is_file() or not (run / "config.yaml").is_file():
        raise ValueError(f"{run}: not a run folder (no metrics.jsonl, launches.jsonl and config.yaml there)")
    evaluations = [r for r in read_jsonl(metrics) if r.get("kind") == "eval"]
    if not evaluations:
        raise ValueError(f"{metrics} holds no held-out evaluation: give a finished main-job run")
    return evaluations[-1]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main_job_result(run: Path) -> dict[str, Any]:
    """The final held-out metrics of a main-job run folder, its seed, steps, samples, wall time and commit."""
    last = final_evaluation(run)
    launches = read_jsonl(run / "launches.jsonl")
    recipe = load_config(PretrainRecipe, run / "config.yaml")
    started = datetime.fromisoformat(launches[0]["time"]).timestamp()
    return {
        "run": str(run),
        "seed": recipe.seed,
        "steps": last["step"],
        "samples_seen": last["step"] * recipe.train.batch_size,
        "wall_s": (run / "metrics.jsonl").stat().st_mtime - started,
        "launches": len(launches),
        "git": launches[-1].get("git"),
        "metrics": {k: v for k, v in last.items() if "/" in k},
    }


def text_vision_share(folder: Path) -> float:
    """The share of a shard folder's samples that hold both text and image."""
    counts = json.loads((folder / "index.json").read_text())["combinations"]
    total = sum(counts.values())
    return sum(n for combo, n in counts.items() if set(PAIRS) <= set(combo.split("+"))) / max(1, total)


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def learning(settings: Settings) -> list[Result]:
    """Measurement 12's rows (the quick run: a few steps each side, one seed each, to check that it runs); the
    zidong side is `settings.main_job_runs` where given."""
    recipe = load_config(PretrainRecipe, settings.recipe, [f"model.tokenizer={settings.corpus / 'tokenizer'}"])
    if settings.quick:
        recipe.train.max_steps, recipe.train.warmup_steps = QUICK_STEPS, QUICK_WARMUP
    tokenizer = load_tokenizer(recipe)
    processor = ZidongProcessor.for_model(model_config(recipe, tokenizer), tokenizer)
    train, held_out = (read_pairs(settings.corpus / split, processor) for split in ("train", "eval"))
    if folder_captions(settings.corpus / "eval") != held_out.captions:  # zidong scores every held-out sample
        raise RuntimeError(f"{settings.corpus / 'eval'} holds samples without text or image: the sides would differ")
    share = text_vision_share(settings.corpus / "train")
    pairs_per_step = round(recipe.train.batch_size * share)

    peer_runs = []
    for seed in PEER_SEEDS[: 1 if settings.quick else None]:
        started = time.perf_counter()
        model = train_peer(train, recipe, pairs_per_step, seed)
        peer_runs.append(
            {
                "seed": seed,
                "wall_s": time.perf_counter() - started,
                "samples_seen": recipe.train.max_steps * pairs_per_step,
                "metrics": peer_metrics(model, held_out),
            }
        )
    runs = list(settings.main_job_runs) or [
        train_main_job(settings, seed) for seed in MAIN_JOB_SEEDS[: 1 if settings.quick else None]
    ]
    zidong_runs = [main_job_result(run) for run in runs]

    def both(metric: str) -> tuple[float, float]:
        return mean([r["metrics"][metric] for r in zidong_runs]), mean([r["metrics"][metric] for r in peer_runs])

    details = {
        "peer": f"open_clip {version('open_clip_torch')}",
        "peer_runs": peer_runs,
        "zidong_runs": zidong_runs,
        "steps": recipe.train.max_steps,
        "peer_pairs_per_step": pairs_per_step,
        "text_vision_share_of_training_samples": share,
        "training_pairs": len(train.captions),
        "held_out_samples": len(held_out.captions),
        "differences": DIFFERENCES,
        "threads": torch.get_num_threads(),
        "commit": git_state(),
    }
    rows = []
    for pair in ("text->vision", "vision->text"):
        zidong, peer = both(f"{pair}/dup_R@1")
        strict_zidong, strict_peer = both(f"{pair}/R@1")
        rows.append(
            Result(
                12,
                f"{pair} dup@1, main job (mean of {len(zidong_runs)}) - open_clip (mean of {len(peer_runs)})",
                zidong - peer,
                ">= 0.10",
                {
                    **details,
                    "zidong": zidong,
                    "open_clip": peer,
                    "strict_zidong": strict_zidong,
                    "strict_open_clip": strict_peer,
                },
            )
        )
    for pair, target in (
        ("speech->vision", ">= 0.55"),
        ("vision->speech", ">= 0.55"),
        ("speech->text", ">= 0.93"),
        ("text->speech", ">= 0.93"),
    ):
        value = mean([r["metrics"][f"{pair}/dup_R@1"] for r in zidong_runs])
        rows.append(
            Result(
                12,
                f"{pair} dup@1, main job (mean of {len(zidong_runs)}; the peer has no speech)",
                value,
                target,
                {"each_seed": [r["metrics"][f"{pair}/dup_R@1"] for r in zidong_runs]},
            )
        )
    return rows
