"""What `zidong data build` reads: a zidong JSONL manifest, a CSV/TSV table, or a Hugging Face dataset on disk.

    zidong data build manifest.jsonl --out shards/                        one JSON object per line (the native form)
    zidong data build pairs.tsv --out shards/ --columns image=filepath text=title     open_clip's layout
    zidong data build my_dataset/ --out shards/ --split train             a `save_to_disk` folder
    zidong data build train-00000.parquet --out shards/                   a file `datasets.load_dataset` reads
    zidong data build 'tars/{00000..00099}.tar' --out shards/             WebDataset tars other tools wrote
    zidong data build 's3://bucket/tars/{00000..00099}.tar' --out shards/  any of these at an fsspec URL

Every source yields, for record n (1-based), either the raw manifest line (JSONL: parsed and checked by the build's
workers, so a malformed line is a reject like any other) or a record in the manifest's form: `id`, `text`,
`image`, `audio`, `lang` and any other fields (they travel into the sample's `extra`). Image and audio values are a
file path (relative to the source's folder) or URL, raw bytes, or a `{"bytes", "path"}` mapping (how `datasets` stores
`Image()` and `Audio()` values undecoded: zidong decodes them itself, without FFmpeg). All records then go
through the same validation, reject report and shard writer.

Columns map to modalities by name (`--columns text=caption image=jpg audio=audio id=key`); unmapped modalities
take the first column present among the defaults (`DEFAULT_COLUMNS`). A table without an id column gets
`row-N` ids.

A source at a URL (`https://`, `s3://`, `gs://`, `hf://`, ...: whatever fsspec reaches) is read the same way: a
manifest or table is read into memory (relative paths in it then resolve against its URL), dataset files go to
`datasets` as URLs, and WebDataset tars are downloaded first, each into `~/.cache/zidong/sources` (reused by a
resumed build; delete the folder after the build).
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zidong.data.remote import default_cache_dir, fetch_files, is_url, list_url, read_url
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
KINDS = ("jsonl", "csv", "tsv", "hf", "webdataset")
_BRACES = re.compile(r"\{([^{}]*)\}")
_HUB_DATASET = re.compile(r"hf://datasets/([^/@]+/[^/@]+?)(?:@([^/]+))?/?")  # a hub dataset id (optional @revision)


@dataclass
class Source:
    """Records to build, by 1-based number. `raw(n)`: bytes of a manifest line or a record dict."""

    location: str  # as given
    kind: str  # one of KINDS
    base_dir: Path | str  # relative file paths resolve here (a URL for a source at a URL)
    digest: str  # identifies the content (and the column mapping): a resumed build must see the same
    columns: dict[str, str] = field(default_factory=dict)  # manifest field -> column (tables and datasets)
    class_names: dict[str, list[str]] = field(default_factory=dict)  # a dataset's ClassLabel columns: id -> name
    _records: Any = None  # the rows (list of lines, list of dicts, or a datasets.Dataset)

    def __len__(self) -> int:
        return len(self._records)

    def raw(self, number: int) -> bytes | dict[str, Any]:
        row = self._records[number - 1]
        if self.kind == "jsonl":
            return row
        if self.kind == "webdataset":
            row = row.read()
        return self._to_record(row, number)

    def ids(self) -> Iterator[tuple[int, Any]]:
        """(number, id) of every record, for the duplicate pre-pass (JSONL: the raw line, parsed by the caller)."""
        if self.kind == "jsonl":
            yield from enumerate(self._records, start=1)
            return
        if self.kind == "webdataset":
            for number, sample in enumerate(self._records, start=1):
                yield number, sample.key
            return
        column = self.columns.get("id")
        if column is None:
            return
        values = self._records[column] if self.kind == "hf" else [row.get(column) for row in self._records]
        for number, value in enumerate(values, start=1):
            yield number, _id_text(value)

    def texts(self) -> Iterator[Any]:
        """Every record's text value (None where it has none), reading nothing else where the source allows."""
        if self.kind == "jsonl":
            for line in self._records:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a malformed line has no text to give; `data build` reports it
                yield record.get("text") if isinstance(record, dict) else None
            return
        column = self.columns.get("text")
        if self.kind == "webdataset":
            for sample in self._records:
                wanted = (column,) if column else DEFAULT_COLUMNS["text"]
                found = next((c for c in wanted if c.partition(".")[0] in sample.members), None)
                yield _member_value(sample.read(only=(found.partition(".")[0],)), found) if found else None
            return
        if column is None:
            raise UserError(f"{self.location}: no text column (map one with --columns text=COLUMN)")
        if self.kind == "hf":
            yield from self._records[column]
        else:
            yield from (row.get(column) for row in self._records)

    def where(self, number: int) -> dict[str, Any]:
        """How a reject names its record: the manifest line, the table's 0-based row, or the tar and key."""
        if self.kind == "jsonl":
            return {"line": number}
        if self.kind == "webdataset":
            sample = self._records[number - 1]
            return {"line": number, "shard": sample.origin.rsplit("/", 1)[-1], "key": sample.key}
        return {"line": number, "row": number - 1}

    def claim(self) -> dict[str, Any]:
        """What a resumed build must find unchanged (JSONL keeps the keys of builds written before other sources)."""
        claim = {"manifest": self.location, "manifest_sha256": self.digest}
        if self.kind != "jsonl":
            claim |= {"source": self.kind, "columns": self.columns}
        return claim

    def _to_record(self, row: dict[str, Any], number: int) -> dict[str, Any]:
        record: dict[str, Any] = {}
        columns = dict(self.columns)
        if self.kind == "webdataset":  # members differ from sample to sample: each field takes what this one has
            for name, defaults in DEFAULT_COLUMNS.items():
                if name not in columns:
                    found = next((c for c in defaults if c in row), None)
                    if found:
                        columns[name] = found
        if self.class_names:  # a ClassLabel's integer as its class name
            row = {
                c: self.class_names[c][v] if c in self.class_names and isinstance(v, int) else v for c, v in row.items()
            }
        for name, column in columns.items():
            value = _member_value(row, column) if self.kind == "webdataset" else row.get(column)
            record[name] = None if value == "" and self.kind in ("csv", "tsv") else value
        if "id" in record:
            record["id"] = _id_text(record["id"])
        else:
            record["id"] = f"row-{number - 1:09d}"
        mapped = set(columns.values())
        if self.kind == "webdataset":
            return _with_json_member(record, row.get("json"), mapped)
        for column, value in row.items():
            if column not in mapped and _json_value(value):
                record[column] = value
        return record


