"""Small media files generated in the test's folder: good ones, and every kind of broken input the builder meets."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image


def write_image(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return path


def write_audio(
    path: Path, seconds: float = 0.5, rate: int = 16000, channels: int = 1, file_format: str | None = None
) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 220 * t)
    data = np.stack([wave * (c + 1) / channels for c in range(channels)], axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, data, rate, format=file_format)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep)])
    return path


def write_manifest(path: Path, lines: list[dict | str | bytes]) -> Path:
    """One line per entry: a dict is dumped as JSON, a str/bytes is written as is (to make broken lines)."""
    chunks = []
    for line in lines:
        if isinstance(line, dict):
            chunks.append(json.dumps(line, ensure_ascii=False).encode())
        else:
            chunks.append(line if isinstance(line, bytes) else line.encode())
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_members(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: content} over every shard of a built folder."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return samples
