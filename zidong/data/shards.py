"""The shard folder format: its index (names, reader, writer) and random access to its samples.

A shard folder, written by `zidong data build` / `zidong data demo`, holds tar shards, `index.json` (format
`INDEX_FORMAT`: totals, per-shard sample counts, bytes and sha256; written last, so its presence means the build
finished) and `rejects.jsonl`. A shard is a plain tar file; its members `{key}.{ext}` are stored in sample
order. `load_index` reads and checks the index, `write_index` writes it and the reject report atomically.

`ShardFolder` reads the
sample counts from `index.json` (no shard is opened to plan an epoch) and, on first use of a shard, its tar
headers (a sequential scan of the header blocks only), so that any sample can then be read with one seek per
member. A damaged shard or member raises `SampleError`, which the stream turns into a counted, logged skip.
A folder may also be a URL: its shards are then read from verified local copies (zidong/data/remote.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from zidong.data.remote import ShardCache, is_url, join_url, read_remote_index
from zidong.errors import UserError

INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.jsonl"
INDEX_FORMAT = "zidong-shards/1"


def load_index(folder: str | Path) -> dict[str, Any]:
    """Read `folder/index.json` (a local folder or a URL); raises UserError when it is missing, unreachable or not
    a zidong shard index."""
    if is_url(folder):
        path, index = join_url(str(folder), INDEX_FILE), read_remote_index(str(folder))
    else:
        path = Path(folder) / INDEX_FILE
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
    """The shards of one built folder, local or at a URL (read through `cache`, by default the user's cache folder).

    Open file handles (at most MAX_OPEN, the least recently used closed first) and the prefetch thread are per
    process; the object pickles without them.
    """

    MAX_OPEN = 4

    def __init__(self, folder: str | Path, cache: ShardCache | None = None):
        self.remote = is_url(folder)
        self.folder = str(folder) if self.remote else Path(folder)
        self.name = self.folder if self.remote else str(self.folder.resolve())  # names the folder in a stream state
        index = load_index(self.folder)
        listed = [entry for entry in index["shards"] if entry["samples"] > 0]
        self.shards = [entry["shard"] for entry in listed]
        self.counts = [entry["samples"] for entry in listed]
        self._remote_files = [(entry["sha256"], entry["bytes"]) for entry in listed] if self.remote else []
        self.cache = (cache or ShardCache.default()) if self.remote else None
        # names, sizes and checksums of the shards: what a saved stream position is only valid for
        self.fingerprint = hashlib.sha256(json.dumps(index["shards"], sort_keys=True).encode()).hexdigest()[:16]
        self._tables: dict[int, list[tuple[str, dict[str, _Member]]]] = {}
        self._handles: dict[int, BinaryIO] = {}  # in order of last use
        self._prefetcher: ThreadPoolExecutor | None = None
        self._prefetched: set[int] = set()

    def __len__(self) -> int:
        return sum(self.counts)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": {}, "_handles": {}, "_prefetcher": None, "_prefetched": set()}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        if self._prefetcher is not None:  # a download in progress finishes in the background
            self._prefetcher.shutdown(wait=False, cancel_futures=True)
            self._prefetcher = None

    def location(self, shard: int) -> str:
        """Where shard number `shard` lives (a path or a URL)."""
        return join_url(self.folder, self.shards[shard]) if self.remote else str(self.folder / self.shards[shard])

    def prefetch(self, shards: Collection[int]) -> None:
        """Start fetching these shards into the cache in the background (a remote folder only; each once)."""
        if not self.remote:
            return
        for shard in shards:
            if shard in self._prefetched:
                continue
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zidong-prefetch")
            self._prefetched.add(shard)
            # an error here is raised again, with its message, by the read that needs the shard
            self._prefetcher.submit(self.cache.fetch, self.location(shard), *self._remote_files[shard])

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
            table: dict[str, dict[str, _Member]] = {}
            try:
                handle = self._handle(shard)
                handle.seek(0)
                with tarfile.open(fileobj=handle) as archive:
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

    def _handle(self, shard: int) -> BinaryIO:
        """The open file of a shard (its cached copy for a remote folder); raises OSError when it cannot open."""
        handle = self._handles.pop(shard, None)
        if handle is None:
            if len(self._handles) >= self.MAX_OPEN:
                self._handles.pop(next(iter(self._handles))).close()
            if self.remote:
                handle = self.cache.open(self.location(shard), *self._remote_files[shard])
            else:
                handle = open(self.folder / self.shards[shard], "rb")  # noqa: SIM115 (kept open)
        self._handles[shard] = handle
        return handle

    def _read(self, shard: int, member: _Member) -> bytes:
        try:
            handle = self._handle(shard)
            handle.seek(member.offset)
            content = handle.read(member.size)
        except OSError as err:
            raise SampleError(f"{self.shards[shard]}: read failed ({err})") from None
        if len(content) != member.size:
            raise SampleError(f"{self.shards[shard]}: truncated (a member ends past the end of the file)")
        return content
