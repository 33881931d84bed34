"""What every source kind shares: the `Source` interface the build reads, and the column mapping of tables.

A source is a list of records numbered from 1. The build asks it for each record (`raw`), every id (the duplicate
pre-pass), where a record is (reject reports) and what a resumed build must find unchanged (`claim`). A kind is a
subclass that sets `kind`, says which locations it recognises (`detects`) and how it opens one (`open`); it joins
the registry in `zidong/data/sources/__init__.py`.

A record is either the raw manifest line (JSONL: parsed and checked by the build's workers, so a malformed line is a
reject like any other) or a dict in the manifest's form: `id`, `text`, `image`, `audio`, `lang` and any other fields
(they travel into the sample's `extra`). Image and audio values are a file path (relative to `base_dir`) or URL, raw
bytes, or a `{"bytes", "path"}` mapping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from zidong.data.remote import is_url, read_url
from zidong.errors import UserError

DEFAULT_COLUMNS = {
    "id": ("id", "key", "__key__"),
    "text": ("text", "caption", "title", "txt"),
    "image": ("image", "jpg", "jpeg", "png", "webp", "img", "filepath"),
    "audio": ("audio", "flac", "wav", "mp3"),
    "lang": ("lang", "language"),
}
FIELDS = tuple(DEFAULT_COLUMNS)


class OpenOptions(NamedTuple):
    """How `zidong data build` (or a tokenizer, or `zidong eval`) asks for a source to be read."""

    columns: dict[str, str]  # manifest field -> column, as given with --columns
    split: str | None = None  # a dataset's split
    single: bool = False  # one modality is enough (a tokenizer reads only text)
    streaming: bool = False  # read a dataset as a stream, storing none of it


class Source:
    """Records to build, by 1-based number. A subclass reads one kind of source; this base class reads rows that
    are dicts of columns (`_rows`), mapped to manifest fields by `columns`."""

    kind: ClassVar[str]  # the name `--source-kind` takes
    streams: ClassVar[bool] = False  # can read its records as a stream (`--streaming`)

    def __init__(
        self,
        location: str,
        base_dir: Path | str,
        digest: str,
        columns: dict[str, str],
        rows: Any,
        class_names: dict[str, list[str]] | None = None,
    ):
        self.location = location  # as given (absolute for a local path)
        self.base_dir = base_dir  # relative file paths resolve here (a URL for a source at a URL)
        self.digest = digest  # identifies the content (and the column mapping): a resumed build must see the same
        self.columns = columns  # manifest field -> column
        self.class_names = class_names or {}  # columns whose integers the source names (a dataset's ClassLabel)
        self._rows = rows

    @classmethod
    def detects(cls, location: str) -> bool:
        """Is `location` a source of this kind, judged from its name (and, for a local folder, its files)?"""
        return False

    @classmethod
    def open(cls, location: str, options: OpenOptions) -> Source:
        """The source at `location`; raises UserError naming what cannot be read and how to fix it."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._rows)

    def raw(self, number: int) -> bytes | dict[str, Any]:
        """Record `number`: a manifest line's bytes or a record dict."""
        return self.record(self._rows[number - 1], number)

    def ids(self) -> Iterator[tuple[int, Any]]:
        """(number, id) of every record, for the duplicate pre-pass."""
        column = self.columns.get("id")
        if column is not None:
            for number, value in enumerate(self.column(column), start=1):
                yield number, id_text(value)

    def texts(self) -> Iterator[Any]:
        """Every record's text value (None where it has none), reading nothing else where the source allows."""
        column = self.columns.get("text")
        if column is None:
            raise UserError(f"{self.location}: no text column (map one with --columns text=COLUMN)")
        yield from self.column(column)

    def column(self, name: str) -> Iterator[Any]:
        """One column's values in row order."""
        return (row.get(name) for row in self._rows)

    def where(self, number: int) -> dict[str, Any]:
        """How a reject names its record: its number and the table's 0-based row."""
        return {"line": number, "row": number - 1}

    def claim(self) -> dict[str, Any]:
        """What a resumed build must find unchanged."""
        return {"manifest": self.location, "manifest_sha256": self.digest, "source": self.kind, "columns": self.columns}

    def record(self, row: dict[str, Any], number: int) -> dict[str, Any]:
        """A row as a record: each mapped field from its column, `row-N` as the id where no column gives one, and
        the unmapped columns that JSON can hold as extra fields."""
        record = {name: row.get(column) for name, column in self.columns.items()}
        record["id"] = id_text(record["id"]) if "id" in record else f"row-{number - 1:09d}"
        mapped = set(self.columns.values())
        record |= {column: value for column, value in row.items() if column not in mapped and json_value(value)}
        return record


def suffix_of(location: str) -> str:
    """The file suffix of a path or URL, lower case ("" for a local folder, whatever its name)."""
    if is_url(location):
        return Path(location.split("?")[0]).suffix.lower()
    path = Path(location)
    return "" if path.is_dir() else path.suffix.lower()


def read_file(location: str, what: str = "") -> bytes:
    """The content of a local file or of a URL; raises UserError naming it when it cannot be read."""
    if is_url(location):
        return read_url(location)
    try:
        return Path(location).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what}{location}: {err.strerror or err}") from None


def resolve(location: str) -> tuple[str, Path | str]:
    """How a source records its location (absolute for a path), and the folder its relative paths resolve in."""
    if is_url(location):
        return location, location.rsplit("/", 1)[0]
    path = Path(location).resolve()
    return str(path), path if path.is_dir() else path.parent


def digest_of(content: bytes, mapping: dict[str, str]) -> str:
    """A source's digest: its content and the column mapping read from it."""
    return hashlib.sha256(content + json.dumps(mapping, sort_keys=True).encode()).hexdigest()


def map_columns(where: str, available: Sequence[str], given: dict[str, str], need_two: bool = True) -> dict[str, str]:
    """Field -> column: the given ones (checked), then each field's first default column present."""
    for name, column in given.items():
        if column not in available:
            import difflib

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


def id_text(value: Any) -> Any:
    """Integer ids (common in datasets) as text; anything else as it is (the build rejects what is not text)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def json_value(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
