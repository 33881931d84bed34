"""Shard folders at URLs: read over loopback HTTP into a bounded cache, checked against the local folder."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from tests.data.corpus import make_corpus
from tests.helpers import free_port, serve_folder
from zidong import ZidongProcessor
from zidong.data.remote import RemoteError, ShardCache, download_lock
from zidong.data.shards import ShardFolder, load_index
from zidong.data.stream import StreamLoader, StreamSettings
from zidong.data.transforms import SamplePipeline
from zidong.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 samples in 3 shards of 16."""
    return make_corpus(tmp_path_factory.mktemp("remote"), 48)


def shard_bytes(folder: Path) -> list[int]:
    return [entry["bytes"] for entry in load_index(folder)["shards"]]


def every_sample(folder: ShardFolder) -> list:
    return [folder.read(shard, position) for shard, count in enumerate(folder.counts) for position in range(count)]


def shard_requests(requested: list[str]) -> list[str]:
    return [path.rsplit("/", 1)[1] for path in requested if path.endswith(".tar")]


def test_a_folder_at_a_url_reads_the_samples_of_the_local_folder(corpus: Path, tmp_path: Path) -> None:
    with serve_folder(corpus.parent) as (url, requested):
        remote = ShardFolder(f"{url}/{corpus.name}", ShardCache(tmp_path / "cache", 10**9))
        samples = every_sample(remote)
        remote.close()
    local = every_sample(ShardFolder(corpus))
    assert len(samples) == 48
    assert samples == local  # keys, metadata and every member's bytes
    index = load_index(corpus)
    # each shard fetched once, kept under its sha256, and its bytes are the local shard's
    assert sorted(shard_requests(requested)) == sorted(entry["shard"] for entry in index["shards"])
    cached = {path.name for path in (tmp_path / "cache").glob("*.tar")}
    assert cached == {f"{entry['sha256']}.tar" for entry in index["shards"]}
    for entry in index["shards"]:
        assert (tmp_path / "cache" / f"{entry['sha256']}.tar").read_bytes() == (corpus / entry["shard"]).read_bytes()


def test_the_cache_evicts_the_least_recently_opened_shard_to_stay_within_its_bound(
    corpus: Path, tmp_path: Path
) -> None:
    sizes = shard_bytes(corpus)
    bound = sizes[0] + sizes[1] + sizes[2] // 2  # two shards fit, three do not
    cache = ShardCache(tmp_path / "cache", bound)
    index = load_index(corpus)
    with serve_folder(corpus.parent) as (url, requested):
        folder = ShardFolder(f"{url}/{corpus.name}", cache)
        folder.MAX_OPEN = 1  # close each shard when the next opens, so an evicted one must be fetched again
        held = []
        for shard in (0, 1, 0, 2, 1, 0):
            folder.read(shard, 0)
            held.append(sorted(p.name for p in (tmp_path / "cache").glob("*.tar")))
            assert cache.used_bytes() <= bound
        folder.close()
    sha = [entry["sha256"] + ".tar" for entry in index["shards"]]
    # opening 0 again made 1 the least recently used: 2 evicted 1, then 1 evicted 0, and 0 evicted 2
    assert held == [
        [sha[0]],
        sorted([sha[0], sha[1]]),
        sorted([sha[0], sha[1]]),
        sorted([sha[0], sha[2]]),
        sorted([sha[2], sha[1]]),
        sorted([sha[1], sha[0]]),
    ]
    names = [entry["shard"] for entry in index["shards"]]
    assert shard_requests(requested) == [names[0], names[1], names[2], names[1], names[0]]


def test_a_shard_whose_bytes_differ_from_the_index_is_refused_and_not_kept(corpus: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(corpus, tmp_path / "served" / "shards")
    victim = copy / load_index(copy)["shards"][1]["shard"]
    content = bytearray(victim.read_bytes())
    content[600] ^= 0xFF  # same size, one byte changed: only the checksum can tell
    victim.write_bytes(bytes(content))
    with serve_folder(tmp_path / "served") as (url, _):
        folder = ShardFolder(f"{url}/shards", ShardCache(tmp_path / "cache", 10**9))
        folder.read(0, 0)
        with pytest.raises(RemoteError, match=rf"{victim.name} does not match its index.json .*upload the whole"):
            folder.read(1, 0)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir() if p.is_file() and p.suffix != ".lock") == [".tar"]


