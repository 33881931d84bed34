"""A small built shard folder for stream tests: unique captions, images and audio of varied sizes, every combination."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.data.fixtures import write_audio, write_image, write_manifest
from zidong.data.build import build
from zidong.data.normalize import BuildSettings

WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "circle",
    "square",
    "triangle",
    "left",
    "right",
    "above",
    "below",
    "two",
    "three",
    "near",
    "far",
]
HANZI = list("红蓝绿小大圆方三角左右上下两个近远的在和")
COMBINATIONS = (("text", "vision", "speech"), ("text", "vision"), ("text", "speech"), ("vision", "speech"))
TEXT_COMBINATIONS = COMBINATIONS[:3]


def caption_of(prefix: str, number: int, rng: np.random.Generator) -> str:
    """A caption that starts with `PREFIX item N`, so a test can tell samples apart by text alone."""
    if number % 2:
        words = rng.choice(WORDS, size=int(rng.integers(2, 14)))
        return f"{prefix} item {number} " + " ".join(words)
    return f"{prefix} item {number} " + "".join(rng.choice(HANZI, size=int(rng.integers(2, 20))))


def make_corpus(
    folder: Path,
    samples: int,
    seed: int = 0,
    shard_size: int = 16,
    prefix: str = "s",
    combinations: tuple[tuple[str, ...], ...] = COMBINATIONS,
) -> Path:
    """Write `samples` samples cycling through `combinations` and build them into `folder/shards`."""
    rng = np.random.default_rng(seed)
    lines = []
    for number in range(samples):
        combination = combinations[number % len(combinations)]
        line: dict = {"id": f"{prefix}{number}", "lang": "en" if number % 2 else "zh"}
        line["labels"] = {"parity": "odd" if number % 2 else "even"}  # a class for classification tests
        if "text" in combination:
            line["text"] = caption_of(prefix, number, rng)
        if "vision" in combination:
            size = (int(rng.integers(24, 48)), int(rng.integers(24, 48)))
            line["image"] = str(write_image(folder / "raw" / f"{number}.png", size=size, seed=number))
        if "speech" in combination:
            seconds = float(rng.uniform(0.2, 1.2))
            line["audio"] = str(write_audio(folder / "raw" / f"{number}.wav", seconds=seconds))
        lines.append(line)
    manifest = write_manifest(folder / "manifest.jsonl", lines)
    build(manifest, folder / "shards", BuildSettings(shard_size=shard_size))
    return folder / "shards"