def open_source(
    location: str | Path,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    kind: str | None = None,
    single: bool = False,
    streaming: bool = False,
) -> Source:
    """The source at `location`, its kind (one of `KINDS`) detected from it or given. `single`: one modality is
    enough (a tokenizer reads only text; an audio classification set for `zidong eval` has only audio).
    `streaming`: read a Hugging Face dataset as a stream, storing none of it (a hub dataset id always is)."""
    location = str(location)
    kind = kind or _detect(location)
    if streaming and kind != "hf":
        raise UserError(f"{location}: --streaming reads Hugging Face datasets; this is a {kind} source")
    if kind == "webdataset":
        return _webdataset(location, columns or {})
    if kind == "jsonl":
        if columns:
            raise UserError(f"{location}: --columns applies to tables and datasets; a JSONL manifest names its fields")
        return _jsonl(location)
    if kind in ("csv", "tsv"):
        return _table(location, kind, columns or {}, single)
    return _dataset(location, columns or {}, split, single, streaming or is_hub_dataset(location))


def is_hub_dataset(location: str | Path) -> bool:
    """Does `location` name a Hugging Face hub dataset (`hf://datasets/ORG/NAME[@REVISION]`)?"""
    return bool(_HUB_DATASET.fullmatch(str(location)))


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


def _detect(location: str) -> str:
    if _HUB_DATASET.fullmatch(location):
        return "hf"
    remote = is_url(location)
    path = Path(location.split("?")[0]) if remote else Path(location)
    if _BRACES.search(location) or path.suffix.lower() == ".tar":
        return "webdataset"
    if not remote and path.is_dir():
        return "webdataset" if any(path.glob("*.tar")) else "hf"
    if remote and not path.suffix:
        raise UserError(
            f"{location}: a folder at a URL is read as WebDataset tars with --source-kind webdataset, as a "
            "`save_to_disk` dataset with --source-kind hf; or give its files (a brace pattern such as "
            "URL/{00000..00099}.tar)"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    if suffix in HF_FILE_BUILDERS:
        return "hf"
    raise UserError(
        f"{location}: cannot tell what kind of source this is from its name; a JSONL manifest ends in .jsonl, a table in "
        ".csv or .tsv, dataset files in .parquet, .arrow or .json, a dataset folder is a folder"
    )


def _read_file(location: str, what: str = "") -> bytes:
    """The content of a local file or of a URL; raises UserError naming it when it cannot be read."""
    if is_url(location):
        return read_url(location)
    try:
        return Path(location).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what}{location}: {err.strerror or err}") from None