def test_a_bad_remote_shard_stops_the_stream_with_its_message_from_a_worker(
    corpus: Path, tmp_path: Path, processor: ZidongProcessor
) -> None:
    copy = shutil.copytree(corpus, tmp_path / "served" / "shards")
    for entry in load_index(copy)["shards"]:  # every shard changed after its index was written
        shard = copy / entry["shard"]
        content = bytearray(shard.read_bytes())
        content[600] ^= 0xFF
        shard.write_bytes(bytes(content))
    settings = StreamSettings(batch_size=4, seed=1, bucket_pool=2)
    pipeline = SamplePipeline(processor, train=True)
    with serve_folder(tmp_path / "served") as (url, _):
        cache = ShardCache(tmp_path / "cache", 10**9)
        loader = StreamLoader([(f"{url}/shards", 1.0)], settings, pipeline, num_workers=2, cache=cache)
        with pytest.raises(
            RemoteError, match=r"does not match its index.json .*upload the whole folder again"
        ) as caught:
            next(loader)
        loader.close()
    assert "Traceback" not in str(caught.value)  # the message alone, as the CLI prints it


def test_readers_sharing_a_cache_download_each_shard_once(corpus: Path, tmp_path: Path) -> None:
    entries = load_index(corpus)["shards"]
    with serve_folder(corpus.parent) as (url, requested):

        def read_every_shard(_: int) -> list[bytes]:  # a reader of its own: its own cache object and locks
            cache = ShardCache(tmp_path / "cache", 10**9)
            contents = []
            for entry in entries:
                with cache.open(f"{url}/{corpus.name}/{entry['shard']}", entry["sha256"], entry["bytes"]) as handle:
                    contents.append(handle.read())
            return contents

        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(read_every_shard, range(6)))
    assert sorted(shard_requests(requested)) == sorted(entry["shard"] for entry in entries)
    local = [(corpus / entry["shard"]).read_bytes() for entry in entries]
    assert all(contents == local for contents in results)


