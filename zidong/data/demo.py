"""`zidong data demo`: the built-in tri-modal corpus the tiny recipe trains on.

    zidong data demo --out data/demo --samples 2400 --seed 0

Each sample is a rendered scene (one or two groups of coloured shapes: circle, square or triangle; 1-3 of them;
small or large) with a caption describing it in English or Chinese, and that caption spoken by espeak-ng (`en`
or `cmn` voice, speaking rate and pitch varied). The training split mixes full triplets with two-modality samples;
the held-out split (10%) holds triplets only, so every modality pair can be scored on it.

The generator writes plain files and a manifest per split under `DIR/raw/`, then runs the same builder as user
data (`zidong data build`) into `DIR/train/` and `DIR/eval/`: the speech is resampled from espeak's 22.05 kHz
to 16 kHz there. The staging folder is removed afterwards. Same seed and size, same bytes.

Each sample's manifest record carries `labels` for classification: `groups` (1 or 2), and `shape` and `color`
where the whole scene has one (every object that shape, or that colour). A scene of a red circle and a blue
square has neither: its image does not say which group is the "main" one, so no label could be right for it.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

from zidong.data.build import build
from zidong.data.normalize import BuildSettings
from zidong.data.tokenizer import train_tokenizer
from zidong.errors import UserError
from zidong.utils.log import get_logger, progress

DEFAULT_SAMPLES = 2400
# written into DIR/demo.json with the seed and size; a corpus of another version is rebuilt only on request.
# 2: `shape` and `color` labels only where the whole scene has one (1: those of the first group named)
VERSION = 2
TOKENIZER_VOCAB = 500
IMAGE_SIZE = 96
CELL = IMAGE_SIZE // 3
TRAIN_COMBINATIONS = {  # share of the training split
    "text+vision+speech": 0.6,
    "text+vision": 0.15,
    "text+speech": 0.15,
    "vision+speech": 0.1,
}
COLORS = {  # name: (RGB, English, Chinese)
    "red": ((220, 40, 40), "red", "红色"),
    "green": ((40, 170, 60), "green", "绿色"),
    "blue": ((40, 80, 220), "blue", "蓝色"),
    "yellow": ((230, 200, 30), "yellow", "黄色"),
    "purple": ((150, 60, 190), "purple", "紫色"),
}
SHAPES = {"circle": ("circle", "圆形"), "square": ("square", "正方形"), "triangle": ("triangle", "三角形")}
SIZES = {"small": ("small", "小"), "large": ("large", "大")}
NUMBERS_EN = {1: "one", 2: "two", 3: "three"}
NUMBERS_ZH = {1: "一", 2: "两", 3: "三"}
logger = get_logger(__name__)


@dataclass(frozen=True)
class Group:
    color: str
    shape: str
    size: str
    count: int


def caption(groups: list[Group], language: str) -> str:
    """The scene described in English ("en") or Chinese ("zh")."""
    if language == "en":
        parts = []
        for group in groups:
            noun = SHAPES[group.shape][0] + ("s" if group.count > 1 else "")
            parts.append(f"{NUMBERS_EN[group.count]} {SIZES[group.size][0]} {COLORS[group.color][1]} {noun}")
        return " and ".join(parts)
    return "和".join(
        f"{NUMBERS_ZH[g.count]}个{SIZES[g.size][1]}的{COLORS[g.color][2]}{SHAPES[g.shape][1]}" for g in groups
    )


def render(groups: list[Group], rng: np.random.Generator) -> Image.Image:
    """Draw the groups at distinct random cells of a 3x3 grid on a light, slightly varied background."""
    background = tuple(int(v) for v in rng.integers(225, 256, 3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    cells = rng.permutation(9)
    used = 0
    for group in groups:
        for _ in range(group.count):
            row, column = divmod(int(cells[used]), 3)
            used += 1
            radius = (CELL * (0.42 if group.size == "large" else 0.22)) + rng.uniform(-1.5, 1.5)
            jitter = CELL / 2 - radius - 1
            cx = column * CELL + CELL / 2 + rng.uniform(-jitter, jitter)
            cy = row * CELL + CELL / 2 + rng.uniform(-jitter, jitter)
            fill = COLORS[group.color][0]
            if group.shape == "circle":
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
            elif group.shape == "square":
                draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
            else:
                draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def scene_labels(groups: list[Group]) -> dict[str, str | int]:
    """The scene's classification labels: its number of groups, and its shape and colour where all share one."""
    labels: dict[str, str | int] = {"groups": len(groups)}
    for attribute in ("shape", "color"):
        values = {getattr(group, attribute) for group in groups}
        if len(values) == 1:
            labels[attribute] = values.pop()
    return labels


def random_scene(rng: np.random.Generator) -> list[Group]:
    """One or two groups that differ in colour or shape, at most six shapes in all."""
    groups: list[Group] = []
    for _ in range(int(rng.integers(1, 3))):
        while True:
            group = Group(
                color=str(rng.choice(list(COLORS))),
                shape=str(rng.choice(list(SHAPES))),
                size=str(rng.choice(list(SIZES))),
                count=int(rng.integers(1, 4)),
            )
            if all((group.color, group.shape) != (g.color, g.shape) for g in groups):
                break
        groups.append(group)
    return groups


