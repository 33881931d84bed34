"""Shard folders at URLs: each shard fetched whole into a size-bounded local cache, verified, evicted LRU.

A shard folder may live anywhere fsspec reaches (`https://`, `s3://`, `gs://`, `hf://`, ...; the protocol's
package, e.g. s3fs, must be installed). Its `index.json` is read at open; a shard is fetched the first time a
reader needs it (or earlier, when the stream prefetches the shards its plan reads next), checked against the
size and sha256 in the index, and only then renamed into the cache under its sha256. A download cut off midway
leaves a `.part` file that no reader ever opens. Everything after the fetch is the local reader.

The cache folder (`data.cache_dir`) is shared by every process of a machine: a shard is downloaded once (under a
lock; 256 lock files in `locks/` serve every shard), and the files in the folder, finished or downloading, never add up to more than `data.cache_gb`:
before a download, the least recently opened shards are deleted to make room. A shard deleted while a reader
still has it open stays readable to it; its space is freed when that reader closes it (a reader keeps at most
`ShardFolder.MAX_OPEN` shards open).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from zidong.errors import UserError

if TYPE_CHECKING:
    from filelock import FileLock

_UNSET_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")  # what os.path.expandvars leaves of an unset variable
_CONFIGURED: dict[str, dict[str, Any]] = {}
CHUNK = 1 << 20
ATTEMPTS = 3  # a fetch that fails this many times in a row is an error
WAIT_FOR_ROOM_S = 600.0  # how long a download waits for other processes' downloads to leave room
DEFAULT_CACHE_GB = 20.0


class RemoteError(UserError):
    """A remote shard folder that cannot be read, or whose shards do not match their index."""


def configure_storage(options: Mapping[str, Mapping[str, Any]]) -> None:
    """Give fsspec's filesystems of each protocol these settings (`{"s3": {"endpoint_url": ...}}`: what
    `s3fs.S3FileSystem(...)` takes), through fsspec's own per-protocol configuration, so every read of this
    process (shards, build sources, datasets' hub reads) and of the data workers it starts uses them. Strings may
    name environment variables (`$NAME`, `${NAME}`, at any depth), expanded here, so that recipes and run records
    hold the reference, never the secret. UserError for a variable that is not set."""
    import fsspec.config

    for protocol, settings in options.items():
        expanded = {key: _expand(value, f"{protocol}.{key}") for key, value in settings.items()}
        fsspec.config.conf.setdefault(protocol, {}).update(expanded)
        _CONFIGURED.setdefault(protocol, {}).update(expanded)


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return {key: _expand(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_expand(item, where) for item in value]
    if not isinstance(value, str):
        return value
    expanded = os.path.expandvars(value)
    missing = _UNSET_VARIABLE.search(expanded)
    if missing:
        raise UserError(
            f"storage option {where}: environment variable {missing.group(1) or missing.group(2)} is not set "
            "(export it, or give the value itself)"
        )
    return expanded


def configured_storage() -> dict[str, dict[str, Any]]:
    """What `configure_storage` gave fsspec in this process (to hand to processes that do not inherit it)."""
    return {protocol: dict(settings) for protocol, settings in _CONFIGURED.items()}


def parse_storage_options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """`--storage-option s3.endpoint_url=http://host:9000` (repeatable) -> {"s3": {"endpoint_url": ...}}; the
    value is read as YAML (`anon=true` is a bool). UserError on anything else."""
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        protocol, dot, key = name.partition(".")
        if not sep or not dot or not protocol or not key:
            raise UserError(
                f"--storage-option {pair}: expected PROTOCOL.KEY=VALUE, e.g. s3.endpoint_url=http://localhost:9000"
            )
        options.setdefault(protocol, {})[key] = yaml.safe_load(value) if value else ""
    return options


def is_url(location: str | os.PathLike) -> bool:
    """Is `location` a URL (`scheme://...`) rather than a local path?"""
    return "://" in str(location)


def join_url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def remote_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed remote read raises: fsspec maps most to OSError; an HTTP status error, a
    missing protocol package (ImportError) and a malformed URL (ValueError) come as themselves."""
    import aiohttp

    return OSError, ValueError, ImportError, aiohttp.ClientError


def read_url(url: str) -> bytes:
    """The whole content of `url`. Raises RemoteError naming the URL when it cannot be read."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as stream:
            return stream.read()
    except remote_errors() as err:
        raise RemoteError(f"cannot read {url}: {_reason(err)}") from None


def url_lines(url: str) -> Iterator[str]:
    """The lines of the UTF-8 text file at `url`, streamed. Raises RemoteError naming the URL when it cannot be
    read, UserError when it is not UTF-8."""
    import fsspec

    try:
        with fsspec.open(url, "rt", encoding="utf-8") as stream:
            yield from stream
    except UnicodeDecodeError as err:
        raise UserError(f"{url} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except remote_errors() as err:
        raise RemoteError(f"cannot read {url}: {_reason(err)}") from None


def read_remote_index(url: str) -> dict[str, Any]:
    """The `index.json` of the shard folder at `url` (not yet checked; see shards.load_index)."""
    index_url = join_url(url, "index.json")
    try:
        content = read_url(index_url)
    except RemoteError as err:
        raise RemoteError(
            f"{err}; is {url} a zidong shard folder (one that holds index.json), and can this machine reach it?"
        ) from None
    try:
        return json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RemoteError(f"cannot read {index_url}: {err}") from None


def _reason(err: BaseException) -> str:
    """Why a remote read failed, with what to check. fsspec reports a missing file, a refused connection and (for
    HTTP) a refused permission alike, as FileNotFoundError."""
    if isinstance(err, FileNotFoundError):
        return (
            "not found, not permitted, or the server cannot be reached (check the URL, and this machine's access to it)"
        )
    if isinstance(err, ImportError):
        return f"{err} (the package for this kind of URL is not installed)"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


class ShardCache:
    """Verified copies of remote shards in `directory`, named by sha256, at most `limit_bytes` in all.

    Safe to share between the processes of a machine (file locks); not meant for a network file system.
    """

    def __init__(self, directory: str | Path, limit_bytes: int):
        self.directory = Path(directory).expanduser()
        self.limit_bytes = int(limit_bytes)

    @classmethod
    def default(cls) -> ShardCache:
        """`$XDG_CACHE_HOME/zidong/shards` (`~/.cache/zidong/shards`), DEFAULT_CACHE_GB: what `zidong eval` and
        `zidong tokenizer train` use; a training run takes `data.cache_dir` and `data.cache_gb`."""
        return cls(default_cache_dir(), int(DEFAULT_CACHE_GB * 1e9))

    def open(self, url: str, sha256: str, size: int) -> BinaryIO:
        """An open handle on the verified local copy of the shard at `url`, fetched first if needed.

        Raises RemoteError when the shard cannot be fetched (after ATTEMPTS tries) or its bytes do not match
        `sha256`, and UserError when the cache is too small to hold it.
        """
        path = self.directory / f"{sha256}.tar"
        self._make_directory()
        for _ in range(ATTEMPTS):
            with self._cache_lock():
                handle = _open_touched(path)
            if handle is not None:
                return handle
            # (again when another process short of room evicted it between the fetch and the open)
            self.fetch(url, sha256, size)
        raise UserError(
            f"the shard cache {self.directory} ({self.limit_bytes / 1e9:.3f} GB) is too small for the readers "
            f"sharing it: {url} was evicted {ATTEMPTS} times before it could be opened; raise data.cache_gb"
        )

    def fetch(self, url: str, sha256: str, size: int) -> None:
        """Make sure the cache holds the shard (download, verify, rename into place); one download per shard
        across the processes sharing the cache."""
        path = self.directory / f"{sha256}.tar"
        self._make_directory()
        from filelock import FileLock  # imported where used: `zidong --help` reads the source kinds from here

        with FileLock(download_lock(self.directory, sha256)):
            if path.is_file():
                return
            part = self.directory / f"{sha256}.{size}.part"
            self._reserve(part, size, url)
            try:
                self._download(url, part, sha256, size)
                os.replace(part, path)
            finally:
                part.unlink(missing_ok=True)

    def _make_directory(self) -> None:
        try:
            (self.directory / LOCKS).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the shard cache {self.directory} (data.cache_dir): {err}") from None

    def _cache_lock(self) -> FileLock:
        """Held while the folder's content is counted or changed. A fresh lock each time: it may be taken by
        several threads of one process (a prefetch and a read), and the object must pickle to data workers."""
        from filelock import FileLock

        return FileLock(self.directory / ".cache.lock")

    def used_bytes(self) -> int:
        """Bytes held by finished shards plus those reserved by downloads in progress."""
        return sum(size for _, size, _ in self._entries())

    def _reserve(self, part: Path, size: int, url: str) -> None:
        """Delete least recently opened shards until `size` more bytes fit, then claim them with `part`."""
        if size > self.limit_bytes:
            raise UserError(
                f"the shard {url} ({size / 1e9:.3f} GB) does not fit in the shard cache "
                f"({self.limit_bytes / 1e9:.3f} GB): raise data.cache_gb"
            )
        deadline = time.monotonic() + WAIT_FOR_ROOM_S
        while True:
            with self._cache_lock():
                entries = self._entries()
                used = sum(entry_size for _, entry_size, _ in entries)
                for entry, entry_size, finished in sorted(entries, key=lambda e: e[2] or float("inf")):
                    if used + size <= self.limit_bytes or not finished:
                        break
                    with suppress(FileNotFoundError):
                        os.unlink(entry)
                    used -= entry_size
                if used + size <= self.limit_bytes:
                    part.write_bytes(b"")
                    return
            if time.monotonic() > deadline:
                raise UserError(
                    f"the shard cache {self.directory} ({self.limit_bytes / 1e9:.3f} GB) stayed full of downloads "
                    f"in progress for {WAIT_FOR_ROOM_S:.0f} s: raise data.cache_gb (each reader needs about two "
                    "shards at a time)"
                )
            time.sleep(0.2)

    def _entries(self) -> list[tuple[str, int, int | None]]:
        """(path, bytes, last opened) of each finished shard, and (path, reserved bytes, None) of each download in
        progress; a `.part` file whose download died with its process is deleted on the way."""
        entries = []
        with os.scandir(self.directory) as found:  # one listing, no Path per file: the cache may hold 100k shards
            for entry in found:
                with suppress(FileNotFoundError):  # deleted meanwhile by a process not holding the lock (a fetch)
                    if entry.name.endswith(".tar"):
                        stat = entry.stat()
                        entries.append((entry.path, stat.st_size, stat.st_mtime_ns))
                    elif entry.name.endswith(".part"):
                        sha256, size = entry.name.split(".")[:2]
                        if _download_alive(download_lock(self.directory, sha256)):
                            entries.append((entry.path, int(size), None))
                        else:
                            os.unlink(entry.path)
                    elif _LEGACY_LOCK.fullmatch(entry.name):  # one lock per shard, as earlier versions left them
                        os.unlink(entry.path)
        return entries

    def _download(self, url: str, part: Path, sha256: str, size: int) -> None:
        """Copy `url` to `part` (streamed, so servers without range requests do too), then check size and sha256."""
        import fsspec

        for attempt in range(1, ATTEMPTS + 1):
            try:
                filesystem, path = fsspec.core.url_to_fs(url)
                filesystem.get_file(path, str(part))
                break
            except remote_errors() as err:
                if attempt == ATTEMPTS:
                    raise RemoteError(f"cannot fetch the shard {url}: {_reason(err)}") from None
                time.sleep(0.5 * attempt)
        written = part.stat().st_size
        digest = hashlib.sha256()
        with part.open("rb") as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
        if written != size or digest.hexdigest() != sha256:
            raise RemoteError(
                f"the shard {url} does not match its index.json ({written} bytes, sha256 "
                f"{digest.hexdigest()[:16]}...; the index says {size} bytes, sha256 {sha256[:16]}...): the remote "
                "folder changed after its index was written; upload the whole folder again"
            )


def list_url(folder: str, pattern: str) -> list[str]:
    """The URLs of the files in the folder at `folder` whose names match `pattern` (e.g. `*.tar`), sorted; a web
    server must serve the folder as a page of links."""
    import fsspec

    try:
        filesystem, path = fsspec.core.url_to_fs(folder)
        return sorted(filesystem.unstrip_protocol(found) for found in filesystem.glob(f"{path.rstrip('/')}/{pattern}"))
    except remote_errors() as err:
        raise RemoteError(f"cannot list {folder}: {_reason(err)}") from None


def fetch_files(urls: list[str], folder: Path) -> list[Path]:
    """Local copies of the files at `urls` under `folder` (each keeps its name, in a folder of its own). A copy whose
    size is the remote file's is reused, so a resumed build does not download again; a cut-off download leaves
    only a `.part` file."""
    import fsspec

    copies = []
    for url in urls:
        target = folder / hashlib.sha256(url.encode()).hexdigest()[:16] / url.rstrip("/").rsplit("/", 1)[-1]
        try:
            filesystem, path = fsspec.core.url_to_fs(url)
            size = filesystem.size(path)
            if not (target.is_file() and target.stat().st_size == size):
                target.parent.mkdir(parents=True, exist_ok=True)
                part = target.with_name(target.name + ".part")
                filesystem.get_file(path, str(part))
                os.replace(part, target)
        except remote_errors() as err:
            raise RemoteError(f"cannot fetch {url}: {_reason(err)}") from None
        copies.append(target)
    return copies


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zidong" / "shards"


def _open_touched(path: Path) -> BinaryIO | None:
    """Open a finished shard and mark it as recently used (its mtime), or None when it is not in the cache."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return None
    now = time.time_ns()  # explicit: a file's own timestamps come from a clock that ticks only every few ms
    os.utime(path, ns=(now, now))
    return handle


LOCKS = "locks"
_LEGACY_LOCK = re.compile(r"[0-9a-f]{64}\.lock")


def download_lock(directory: Path, sha256: str) -> Path:
    """The lock a shard's download holds: one of 256 files (by the checksum's first two hex digits), so that a
    cache holds at most 256 lock files however many shards have passed through it. Lock files are never deleted
    (deleting one that another process is about to lock would let two processes download one shard); two
    downloads on one stripe wait for each other, one pair in 256."""
    return directory / LOCKS / f"{sha256[:2]}.lock"


def _download_alive(lock_path: Path) -> bool:
    """Does some process hold the lock of this download (a dead one releases it)?"""
    from filelock import FileLock, Timeout

    probe = FileLock(lock_path, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


__all__ = [
    "DEFAULT_CACHE_GB",
    "RemoteError",
    "ShardCache",
    "default_cache_dir",
    "fetch_files",
    "is_url",
    "join_url",
    "list_url",
    "read_remote_index",
    "read_url",
    "url_lines",
]