def test_a_download_cut_off_midway_is_never_read(corpus: Path, tmp_path: Path) -> None:
    entry = load_index(corpus)["shards"][0]
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    # what a process killed during the download leaves: the first half, under the name of a download in progress
    partial = cache_dir / f"{entry['sha256']}.{entry['bytes']}.part"
    partial.write_bytes((corpus / entry["shard"]).read_bytes()[: entry["bytes"] // 2])
    with serve_folder(corpus.parent) as (url, requested):
        folder = ShardFolder(f"{url}/{corpus.name}", ShardCache(cache_dir, 10**9))
        assert [folder.read(0, p) for p in range(16)] == [ShardFolder(corpus).read(0, p) for p in range(16)]
    assert shard_requests(requested) == [entry["shard"]]
    assert not partial.exists()


def test_a_download_in_progress_holds_its_room(corpus: Path, tmp_path: Path) -> None:
    sizes = shard_bytes(corpus)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    other = cache_dir / f"{'0' * 64}.{sizes[1]}.part"  # another process's download of a shard not in this folder
    other.write_bytes(b"")
    cache = ShardCache(cache_dir, sizes[0] + sizes[1])
    (cache_dir / "locks").mkdir()
    with FileLock(download_lock(cache_dir, "0" * 64)):  # ... which is alive
        assert cache.used_bytes() == sizes[1]
    assert cache.used_bytes() == 0  # and once it died, its leftover is cleared
    assert not other.exists()


def test_the_cache_keeps_a_bounded_number_of_lock_files(corpus: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    legacy = cache_dir / f"{'a' * 64}.lock"  # what earlier versions left behind: one lock file per shard ever read
    legacy.write_bytes(b"")
    shards = load_index(corpus)["shards"]
    with serve_folder(corpus.parent) as (url, _):
        folder = ShardFolder(f"{url}/{corpus.name}", ShardCache(cache_dir, 10**9))
        for number in range(len(shards)):
            folder.read(number, 0)
    assert not legacy.exists()
    assert {p.name for p in cache_dir.glob("*.lock")} <= {".cache.lock"}  # no lock file per shard
    stripes = {entry["sha256"][:2] + ".lock" for entry in shards}
    assert {p.name for p in (cache_dir / "locks").iterdir()} == stripes  # at most 256, whatever the shard count


def test_a_cache_smaller_than_a_shard_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    with serve_folder(corpus.parent) as (url, _):
        folder = ShardFolder(f"{url}/{corpus.name}", ShardCache(tmp_path / "cache", 1000))
        with pytest.raises(UserError, match=r"does not fit in the shard cache \(0\.000 GB\): raise data.cache_gb"):
            folder.read(0, 0)


@pytest.mark.parametrize("where", ["no server", "no index", "forbidden"])
def test_an_unreachable_folder_names_the_url(corpus: Path, tmp_path: Path, where: str) -> None:
    with serve_folder(tmp_path, refuse=where == "forbidden") as (url, _):
        if where == "no server":
            url = f"http://127.0.0.1:{free_port()}"
        expected = rf"cannot read {re.escape(url)}/shards/index.json: not found, not permitted, or the server cannot"
        with pytest.raises(RemoteError, match=expected):
            ShardFolder(f"{url}/shards", ShardCache(tmp_path / "cache", 10**9))


def test_a_shard_the_server_refuses_names_the_shard_and_the_status(corpus: Path, tmp_path: Path) -> None:
    served = shutil.copytree(corpus, tmp_path / "served" / "shards")
    with serve_folder(tmp_path / "served", refuse=".tar") as (url, requested):
        folder = ShardFolder(f"{url}/shards", ShardCache(tmp_path / "cache", 10**9))
        shard = load_index(served)["shards"][0]["shard"]
        with pytest.raises(RemoteError, match=rf"cannot fetch the shard {re.escape(url)}/shards/{shard}: .*403"):
            folder.read(0, 0)
    assert len([path for path in requested if path.endswith(shard)]) == 3  # tried three times
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix in (".tar", ".part")]


def test_the_stream_over_http_hands_out_the_local_streams_batches(
    corpus: Path, tmp_path: Path, processor: ZidongProcessor
) -> None:
    settings = StreamSettings(batch_size=4, seed=1, bucket_pool=2, shuffle_window=8)
    pipeline = SamplePipeline(processor, train=True)

    def batches(path: str, count: int, saved=None) -> tuple[list, dict]:
        cache = ShardCache(tmp_path / "cache", 10**9)
        loader = StreamLoader([(path, 1.0)], settings, pipeline, num_workers=2, saved=saved, cache=cache)
        out = [next(loader) for _ in range(count)]
        state = loader.state_dict()
        loader.close()
        return out, state

    local, _ = batches(str(corpus), 10)
    with serve_folder(corpus.parent) as (url, requested):
        first, state = batches(f"{url}/{corpus.name}", 4)
        rest, _ = batches(f"{url}/{corpus.name}", 6, saved=[state])
    # every shard was needed (how often it was fetched depends on when the workers were stopped mid-prefetch)
    assert len(set(shard_requests(requested))) == 3
    for expected, got in zip(local, first + rest, strict=True):
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize("where", ["local", "http"])
def test_a_reader_keeps_few_shards_open_however_many_it_reads(tmp_path: Path, where: str) -> None:
    corpus = make_corpus(tmp_path / "many", 24, shard_size=2)  # 12 shards

    # the reader's shards only: other tests of the process, and the server thread sending the corpus's shards,
    # hold files of their own open
    read_from = corpus if where == "local" else tmp_path / "cache"

    def open_shards() -> int:
        links = []
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile (the HTTP server's thread): not held
                links.append(os.readlink(fd))
        return sum(link.startswith(str(read_from)) and link.endswith(".tar") for link in links)

    with serve_folder(corpus.parent) as (url, _):
        location = corpus if where == "local" else f"{url}/{corpus.name}"
        folder = ShardFolder(location, ShardCache(tmp_path / "cache", 10**9))
        assert len(every_sample(folder)) == 24
        assert open_shards() == ShardFolder.MAX_OPEN
        folder.close()
        assert open_shards() == 0


@pytest.fixture
def fresh_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsspec's per-protocol settings and zidong's record of them, empty for this test and restored after it."""
    import fsspec.config

    from zidong.data import remote

    monkeypatch.setattr(fsspec.config, "conf", {})
    monkeypatch.setattr(remote, "_CONFIGURED", {})


def test_storage_options_reach_the_reads_of_the_trainer_and_its_workers(
    corpus: Path, tmp_path: Path, processor: ZidongProcessor, fresh_storage: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zidong.data.remote import configure_storage

    settings = StreamSettings(batch_size=4, seed=1, bucket_pool=2)
    pipeline = SamplePipeline(processor, train=True)
    with serve_folder(corpus.parent, token="s3cret") as (url, requested):
        with pytest.raises(RemoteError, match="not permitted"):  # no credentials: the server refuses the index
            ShardFolder(f"{url}/{corpus.name}", ShardCache(tmp_path / "refused", 10**9))
        monkeypatch.setenv("ZIDONG_TEST_TOKEN", "s3cret")
        configure_storage({"http": {"headers": {"Authorization": "Bearer $ZIDONG_TEST_TOKEN"}}})
        cache = ShardCache(tmp_path / "cache", 10**9)
        loader = StreamLoader([(f"{url}/{corpus.name}", 1.0)], settings, pipeline, num_workers=2, cache=cache)
        batches = [next(loader) for _ in range(4)]  # the workers (forkserver children) fetch the shards
        loader.close()
    assert shard_requests(requested)  # shards were fetched with the header, not found in some other cache
    local = StreamLoader([(str(corpus), 1.0)], settings, pipeline, num_workers=2)
    for expected in (next(local) for _ in range(4)):
        got = batches.pop(0)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected)
    local.close()


def test_a_storage_option_naming_an_unset_variable_or_malformed_is_a_clear_error(
    fresh_storage: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zidong.data.remote import configure_storage, parse_storage_options

    monkeypatch.delenv("ZIDONG_UNSET_KEY", raising=False)
    with pytest.raises(UserError, match=r"storage option s3.key: environment variable ZIDONG_UNSET_KEY is not set"):
        configure_storage({"s3": {"key": "${ZIDONG_UNSET_KEY}"}})
    assert parse_storage_options(["s3.endpoint_url=http://localhost:9000", "s3.anon=true"]) == {
        "s3": {"endpoint_url": "http://localhost:9000", "anon": True}
    }
    with pytest.raises(UserError, match=r"expected PROTOCOL\.KEY=VALUE"):
        parse_storage_options(["endpoint_url=http://localhost:9000"])


def test_bad_storage_options_exit_2_from_the_command_line_and_the_recipe(
    corpus: Path, tmp_path: Path, fresh_storage: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from zidong.cli import main

    monkeypatch.delenv("ZIDONG_UNSET_KEY", raising=False)
    out = tmp_path / "out"
    assert main(["data", "build", str(corpus), "--out", str(out), "--storage-option", "s3"]) == 2
    assert "--storage-option s3: expected PROTOCOL.KEY=VALUE" in capsys.readouterr().err
    recipe = "recipes/pretrain/tiny.yaml"
    overrides = [f"output_dir={tmp_path / 'run'}", "data.storage_options.s3.key=$ZIDONG_UNSET_KEY"]
    assert main(["pretrain", recipe, "--dry-run", *overrides]) == 2
    assert "storage option s3.key: environment variable ZIDONG_UNSET_KEY is not set" in capsys.readouterr().err
    assert not out.exists()
    assert not (tmp_path / "run").exists()