def write_split(
    folder: Path, count: int, combinations: dict[str, float], rng: np.random.Generator, prefix: str
) -> Path:
    """Write `count` samples' files and their manifest into `folder`; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(combinations)
    choices = rng.choice(len(names), size=count, p=[combinations[n] for n in names])
    lines = []
    speech: list[tuple[str, str, str, int, int]] = []
    for number in progress(range(count), desc=f"demo {prefix}"):
        groups = random_scene(rng)
        language = "en" if rng.random() < 0.5 else "zh"
        rate, pitch = int(rng.integers(170, 240)), int(rng.integers(30, 70))
        modalities = names[int(choices[number])].split("+")
        sample_id = f"{prefix}-{number:06d}"
        labels = scene_labels(groups)
        record: dict = {"id": sample_id, "lang": language, "labels": labels}
        text = caption(groups, language)
        scene = render(groups, rng)  # drawn even when unused, so the random stream does not depend on the mix
        if "text" in modalities:
            record["text"] = text
        if "vision" in modalities:
            scene.save(folder / f"{sample_id}.png")
            record["image"] = f"{sample_id}.png"
        if "speech" in modalities:
            speech.append((str(folder / f"{sample_id}.wav"), text, "en" if language == "en" else "cmn", rate, pitch))
            record["audio"] = f"{sample_id}.wav"
        lines.append(json.dumps(record, ensure_ascii=False))
    # espeak-ng carries hidden state from one utterance to the next (even across re-initialisation), so the same
    # sequence of utterances is only reproducible from a fresh process: synthesise the split in one.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
        executor.submit(speak_to_files, speech).result()
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def speak_to_files(requests: list[tuple[str, str, str, int, int]]) -> None:
    """Synthesise (path, text, voice, rate, pitch) requests in order and write each as a 16-bit WAV file."""
    from zidong.data.speech_synthesis import Espeak

    voice = Espeak()
    for path, text, language, rate, pitch in requests:
        waveform, sampling_rate = voice.speak(text, language, rate=rate, pitch=pitch)
        soundfile.write(path, waveform, sampling_rate, subtype="PCM_16")


def _stamp(samples: int, seed: int) -> dict[str, int]:
    return {"seed": seed, "samples": samples, "version": VERSION}


def _recorded(out: Path) -> dict | None:
    """What `out/demo.json` says the folder's corpus was made with; None when there is no such file."""
    stamp = out / "demo.json"
    if not stamp.is_file():
        return None
    try:
        return json.loads(stamp.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{stamp} is not a demo record ({err}); delete the folder to build it anew") from None


def make_demo(out: Path, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> dict[str, dict]:
    """Generate and build the demo corpus into `out/train` and `out/eval`; returns both indexes.

    Raises UserError when `out` already holds a demo corpus of another seed, size or version.
    """
    if samples < 2:
        raise UserError(f"--samples must be at least 2 (one training and one held-out sample), got {samples}")
    recipe, recorded = _stamp(samples, seed), _recorded(out)
    if recorded is not None and recorded != recipe:
        raise UserError(
            f"{out} holds a demo corpus made with {recorded}, not {recipe}; give another folder, or delete that one "
            "to build it anew"
        )
    if recorded is None and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} holds files but no demo.json, so it is not a demo corpus; give a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(recipe) + "\n")
    except OSError as err:
        raise UserError(f"cannot write into {out}: {err.strerror or err}") from None
    logger.info("building the demo corpus (%d samples, seed %d) into %s", samples, seed, out)
    rng = np.random.default_rng(seed)
    held_out = max(1, samples // 10)
    splits = {
        "train": (samples - held_out, TRAIN_COMBINATIONS),
        "eval": (held_out, {"text+vision+speech": 1.0}),
    }
    indexes = {}
    settings = BuildSettings(shard_size=500)
    for split, (count, combinations) in splits.items():
        manifest = write_split(out / "raw" / split, count, combinations, rng, split)
        build(manifest, out / split, settings)
        indexes[split] = json.loads((out / split / "index.json").read_text())
        if indexes[split]["rejected"]:
            raise RuntimeError(f"the demo generator produced {indexes[split]['rejected']} rejected samples ({split})")
    shutil.rmtree(out / "raw")  # the staging files: the shards hold everything, normalised
    # the corpus comes with its tokenizer; the captions are formulaic, so the vocabulary is a bound, not a size
    train_tokenizer([out / "train"], TOKENIZER_VOCAB, out / "tokenizer")
    logger.info("demo corpus in %s: %d training and %d held-out samples", out, splits["train"][0], held_out)
    return indexes


def ensure_demo(out: Path, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> bool:
    """Build the demo corpus into `out` unless a complete one of this seed, size and version is there; True when
    it was built. Raises UserError, as `make_demo`, when `out` holds another one."""
    complete = (out / "tokenizer" / "tokenizer.json").is_file()  # the build's last step
    if complete and _recorded(out) == _stamp(samples, seed):
        return False
    make_demo(out, samples=samples, seed=seed)
    return True
