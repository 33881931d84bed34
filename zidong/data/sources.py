"""What `zidong data build` reads: a zidong JSONL manifest, a CSV/TSV table, or a Hugging Face dataset on disk.

    zidong data build manifest.jsonl --out shards/                        one JSON object per line (the native form)
    zidong data build pairs.tsv --out shards/ --columns image=filepath text=title     open_clip's layout
    zidong data build my_dataset/ --out shards/ --split train             a `save_to_disk` folder
    zidong data build data/*.parquet --out shards/                        files `datasets.load_dataset` reads

Every source yields, for record n (1-based), either the raw manifest line (JSONL: parsed and checked by the build's
workers, so a malformed line is a reject like any other) or a record in the manifest's form: `id`, `text`,
`image`, `audio`, `lang` and any other fields (they travel into the sample's `extra`). Image and audio values are a
file path (relative to the source's folder), raw bytes, or a `{"bytes", "path"}` mapping (how `datasets` stores
`Image()` and `Audio()` values undecoded: zidong decodes them itself, without FFmpeg). All records then go
through the same validation, reject report and shard writer.

Columns map to modalities by name (`--columns text=caption image=jpg audio=audio id=key`); unmapped modalities
take the first column present among the defaults (`DEFAULT_COLUMNS`). A table without an id column gets
`row-N` ids.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zidong.errors import UserError

DEFAULT_COLUMNS = {
    "id": ("id", "key", "__key__"),
    "text": ("text", "caption", "title", "txt"),
    "image": ("image", "jpg", "jpeg", "png", "webp", "img", "filepath"),
    "audio": ("audio", "flac", "wav", "mp3"),
    "lang": ("lang", "language"),
}
FIELDS = tuple(DEFAULT_COLUMNS)
HF_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class Source:
    """Records to build, by 1-based number. `raw(n)`: bytes of a manifest line or a record dict."""

    location: str  # as given
    kind: str  # "jsonl", "csv", "tsv", "hf"
    base_dir: Path  # relative file paths resolve here
    digest: str  # identifies the content (and the column mapping): a resumed build must see the same
    count: int
    columns: dict[str, str] = field(default_factory=dict)  # manifest field -> column (tables and datasets)
    _records: Any = None  # the rows (list of lines, list of dicts, or a datasets.Dataset)

    def __len__(self) -> int:
        return self.count

    def raw(self, number: int) -> bytes | dict[str, Any]:
        row = self._records[number - 1]
        if self.kind == "jsonl":
            return row
        return self._to_record(row, number)

    def ids(self) -> Iterator[tuple[int, Any]]:
        """(number, id) of every record, for the duplicate pre-pass (JSONL: the raw line, parsed by the caller)."""
        if self.kind == "jsonl":
            yield from enumerate(self._records, start=1)
            return
        column = self.columns.get("id")
        if column is None:
            return
        values = self._records[column] if self.kind == "hf" else [row.get(column) for row in self._records]
        for number, value in enumerate(values, start=1):
            yield number, _id_text(value)

    def where(self, number: int) -> dict[str, int]:
        """How a reject names its record: the manifest line, or the table's 0-based row."""
        return {"line": number} if self.kind == "jsonl" else {"line": number, "row": number - 1}

    def claim(self) -> dict[str, Any]:
        """What a resumed build must find unchanged (JSONL keeps the keys of builds written before other sources)."""
        claim = {"manifest": self.location, "manifest_sha256": self.digest}
        if self.kind != "jsonl":
            claim |= {"source": self.kind, "columns": self.columns}
        return claim

    def _to_record(self, row: dict[str, Any], number: int) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for name, column in self.columns.items():
            value = row.get(column)
            record[name] = None if value == "" and self.kind in ("csv", "tsv") else value
        if "id" in record:
            record["id"] = _id_text(record["id"])
        else:
            record["id"] = f"row-{number - 1:09d}"
        mapped = set(self.columns.values())
        for column, value in row.items():
            if column not in mapped and _json_value(value):
                record[column] = value
        return record


def open_source(
    location: str | Path, columns: dict[str, str] | None = None, split: str | None = None, kind: str | None = None
) -> Source:
    """The source at `location`, its kind detected from it (or given: jsonl, csv, tsv, hf)."""
    path = Path(location)
    kind = kind or _detect(path)
    if kind == "jsonl":
        if columns:
            raise UserError(f"{location}: --columns applies to tables and datasets; a JSONL manifest names its fields")
        return _jsonl(path)
    if kind in ("csv", "tsv"):
        return _table(path, kind, columns or {})
    return _dataset(path, columns or {}, split)


