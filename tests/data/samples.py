"""48 samples in every combination of modalities, written as media files; how the source tests build them and
compare the shard folders every source kind gives."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import soundfile
from PIL import Image

from tests.data.fixtures import write_audio, write_image

SAMPLES = 48


def write_samples(folder: Path) -> list[dict]:
    """48 samples cycling through every combination: PNG and JPEG images, WAV and FLAC audio, Chinese and English."""
    rng = np.random.default_rng(0)
    combinations = (("text", "image", "audio"), ("text", "image"), ("text", "audio"), ("image", "audio"))
    samples = []
    for number in range(SAMPLES):
        combination = combinations[number % 4]
        sample: dict = {"id": f"s{number}", "lang": "zh" if number % 3 == 0 else "en", "source": f"batch-{number % 2}"}
        if "text" in combination:
            sample["text"] = f"sample {number} " + ("一个红色的圆" if number % 3 == 0 else "a blue square")
        if "image" in combination:
            size = (int(rng.integers(20, 50)), int(rng.integers(20, 50)))
            sample["image"] = str(write_image(folder / f"{number}.{'png' if number % 2 else 'jpg'}", size, seed=number))
        if "audio" in combination:
            path = folder / f"{number}.{'wav' if number % 2 else 'flac'}"
            sample["audio"] = str(write_audio(path, seconds=float(rng.uniform(0.3, 1.0))))
        samples.append(sample)
    return samples


def as_dataset(samples: list[dict]) -> datasets.Dataset:
    """The samples as `datasets` holds such a corpus: Image() and Audio() columns with the files' bytes inside."""

    def embedded(path: str | None) -> dict | None:
        return None if path is None else {"bytes": Path(path).read_bytes(), "path": Path(path).name}

    stored = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "caption": datasets.Value("string"),
            "jpg": stored,
            "flac": stored,
            "lang": datasets.Value("string"),
            "source": datasets.Value("string"),
        }
    )
    columns = {
        "id": [s["id"] for s in samples],
        "caption": [s.get("text") for s in samples],
        "jpg": [embedded(s.get("image")) for s in samples],
        "flac": [embedded(s.get("audio")) for s in samples],
        "lang": [s["lang"] for s in samples],
        "source": [s["source"] for s in samples],
    }
    # cast, not encoded: `datasets` encodes Audio() values only through torchcodec, which zidong does without
    dataset = datasets.Dataset.from_dict(columns, features=features)
    return dataset.cast_column("jpg", datasets.Image()).cast_column("flac", datasets.Audio())


def read_shards(folder: Path) -> dict[str, dict]:
    """Every sample of a shard folder, decoded: text, pixels, audio, and the id, language and extra fields."""
    found: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, extension = member.name.partition(".")
                content = archive.extractfile(member).read()
                sample = found.setdefault(key, {})
                if extension == "txt":
                    sample["text"] = content.decode()
                elif extension in ("jpg", "png"):
                    sample["image"] = (extension, np.asarray(Image.open(io.BytesIO(content))))
                elif extension == "flac":
                    sample["audio"] = soundfile.read(io.BytesIO(content))[0]
                else:
                    meta = json.loads(content)
                    sample["meta"] = {k: meta.get(k) for k in ("id", "lang", "modalities", "extra", "image_size")}
    return found


def assert_same_samples(expected: dict[str, dict], got: dict[str, dict]) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        want, have = expected[key], got[key]
        assert want.keys() == have.keys(), key
        assert want["meta"] == have["meta"], key
        assert want.get("text") == have.get("text"), key
        if "image" in want:
            assert want["image"][0] == have["image"][0], key
            assert np.array_equal(want["image"][1], have["image"][1]), key
        if "audio" in want:
            assert np.array_equal(want["audio"], have["audio"]), key