def _where(location: str) -> tuple[str, Path | str]:
    """How a source records its location (absolute for a path), and the folder its relative paths resolve in."""
    if _HUB_DATASET.fullmatch(location):  # paths in its columns are relative to the dataset's root
        return location, location.rstrip("/")
    if is_url(location):
        return location, location.rsplit("/", 1)[0]
    path = Path(location).resolve()
    return str(path), path if path.is_dir() else path.parent


def _jsonl(path: str) -> Source:
    content = _read_file(path, "manifest ")
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise UserError(f"manifest {path} has no samples (expected one JSON object per line)")
    digest = hashlib.sha256(content).hexdigest()
    location, base = _where(path)
    return Source(location, "jsonl", base, digest, _records=lines)


def _table(path: str, kind: str, columns: dict[str, str], single: bool = False) -> Source:
    content = _read_file(path)
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); save the table as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
    rows = list(reader)
    header = reader.fieldnames or []
    if not rows:
        raise UserError(f"{path} has no rows under its header (expected a header line, then one sample per row)")
    mapping = _map_columns(path, header, columns, need_two=not single)
    digest = hashlib.sha256(content + json.dumps(mapping, sort_keys=True).encode()).hexdigest()
    location, base = _where(path)
    return Source(location, kind, base, digest, mapping, _records=rows)


def _dataset(path: str, columns: dict[str, str], split: str | None, single: bool, streaming: bool) -> Source:
    import datasets

    dataset = _load_dataset(path, split, streaming)
    mapping = _map_columns(path, list(dataset.column_names), columns, need_two=not single)
    _check_kinds(path, dataset.features, mapping)
    for name in ("image", "audio"):  # decoded by zidong from their bytes or paths (no torchcodec, no FFmpeg)
        column = mapping.get(name)
        feature = dataset.features.get(column) if column else None
        if isinstance(feature, datasets.Image | datasets.Audio):
            dataset = dataset.cast_column(column, type(feature)(decode=False))
    # a stream has no fingerprint of its content: a resumed build trusts the location and revision
    content = f"stream:{path}" if streaming else dataset._fingerprint
    digest = hashlib.sha256(f"{content}:{split}:{json.dumps(mapping, sort_keys=True)}".encode())
    names = {c: list(f.names) for c, f in dataset.features.items() if isinstance(f, datasets.ClassLabel)}
    location, base = _where(path)
    records = _Stream(dataset, path) if streaming else dataset
    return Source(location, "hf", base, digest.hexdigest(), mapping, names, _records=records)


def _load_dataset(location: str, split: str | None, streaming: bool = False):
    import datasets

    remote = is_url(location)
    path = Path(location.split("?")[0] if remote else location)
    builder = HF_FILE_BUILDERS.get(path.suffix.lower())
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


@dataclass
class _TarSample:
    """One sample of a WebDataset tar: its key and the members that hold it."""

    tar: Path
    key: str
    members: dict[str, tarfile.TarInfo]  # extension -> member
    origin: str  # the tar as the user named it (a path or a URL; `tar` is then its downloaded copy)

    def read(self, only: tuple[str, ...] | None = None) -> dict[str, Any]:
        """{"__key__": key, extension: content} (`only`: those extensions); `txt` as text, `json` parsed (left as
        text when it is not JSON)."""
        row: dict[str, Any] = {"__key__": self.key}
        with tarfile.open(self.tar) as archive:
            for extension, member in self.members.items():
                if only is not None and extension not in only:
                    continue
                content = archive.extractfile(member).read()
                if extension in ("txt", "text"):
                    content = content.decode("utf-8", errors="surrogateescape")
                elif extension == "json":
                    try:
                        content = json.loads(content)
                    except ValueError:
                        content = content.decode("utf-8", errors="surrogateescape")
                row[extension] = content
        return row