def parse_columns(pairs: list[str]) -> dict[str, str]:
    """`text=caption image=jpg` -> {"text": "caption", "image": "jpg"}; raises UserError on anything else."""
    columns = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not column:
            raise UserError(f"--columns {pair}: expected FIELD=COLUMN, e.g. text=caption")
        if name not in FIELDS:
            raise UserError(f"--columns {pair}: {name!r} is not a field; choose from {', '.join(FIELDS)}")
        columns[name] = column
    return columns


# ------------------------------------------------------------------------------------------------ kinds


def _detect(path: Path) -> str:
    if path.is_dir():
        return "hf"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix in HF_FILE_BUILDERS:
        return "hf"
    raise UserError(
        f"{path}: cannot tell what kind of source this is from its name; a JSONL manifest ends in .jsonl, a table in "
        ".csv or .tsv, dataset files in .parquet, .arrow or .json, a dataset folder is a folder"
    )


def _jsonl(path: Path) -> Source:
    try:
        content = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read manifest {path}: {err.strerror or err}") from None
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise UserError(f"manifest {path} has no samples (expected one JSON object per line)")
    digest = hashlib.sha256(content).hexdigest()
    return Source(str(path.resolve()), "jsonl", path.resolve().parent, digest, len(lines), {}, lines)


def _table(path: Path, kind: str, columns: dict[str, str]) -> Source:
    try:
        content = path.read_bytes()
        text = content.decode("utf-8-sig")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); save the table as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
    rows = list(reader)
    header = reader.fieldnames or []
    if not rows:
        raise UserError(f"{path} has no rows under its header (expected a header line, then one sample per row)")
    mapping = _map_columns(str(path), header, columns)
    digest = hashlib.sha256(content + json.dumps(mapping, sort_keys=True).encode()).hexdigest()
    return Source(str(path.resolve()), kind, path.resolve().parent, digest, len(rows), mapping, rows)


def _dataset(path: Path, columns: dict[str, str], split: str | None) -> Source:
    import datasets

    dataset = _load_dataset(path, split)
    mapping = _map_columns(str(path), list(dataset.column_names), columns)
    _check_kinds(str(path), dataset.features, mapping)
    for name in ("image", "audio"):  # decoded by zidong from their bytes or paths (no torchcodec, no FFmpeg)
        column = mapping.get(name)
        feature = dataset.features.get(column) if column else None
        if isinstance(feature, datasets.Image | datasets.Audio):
            dataset = dataset.cast_column(column, type(feature)(decode=False))
    base = path.resolve() if path.is_dir() else path.resolve().parent
    digest = hashlib.sha256(f"{dataset._fingerprint}:{split}:{json.dumps(mapping, sort_keys=True)}".encode())
    return Source(str(path.resolve()), "hf", base, digest.hexdigest(), len(dataset), mapping, dataset)


def _load_dataset(path: Path, split: str | None):
    import datasets

    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path))
        else:
            loaded = datasets.load_dataset(HF_FILE_BUILDERS[path.suffix.lower()], data_files=str(path))
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise UserError(f"{path}: `datasets` cannot load this ({str(err).splitlines()[0][:200]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise UserError(f"{path} holds the splits {', '.join(loaded)}; choose one with --split")
        return loaded[split]
    if split is not None and split != str(loaded.split):
        raise UserError(
            f"{path} is one dataset (split {loaded.split}), not a dict of splits; leave out --split {split}"
        )
    return loaded


def _map_columns(where: str, available: list[str], given: dict[str, str]) -> dict[str, str]:
    """Field -> column: the given ones (checked), then each field's first default column present."""
    for name, column in given.items():
        if column not in available:
            close = difflib.get_close_matches(column, available, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(
                f"{where}: --columns {name}={column}: no column {column!r}; it has {', '.join(available)}{hint}"
            )
    mapping = dict(given)
    for name, defaults in DEFAULT_COLUMNS.items():
        if name not in mapping:
            found = next((c for c in defaults if c in available and c not in mapping.values()), None)
            if found is not None:
                mapping[name] = found
    if sum(name in mapping for name in ("text", "image", "audio")) < 2:
        raise UserError(
            f"{where}: found columns for {', '.join(n for n in ('text', 'image', 'audio') if n in mapping) or 'nothing'}"
            f" of text, image and audio (columns: {', '.join(available)}); a sample needs two: map them with "
            "--columns text=COLUMN image=COLUMN audio=COLUMN"
        )
    return {name: mapping[name] for name in FIELDS if name in mapping}


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


def _id_text(value: Any) -> Any:
    """Integer ids (common in datasets) as text; anything else as it is (the build rejects what is not text)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _json_value(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
