"""WebDataset tars other tools wrote (`{key}.{extension}` members, a sample's members consecutive in one tar): a
folder of them, one tar, or a brace pattern (`tars/{00000..00099}.tar`); local or at URLs (downloaded first, each
into `~/.cache/zidong/sources`, reused by a resumed build). Scanned once for every sample's members (headers only).

Members map to fields like columns (`--columns image=jpg text=txt`, `json.FIELD` for a field of the json member);
unmapped fields take, sample by sample, the first default extension that sample has.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from zidong.data.remote import default_cache_dir, fetch_files, is_url, list_url
from zidong.data.sources.base import DEFAULT_COLUMNS, OpenOptions, Source, id_text, json_value, map_columns
from zidong.errors import UserError

_BRACES = re.compile(r"\{([^{}]*)\}")


class WebDatasetSource(Source):
    """Samples of WebDataset tars; a record is read from its tar when the build asks for it."""

    kind = "webdataset"

    @classmethod
    def detects(cls, location: str) -> bool:
        """A brace pattern, a `.tar`, or a local folder holding tars."""
        if _BRACES.search(location) or Path(location.split("?")[0]).suffix.lower() == ".tar":
            return True
        path = Path(location)
        return not is_url(location) and path.is_dir() and any(path.glob("*.tar"))

    @classmethod
    def open(cls, location: str, options: OpenOptions) -> Source:
        return _open(cls, location, options.columns)

    def raw(self, number: int) -> dict[str, Any]:
        return self.record(self._rows[number - 1].read(), number)

    def ids(self) -> Iterator[tuple[int, Any]]:
        for number, sample in enumerate(self._rows, start=1):
            yield number, sample.key

    def texts(self) -> Iterator[Any]:
        column = self.columns.get("text")
        for sample in self._rows:
            wanted = (column,) if column else DEFAULT_COLUMNS["text"]
            found = next((c for c in wanted if c.partition(".")[0] in sample.members), None)
            yield _member_value(sample.read(only=(found.partition(".")[0],)), found) if found else None

    def where(self, number: int) -> dict[str, Any]:
        sample = self._rows[number - 1]
        return {"line": number, "shard": sample.origin.rsplit("/", 1)[-1], "key": sample.key}

    def record(self, row: dict[str, Any], number: int) -> dict[str, Any]:
        """Members differ from sample to sample: each unmapped field takes what this one has."""
        columns = dict(self.columns)
        for name, defaults in DEFAULT_COLUMNS.items():
            if name not in columns:
                found = next((c for c in defaults if c in row), None)
                if found:
                    columns[name] = found
        record = {name: _member_value(row, column) for name, column in columns.items()}
        record["id"] = id_text(record["id"]) if "id" in record else f"row-{number - 1:09d}"
        return _with_json_member(record, row.get("json"), set(columns.values()))


def _open(cls: type[WebDatasetSource], location: str, columns: dict[str, str]) -> Source:
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
    map_columns(
        location,
        available,
        {n: c.partition(".")[0] if c.startswith("json.") else c for n, c in columns.items()},
        need_two=False,
    )
    mapping = {"id": "__key__", **columns}
    base = tars[0].parent.resolve() if is_url(location) or not path.is_dir() else path.resolve()
    return cls(location, base, digest.hexdigest(), mapping, samples)


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
    extra = {k: v for k, v in fields.items() if k not in taken and k not in record and json_value(v)}
    return {**record, **extra}


def _member_value(row: dict[str, Any], column: str) -> Any:
    if column.startswith("json."):
        fields = row.get("json")
        return fields.get(column.removeprefix("json.")) if isinstance(fields, dict) else None
    return row.get(column)


class _TarSample(NamedTuple):
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