def expand_braces(pattern: str) -> list[str]:
    """`shards/{00000..00002}.tar` -> three paths (zero padding kept); `{a,b}` lists; several groups multiply."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        items = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


def _webdataset(location: str, columns: dict[str, str]) -> Source:
    """WebDataset tars (`{key}.{extension}` members, a sample's members consecutive and in one tar): a folder of
    them, one tar, or a brace pattern; local or at URLs. Scanned once for the members of every sample (headers
    only)."""
    path = Path(location)
    if is_url(location):
        bare = not _BRACES.search(location) and not location.split("?")[0].endswith(".tar")
        origins = list_url(location, "*.tar") if bare else expand_braces(location)
        tars = fetch_files(origins, default_cache_dir().parent / "sources")
    else:
        tars = sorted(path.glob("*.tar")) if path.is_dir() else [Path(p) for p in expand_braces(location)]
        origins = [str(tar) for tar in tars]
    missing = [str(t) for t in tars if not t.is_file()]
    if missing:
        raise UserError(
            f"{location}: no such tar file {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if not tars:
        raise UserError(f"{location}: no .tar files there")
    samples: list[_TarSample] = []
    found_in: dict[str, str] = {}
    extensions: set[str] = set()
    digest = hashlib.sha256(json.dumps(columns, sort_keys=True).encode())
    for tar, origin in zip(tars, origins, strict=True):
        stat = tar.stat()
        # a downloaded copy's own time changes when it is downloaded again: only the URL and size identify it
        digest.update(f"{origin}:{stat.st_size}{'' if is_url(origin) else f':{stat.st_mtime_ns}'}".encode())
        try:
            with tarfile.open(tar) as archive:
                members = [m for m in archive.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"{origin}: not a readable tar file ({err})") from None
        for member in members:
            key, dot, extension = _split_member(member.name)
            if not dot:
                continue  # no extension: not part of a sample
            if samples and samples[-1].tar == tar and samples[-1].key == key:
                samples[-1].members[extension] = member
                continue
            if key in found_in:
                place = "earlier in the same tar" if found_in[key] == origin else f"in {found_in[key]}"
                raise UserError(
                    f"{origin}: members of sample {key!r} are also {place}; WebDataset keeps a sample's members "
                    "together in one tar (re-shard so that each key's files are consecutive in one tar)"
                )
            found_in[key] = origin
            samples.append(_TarSample(tar, key, {extension: member}, origin))
            extensions.add(extension)
    if not samples:
        raise UserError(f"{location}: the tars hold no {{key}}.{{extension}} members")
    available = ["__key__", *sorted(extensions)]
    _map_columns(
        location,
        available,
        {n: c.partition(".")[0] if c.startswith("json.") else c for n, c in columns.items()},
        need_two=False,
    )
    mapping = {"id": "__key__", **columns}
    return Source(
        location,
        "webdataset",
        tars[0].parent.resolve() if is_url(location) or not path.is_dir() else path.resolve(),
        digest.hexdigest(),
        mapping,
        _records=samples,
    )


def _split_member(name: str) -> tuple[str, str, str]:
    """`dir/000123.seg.jpg` -> ("dir/000123", ".", "seg.jpg"): the key is the name up to the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, extension


def _with_json_member(record: dict[str, Any], fields: Any, mapped: set[str]) -> dict[str, Any]:
    """A sample's json member: zidong's own (a shard we wrote) gives back its id, language and extra fields; another
    tool's fields (url, width, ...) travel as extra, a `lang` among them as the language."""
    if not isinstance(fields, dict):
        return record
    if "modalities" in fields and "line" in fields:  # zidong's sample metadata
        record["id"] = fields.get("id", record.get("id"))
        record.setdefault("lang", fields.get("lang"))
        fields = fields.get("extra") or {}
    taken = {c.removeprefix("json.") for c in mapped if c.startswith("json.")}
    if record.get("lang") is None and isinstance(fields.get("lang"), str):
        record["lang"] = fields["lang"]
        taken.add("lang")
    extra = {k: v for k, v in fields.items() if k not in taken and k not in record and _json_value(v)}
    return {**record, **extra}


def _member_value(row: dict[str, Any], column: str) -> Any:
    if column.startswith("json."):
        fields = row.get("json")
        return fields.get(column.removeprefix("json.")) if isinstance(fields, dict) else None
    return row.get(column)


def _map_columns(where: str, available: list[str], given: dict[str, str], need_two: bool = True) -> dict[str, str]:
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
    if need_two and sum(name in mapping for name in ("text", "image", "audio")) < 2:
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
