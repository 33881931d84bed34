"""A Hugging Face dataset: a `save_to_disk` folder, files `datasets.load_dataset` reads (Parquet, Arrow, JSON,
CSV), a folder it loads (`imagefolder`, `audiofolder`), or a hub dataset streamed (`hf://datasets/ORG/NAME[@REV]`).

Image and audio columns are read undecoded (`Image(decode=False)`, `Audio(decode=False)`): zidong decodes their
bytes or paths itself, without torchcodec or FFmpeg. A ClassLabel column's integers become their class names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zidong.data.remote import is_url
from zidong.data.sources.base import OpenOptions, Source, map_columns, resolve, suffix_of
from zidong.errors import UserError

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_HUB_DATASET = re.compile(r"hf://datasets/([^/@]+/[^/@]+?)(?:@([^/]+))?/?")  # a hub dataset id (optional @revision)


def is_hub_dataset(location: str | Path) -> bool:
    """Does `location` name a Hugging Face hub dataset (`hf://datasets/ORG/NAME[@REVISION]`)?"""
    return bool(_HUB_DATASET.fullmatch(str(location)))


class HfDatasetSource(Source):
    """Rows of a `datasets.Dataset` (or of a stream, read in order: `_Stream`)."""

    kind = "hf"
    streams = True

    @classmethod
    def detects(cls, location: str) -> bool:
        """A hub dataset, a local folder, or a file whose suffix a `datasets` builder reads (`.jsonl` is a
        manifest, `.csv` a table: those kinds are asked first)."""
        if is_hub_dataset(location):
            return True
        if not is_url(location) and Path(location).is_dir():
            return True
        return suffix_of(location) in FILE_BUILDERS

    @classmethod
    def open(cls, location: str, options: OpenOptions) -> Source:
        import datasets

        streaming = options.streaming or is_hub_dataset(location)
        dataset = _load_dataset(location, options.split, streaming)
        mapping = map_columns(location, list(dataset.column_names), options.columns, need_two=not options.single)
        _check_kinds(location, dataset.features, mapping)
        for name in ("image", "audio"):  # decoded by zidong from their bytes or paths (no torchcodec, no FFmpeg)
            column = mapping.get(name)
            feature = dataset.features.get(column) if column else None
            if isinstance(feature, datasets.Image | datasets.Audio):
                dataset = dataset.cast_column(column, type(feature)(decode=False))
        # a stream has no fingerprint of its content: a resumed build trusts the location and revision
        content = f"stream:{location}" if streaming else dataset._fingerprint
        digest = hashlib.sha256(f"{content}:{options.split}:{json.dumps(mapping, sort_keys=True)}".encode())
        names = {c: list(f.names) for c, f in dataset.features.items() if isinstance(f, datasets.ClassLabel)}
        # paths in a hub dataset's columns are relative to the dataset's root
        resolved, base = (location, location.rstrip("/")) if is_hub_dataset(location) else resolve(location)
        rows = _Stream(dataset, location) if streaming else dataset
        return cls(resolved, base, digest.hexdigest(), mapping, rows, class_names=names)

    def column(self, name: str) -> Iterator[Any]:
        return iter(self._rows[name])

    def record(self, row: dict[str, Any], number: int) -> dict[str, Any]:
        if self.class_names:  # a ClassLabel's integer as its class name
            names = self.class_names
            row = {c: names[c][v] if c in names and isinstance(v, int) else v for c, v in row.items()}
        return super().record(row, number)


def _load_dataset(location: str, split: str | None, streaming: bool = False):
    import datasets

    remote = is_url(location)
    path = Path(location.split("?")[0] if remote else location)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    saved = remote or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    hub = _HUB_DATASET.fullmatch(location)
    try:
        if hub:
            loaded = datasets.load_dataset(hub.group(1), revision=hub.group(2), split=split, streaming=True)
        elif builder is not None:
            loaded = datasets.load_dataset(builder, data_files=location, streaming=streaming)
        elif saved:  # a `save_to_disk` folder (the only folder kind a URL can name)
            loaded = datasets.load_from_disk(location)
        else:
            with _audio_stored_without_torchcodec():  # an `audiofolder` layout stores its files' paths
                loaded = datasets.load_dataset(location, streaming=streaming)
        if streaming and isinstance(loaded, datasets.Dataset | datasets.DatasetDict):  # a save_to_disk folder
            loaded = loaded.to_iterable_dataset() if isinstance(loaded, datasets.Dataset) else loaded
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise UserError(f"{location}: `datasets` cannot load this ({str(err).splitlines()[0][:200]})") from None
    except datasets.exceptions.DatasetGenerationError as err:  # the reason is the error it wraps
        reason = str(err.__cause__ or err).splitlines()[0][:200]
        raise UserError(f"{location}: `datasets` cannot load this ({reason})") from None
    if isinstance(loaded, datasets.DatasetDict | datasets.IterableDatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise UserError(f"{location} holds the splits {', '.join(loaded)}; choose one with --split")
        loaded = loaded[split]
        if streaming and isinstance(loaded, datasets.Dataset):
            loaded = loaded.to_iterable_dataset()
        return loaded if loaded.features is not None else loaded._resolve_features()
    if split is not None and split != str(loaded.split) and not hub:
        raise UserError(
            f"{location} is one dataset (split {loaded.split}), not a dict of splits; leave out --split {split}"
        )
    return loaded if loaded.features is not None else loaded._resolve_features()


@contextlib.contextmanager
def _audio_stored_without_torchcodec() -> Iterator[None]:
    """`datasets.Audio` imports torchcodec to store any value, even a file path or bytes that it then keeps as they
    are; zidong decodes audio itself, so within this block paths and bytes are stored without torchcodec."""
    import datasets

    original = datasets.Audio.encode_example

    def encode(feature, value):
        if isinstance(value, str | Path):
            return {"bytes": None, "path": str(value)}
        if isinstance(value, bytes | bytearray):
            return {"bytes": bytes(value), "path": None}
        if isinstance(value, dict) and "array" not in value and set(value) <= {"bytes", "path"}:
            return {"bytes": value.get("bytes"), "path": value.get("path")}
        return original(feature, value)  # decoded samples: only torchcodec can write them

    datasets.Audio.encode_example = encode
    try:
        yield
    finally:
        datasets.Audio.encode_example = original


class _Stream:
    """A streamed Hugging Face dataset read as the build reads a source: rows by increasing index (an earlier
    index restarts the stream), a column's values in order, and its length (from the dataset's card, else one
    pass over a column)."""

    def __init__(self, dataset, location: str):
        self.dataset = dataset
        self.location = location
        self._rows: Iterator[dict[str, Any]] | None = None
        self._next = 0
        self._length: int | None = None

    def __len__(self) -> int:
        if self._length is None:
            splits = self.dataset.info.splits or {}
            known = splits.get(str(self.dataset.split)) if self.dataset.split is not None else None
            self._length = known.num_examples if known and known.num_examples else self._count()
        return self._length

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):  # a column, in row order
            return (row[key] for row in self._read(self.dataset.select_columns([key])))
        if self._rows is None or key < self._next:
            self._rows, self._next = self._read(self.dataset.skip(key) if key else self.dataset), key
        for _ in range(key - self._next):
            next(self._rows)
        self._next = key + 1
        try:
            return next(self._rows)
        except StopIteration:
            raise UserError(f"{self.location}: the stream ended at row {key}, before the length it declared") from None

    def _count(self) -> int:
        return sum(1 for _ in self._read(self.dataset.select_columns(self.dataset.column_names[:1])))

    def _read(self, dataset) -> Iterator[dict[str, Any]]:
        import datasets

        try:
            yield from dataset
        except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
            raise UserError(f"{self.location}: reading the stream failed ({str(err).splitlines()[0][:200]})") from None


def _check_kinds(where: str, features, mapping: dict[str, str]) -> None:
    """A mapped column whose declared type cannot hold what the field needs (text where an image is expected)."""
    import datasets

    for name, column in mapping.items():
        feature = features[column]
        is_string = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        is_binary = isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")
        fits = {
            "text": is_string,
            "lang": is_string,
            "id": is_string or (isinstance(feature, datasets.Value) and feature.dtype.startswith("int")),
            "image": isinstance(feature, datasets.Image) or is_string or is_binary,
            "audio": isinstance(feature, datasets.Audio) or is_string or is_binary,
        }[name]
        if not fits:
            expected = {
                "text": "strings",
                "lang": "strings",
                "id": "strings or integers",
                "image": "an Image() feature, file paths or bytes",
                "audio": "an Audio() feature, file paths or bytes",
            }[name]
            raise UserError(f"{where}: column {column!r} ({feature}) is mapped to {name}, which needs {expected}")
