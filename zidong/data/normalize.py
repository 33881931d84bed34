"""Validate and normalise one manifest sample: decode every file for real, then re-encode it canonically.

    settings = BuildSettings(max_audio_seconds=20)
    sample = normalize_sample(line_number=3, line=raw_bytes, manifest_dir=Path("corpus"), settings=settings)

A sample that cannot be used raises `Rejected(field, reason)`; the builder records it in `rejects.jsonl`.
What is repaired rather than rejected: multi-channel audio (averaged to mono), other sample rates (resampled to
16 kHz), images with alpha or palettes (converted to RGB), oversized images (longest side capped), Unicode forms
(NFC) and runs of whitespace, and, with `text_overflow: truncate`, over-long text.
"""

from __future__ import annotations

import io
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

from zidong.config import InvalidValue
from zidong.data.remote import RemoteError, is_url, join_url, read_url
from zidong.modalities import MODALITIES

SAMPLING_RATE = 16000
MANIFEST_MODALITIES = ("text", "image", "audio")  # manifest keys of text, vision, speech
_WHITESPACE = re.compile(r"\s+")
_TRUNCATED_CHUNK = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


@dataclass(kw_only=True)
class BuildSettings:
    """Limits and formats of `zidong data build`; each is a `key=value` override on the command line."""

    shard_size: int = 1000
    max_image_side: int = 512  # longest side after resizing, in pixels
    max_image_pixels: int = 40_000_000  # larger images are rejected before decoding (decompression bombs)
    min_audio_seconds: float = 0.1
    max_audio_seconds: float = 30.0
    max_text_chars: int = 2000
    text_overflow: Literal["reject", "truncate"] = "reject"
    jpeg_quality: int = 92
    min_modalities: int = 2  # 1 for evaluation sets (an audio classification set has audio and a label only)

    def __post_init__(self) -> None:
        for name in ("shard_size", "max_image_side", "max_image_pixels", "max_text_chars"):
            if getattr(self, name) < 1:
                raise InvalidValue(name, f"must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_audio_seconds < self.max_audio_seconds:
            raise InvalidValue(
                "max_audio_seconds",
                f"must be above min_audio_seconds ({self.min_audio_seconds}), got {self.max_audio_seconds}",
            )
        if not 1 <= self.min_modalities <= 3:
            raise InvalidValue("min_modalities", f"must be 1, 2 or 3, got {self.min_modalities}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InvalidValue("jpeg_quality", f"must lie in 1..100, got {self.jpeg_quality}")


class Rejected(Exception):
    """A sample the builder cannot use: `field` is the manifest key at fault ("line" for the line itself)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass
class Sample:
    """One normalised sample, ready to be written into a shard."""

    id: str
    line: int
    files: dict[str, bytes]  # extension ("txt", "jpg", "png", "flac") -> encoded content
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def combination(self) -> str:
        return "+".join(m for m in MODALITIES if m in self.meta["modalities"])


def parse_line(raw: bytes) -> dict[str, Any]:
    """A manifest line -> its JSON object. Bytes that are not UTF-8 survive as lone surrogates, so the field
    holding them can be named later."""
    try:
        record = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as err:
        raise Rejected("line", f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise Rejected("line", f"expected a JSON object, got {type(record).__name__}")
    return record


def normalize_sample(
    line_number: int, raw: bytes | dict[str, Any], manifest_dir: Path | str, settings: BuildSettings
) -> Sample:
    """Decode and normalise the sample on manifest line `line_number` (1-based; a table's or dataset's record
    number), given as the line's bytes or as a record (zidong/data/sources/); raises `Rejected`."""
    record = parse_line(raw) if isinstance(raw, bytes) else raw
    sample_id = record.get("id")
    if not isinstance(sample_id, str) or not sample_id.strip():
        raise Rejected("id", "missing or empty (every sample needs a string id)")
    _check_utf8("id", sample_id)
    given = [key for key in MANIFEST_MODALITIES if record.get(key) is not None]
    if len(given) < settings.min_modalities:
        needed = {1: "at least one", 2: "at least two", 3: "all three"}[settings.min_modalities]
        raise Rejected(
            "line", f"has {', '.join(given) or 'no modality'}; a sample needs {needed} of text, image, audio"
        )
    files: dict[str, bytes] = {}
    meta: dict[str, Any] = {"id": sample_id, "line": line_number, "modalities": []}
    extra = {key: value for key, value in record.items() if key not in {"id", "lang", *MANIFEST_MODALITIES}}
    if extra:
        meta["extra"] = extra  # other manifest fields (source, licence, ...) travel with the sample
    if record.get("lang") is not None:
        if not isinstance(record["lang"], str):
            raise Rejected("lang", "must be a string such as en or zh")
        meta["lang"] = record["lang"]
    if "text" in given:
        text = normalize_text(record["text"], settings)
        files["txt"] = text.encode("utf-8")
        meta["text_chars"] = len(text)
        meta["modalities"].append("text")
    if "image" in given:
        extension, content, size = normalize_image(_resolve(record["image"], "image", manifest_dir), settings)
        files[extension] = content
        meta["image_size"] = list(size)
        meta["modalities"].append("vision")
    if "audio" in given:
        content, seconds = normalize_audio(_resolve(record["audio"], "audio", manifest_dir), settings)
        files["flac"] = content
        meta["audio_seconds"] = round(seconds, 4)
        meta["modalities"].append("speech")
    return Sample(sample_id, line_number, files, meta)


def _check_utf8(field_name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(field_name, "not valid UTF-8") from None


def _resolve(value: Any, field_name: str, manifest_dir: Path | str) -> Path | Embedded:
    """A file path (relative to the manifest's folder, or absolute), a URL (fetched; a relative path is one when
    the manifest is at a URL), or bytes given in the record itself (a dataset's undecoded `Image()` / `Audio()`
    value: `{"bytes", "path"}`, bytes when it holds them)."""
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        if not value:
            raise Rejected(field_name, "empty bytes")
        return Embedded(bytes(value))
    if not isinstance(value, str) or not value:
        raise Rejected(field_name, "must be a file path (relative to the manifest's folder, or absolute)")
    _check_utf8(field_name, value)
    if is_url(value) or (is_url(manifest_dir) and not Path(value).is_absolute()):
        return _fetched(value if is_url(value) else join_url(str(manifest_dir), value), field_name)
    path = Path(value) if Path(value).is_absolute() else Path(manifest_dir) / value
    if not path.exists():
        raise Rejected(field_name, f"file not found: {path}")
    if path.is_dir():
        raise Rejected(field_name, f"is a folder, not a file: {path}")
    if path.stat().st_size == 0:
        raise Rejected(field_name, f"empty file (0 bytes): {path}")
    return path


def _fetched(url: str, field_name: str) -> Embedded:
    try:
        content = read_url(url)
    except RemoteError as err:
        raise Rejected(field_name, str(err)) from None
    if not content:
        raise Rejected(field_name, f"empty file (0 bytes): {url}")
    return Embedded(content, url)


def clean_text(text: str) -> str:
    """NFC, runs of whitespace to one space, stripped (what every caption in a shard has been through)."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def normalize_text(value: Any, settings: BuildSettings) -> str:
    """NFC, whitespace runs to one space, stripped; rejects empty, non-UTF-8 and (by default) over-long text."""
    if not isinstance(value, str):
        raise Rejected("text", f"must be a string, got {type(value).__name__}")
    _check_utf8("text", value)
    text = clean_text(value)
    if not text:
        raise Rejected("text", "empty or whitespace only")
    if len(text) > settings.max_text_chars:
        if settings.text_overflow == "reject":
            raise Rejected("text", f"{len(text)} characters, over max_text_chars={settings.max_text_chars}")
        text = text[: settings.max_text_chars].rstrip()
    return text


_EXIF_ORIENTATION = 0x0112


class Embedded(bytes):
    """A file's content given in the record (or fetched from the URL `origin`) instead of a local path; error
    messages name it so."""

    def __new__(cls, content: bytes, origin: str | None = None) -> Embedded:
        embedded = super().__new__(cls, content)
        embedded.origin = origin
        return embedded

    def opened(self) -> io.BytesIO:
        return io.BytesIO(self)

    def __str__(self) -> str:
        return self.origin or f"(the {len(self)} bytes in the record)"


def _upright(image: Image.Image) -> bool:
    """No EXIF rotation to apply (an unreadable EXIF block counts as one: the image is then re-encoded)."""
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1) == 1
    except Exception:  # Pillow raises several kinds on a malformed EXIF block
        return False


def _opened(source: Path | Embedded) -> Path | io.BytesIO:
    return source.opened() if isinstance(source, Embedded) else source


def normalize_image(path: Path | Embedded, settings: BuildSettings) -> tuple[str, bytes, tuple[int, int]]:
    """Decode fully, convert to RGB, cap the longest side; PNG stays PNG, everything else becomes JPEG. A JPEG that
    is already RGB, within the size cap and upright is kept byte for byte (re-encoding would lose quality again:
    a shard folder built again from its own shards keeps its pixels)."""
    try:
        with Image.open(_opened(path)) as image:
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise Rejected(
                    "image", f"{width}x{height} pixels, over max_image_pixels={settings.max_image_pixels}: {path}"
                )
            source_format = image.format
            image.load()  # a truncated or corrupt file fails here, not at header parsing
            upright_rgb = image.mode == "RGB" and _upright(image)
            rgb = image.convert("RGB")
    except Rejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise Rejected("image", f"not a decodable image ({_short(err)}): {path}") from None
    longest = max(rgb.size)
    if source_format == "JPEG" and upright_rgb and longest <= settings.max_image_side:
        return "jpg", bytes(path) if isinstance(path, Embedded) else path.read_bytes(), rgb.size
    if longest > settings.max_image_side:
        scale = settings.max_image_side / longest
        rgb = rgb.resize(
            (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.LANCZOS
        )
    buffer = io.BytesIO()
    if source_format == "PNG":
        rgb.save(buffer, format="PNG", optimize=False)
        return "png", buffer.getvalue(), rgb.size
    rgb.save(buffer, format="JPEG", quality=settings.jpeg_quality)
    return "jpg", buffer.getvalue(), rgb.size


def normalize_audio(path: Path | Embedded, settings: BuildSettings) -> tuple[bytes, float]:
    """Decode with soundfile, average channels to mono, resample to 16 kHz, check duration, encode FLAC."""
    try:
        with soundfile.SoundFile(_opened(path)) as audio:
            header = audio.extra_info
            rate = audio.samplerate
            data = audio.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise Rejected("audio", f"not decodable audio ({_short(err)}): {path}") from None
    # libsndfile quietly shortens a cut-off WAV/AIFF to the bytes present; its header report says so
    cut = _TRUNCATED_CHUNK.search(header)
    if cut:
        raise Rejected("audio", f"truncated: the header declares {cut[1]} data bytes, the file holds {cut[2]}: {path}")
    if len(data) == 0:
        raise Rejected("audio", f"no audio frames: {path}")
    if not np.isfinite(data).all():
        raise Rejected("audio", f"holds NaN or infinite samples: {path}")
    mono = data.mean(axis=1)
    seconds = len(mono) / rate
    if not settings.min_audio_seconds <= seconds <= settings.max_audio_seconds:
        raise Rejected(
            "audio",
            f"{seconds:.2f} s long, outside min_audio_seconds={settings.min_audio_seconds} .. "
            f"max_audio_seconds={settings.max_audio_seconds}: {path}",
        )
    if rate != SAMPLING_RATE:
        mono = resample(mono, rate)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(mono, -1.0, 1.0), SAMPLING_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue(), len(mono) / SAMPLING_RATE


def resample(waveform: np.ndarray, rate: int) -> np.ndarray:
    """Band-limited resampling to 16 kHz with torchaudio (imported here: only audio at other rates needs it)."""
    import torch
    import torchaudio.functional

    divisor = math.gcd(rate, SAMPLING_RATE)
    tensor = torch.from_numpy(np.ascontiguousarray(waveform))
    return torchaudio.functional.resample(tensor, rate // divisor, SAMPLING_RATE // divisor).numpy()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]
