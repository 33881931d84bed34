"""The shard folder format: its index (names, reader, writer) and random access to its samples.

A shard folder, written by `zidong data build` / `zidong data demo`, holds tar shards, `index.json` (format
`INDEX_FORMAT`: totals, per-shard sample counts, bytes and sha256; written last, so its presence means the build
finished) and `rejects.jsonl`. A shard is a plain tar file; its members `{key}.{ext}` are stored in sample
order. `load_index` reads and checks the index, `write_index` writes it and the reject report atomically.

`ShardFolder` reads the
sample counts from `index.json` (no shard is opened to plan an epoch) and, on first use of a shard, its tar
headers (a sequential scan of the header blocks only), so that any sample can then be read with one seek per
member. A damaged shard or member raises `SampleError`, which the stream turns into a counted, logged skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from zidong.errors import UserError

INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.jsonl"
INDEX_FORMAT = "zidong-shards/1"


def load_index(folder: Path) -> dict[str, Any]:
    """Read `folder/index.json`; raises UserError when it is missing or not a zidong shard index."""
    path = folder / INDEX_FILE
    if not path.is_file():
        raise UserError(
            f"{folder} has no index.json: not a zidong shard folder, or its build has not finished "
            "(re-run the same `zidong data build` command to finish it)"
        )
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise UserError(f"{path} is not a zidong shard index (expected format {INDEX_FORMAT})")
    return index


def write_index(folder: Path, index: dict[str, Any], rejects: list[dict[str, Any]]) -> None:
    """Write `rejects.jsonl`, then `index.json` (format `INDEX_FORMAT`), each atomically (a reader never sees a
    partial file)."""
    write_atomic(folder / REJECTS_FILE, "".join(json.dumps(reject) + "\n" for reject in rejects).encode())
    content = {"format": INDEX_FORMAT, **index}
    write_atomic(folder / INDEX_FILE, (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode())


def write_atomic(path: Path, content: bytes) -> None:
    """Write `content` to `path` through a temporary file, synced, then renamed over `path`."""
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with temporary.open("wb") as stream:
        stream.write(content)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


class SampleError(Exception):
    """A sample (or the whole shard it lives in) that cannot be read back; the message says why."""


@dataclass(frozen=True)
class RawSample:
    """One sample's members as stored: `files` maps extension (txt, jpg, png, flac) to bytes."""

    key: str
    shard: str
    meta: dict[str, Any]
    files: dict[str, bytes]


@dataclass(frozen=True)
class _Member:
    offset: int
    size: int


class ShardFolder:
    """The shards of one built folder. Open file handles are per process; the object pickles without them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = load_index(self.folder)
        self.shards = [entry["shard"] for entry in index["shards"] if entry["samples"] > 0]
        self.counts = [entry["samples"] for entry in index["shards"] if entry["samples"] > 0]
        # names, sizes and checksums of the shards: what a saved stream position is only valid for
        self.fingerprint = hashlib.sha256(json.dumps(index["shards"], sort_keys=True).encode()).hexdigest()[:16]
        self._tables: dict[int, list[tuple[str, dict[str, _Member]]]] = {}
        self._handles: dict[int, BinaryIO] = {}

    def __len__(self) -> int:
        return sum(self.counts)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": {}, "_handles": {}}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def read(self, shard: int, position: int, only: Collection[str] | None = None) -> RawSample:
        """The metadata and the members of one sample (those with an extension in `only`, if given).

        Raises SampleError when the metadata or a member cannot be read.
        """
        key, members = self._entry(shard, position)
        try:
            meta = json.loads(self._read(shard, members["json"]))
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SampleError(f"{self.shards[shard]} key {key}: unreadable metadata ({err})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("modalities"), list):
            raise SampleError(f"{self.shards[shard]} key {key}: metadata without a modality list")
        files = {
            ext: self._read(shard, member)
            for ext, member in members.items()
            if ext != "json" and (only is None or ext in only)
        }
        return RawSample(key=key, shard=self.shards[shard], meta=meta, files=files)

    def _entry(self, shard: int, position: int) -> tuple[str, dict[str, _Member]]:
        table = self._table(shard)
        if position >= len(table):
            raise SampleError(
                f"{self.shards[shard]}: holds {len(table)} samples, index.json says {self.counts[shard]} "
                "(the shard was changed after the build)"
            )
        return table[position]

    def _table(self, shard: int) -> list[tuple[str, dict[str, _Member]]]:
        if shard not in self._tables:
            path = self.folder / self.shards[shard]
            table: dict[str, dict[str, _Member]] = {}
            try:
                with tarfile.open(path) as archive:
                    for info in archive:
                        if info.isfile():
                            key, _, ext = info.name.partition(".")
                            table.setdefault(key, {})[ext] = _Member(info.offset_data, info.size)
            except (OSError, tarfile.TarError) as err:
                # keep the headers read so far: the samples before the damage stay readable
                if not table:
                    self._tables[shard] = []
                    raise SampleError(f"{self.shards[shard]}: cannot read the shard ({err})") from None
            self._tables[shard] = list(table.items())
        return self._tables[shard]

    def _read(self, shard: int, member: _Member) -> bytes:
        try:
            if shard not in self._handles:
                self._handles[shard] = open(self.folder / self.shards[shard], "rb")  # noqa: SIM115 (kept open)
            handle = self._handles[shard]
            handle.seek(member.offset)
            content = handle.read(member.size)
        except OSError as err:
            raise SampleError(f"{self.shards[shard]}: read failed ({err})") from None
        if len(content) != member.size:
            raise SampleError(f"{self.shards[shard]}: truncated (a member ends past the end of the file)")
        return content
