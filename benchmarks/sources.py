"""Measurement 8: build throughput from every source kind against the JSONL path, and training data-wait when the
shards are read over HTTP.

The same samples of the demo corpus are written as a JSONL manifest with media files beside it, a TSV table of
the same files, a parquet file written by `datasets` (images and audio embedded as bytes), and WebDataset tars;
each is built with `zidong.data.build` on the same settings and worker count. The remote run is the trainer on the
tiny recipe reading the demo's training shards from a loopback HTTP server (a process of its own) through the
shard cache, timed like measurement 4's local run. Loopback has no network latency or bandwidth limit: the row
measures what fetching, verifying and caching cost the training step, not a given network.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import Result, Settings, median
from benchmarks.training import CONTRASTIVE_ONLY, TrainingBench
from zidong.data.build import build
from zidong.data.normalize import BuildSettings
from zidong.data.shards import ShardFolder
from zidong.data.sources import open_source
from zidong.train.metrics import METRICS_FILE
from zidong.train.trainer import pretrain

KINDS = ("jsonl", "tsv", "parquet", "webdataset")
WORKERS = 2  # build worker processes, the same for every kind


def sources(bench: TrainingBench) -> list[Result]:
    """The two rows of measurement 8 (`bench`: the TrainingBench of measurements 1-5)."""
    return [build_throughput(bench.settings), remote_data_wait(bench)]


def build_throughput(settings: Settings) -> Result:
    count = 96 if settings.quick else 480
    folder = settings.work / "sources"
    locations = write_sources(settings.corpus / "train", count, folder)
    rates: dict[str, float] = {}
    for kind, location in locations.items():
        started = time.perf_counter()
        result = build(open_source(location), folder / f"built-{kind}", BuildSettings(shard_size=200), WORKERS)
        rates[kind] = result.samples / (time.perf_counter() - started)
        if result.samples != count:
            raise RuntimeError(f"the {kind} source built {result.samples} of {count} samples")
    ratios = {kind: rates[kind] / rates["jsonl"] for kind in KINDS[1:]}
    details = {"samples": count, "workers": WORKERS, "samples_per_s": rates, "relative_to_jsonl": ratios}
    return Result(8, "build throughput, slowest other source kind / JSONL", min(ratios.values()), ">= 0.50", details)


def remote_data_wait(bench: TrainingBench) -> Result:
    local = bench.zidong_run
    steps = bench.settings.warmup_steps + bench.settings.timed_steps
    corpus = bench.settings.corpus
    output = bench.settings.work / "remote-run"
    with serve(corpus) as url:
        recipe = bench.recipe(
            f"output_dir={output}",
            f"train.max_steps={steps}",
            f"checkpoint.every_steps={steps}",
            f"data.train.0.path={url}/train",
            f"data.cache_dir={bench.settings.work / 'shard-cache'}",
            *CONTRASTIVE_ONLY,
        )
        pretrain(recipe)
    records = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
    every = [r for r in records if r.get("kind") == "train"]
    timed = every[bench.settings.warmup_steps :]
    seconds = [r["seconds_per_step"] for r in timed]
    waited = sum(r["data_wait_fraction"] * r["seconds_per_step"] for r in timed) / sum(seconds)
    details: dict[str, Any] = {
        # the warm-up steps hold the first fetches, which no prefetch can hide: stated, not hidden
        "data_wait_fraction_with_warmup": sum(r["data_wait_fraction"] * r["seconds_per_step"] for r in every)
        / sum(r["seconds_per_step"] for r in every),
        "seconds_per_step": median(seconds),
        "local_seconds_per_step": median(local["seconds_per_step"]),
        "local_data_wait_fraction": local["data_wait_fraction"],
        "shards": len(ShardFolder(corpus / "train").shards),
    }
    return Result(8, "data-wait fraction, training shards over loopback HTTP", waited, "<= 0.05", details)


def write_sources(shards: Path, count: int, folder: Path) -> dict[str, str]:
    """The first `count` samples of a shard folder as each source kind; returns kind -> location."""
    import datasets

    media = folder / "media"
    media.mkdir(parents=True, exist_ok=True)
    reader = ShardFolder(shards)
    refs = ((shard, position) for shard, total in enumerate(reader.counts) for position in range(total))
    samples = [reader.read(shard, position) for shard, position in itertools.islice(refs, count)]
    reader.close()
    rows = []
    for sample in samples:
        row: dict[str, Any] = {"id": sample.key, "lang": sample.meta.get("lang")}
        for extension, content in sample.files.items():
            if extension == "txt":
                row["text"] = content.decode("utf-8")
            else:
                (media / f"{sample.key}.{extension}").write_bytes(content)
                row["audio" if extension == "flac" else "image"] = f"media/{sample.key}.{extension}"
        rows.append(row)
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    header = ["id", "text", "image", "audio", "lang"]
    lines = ["\t".join(header)] + ["\t".join(str(row.get(name) or "") for name in header) for row in rows]
    (folder / "table.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def embedded(path: str | None) -> dict | None:
        return None if path is None else {"bytes": (folder / path).read_bytes(), "path": Path(path).name}

    stored = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features(
        {"id": datasets.Value("string"), "text": datasets.Value("string"), "image": stored, "audio": stored}
    )
    columns = {
        "id": [row["id"] for row in rows],
        "text": [row.get("text") for row in rows],
        "image": [embedded(row.get("image")) for row in rows],
        "audio": [embedded(row.get("audio")) for row in rows],
    }
    dataset = datasets.Dataset.from_dict(columns, features=features)
    dataset = dataset.cast_column("image", datasets.Image()).cast_column("audio", datasets.Audio())
    dataset.to_parquet(str(folder / "data.parquet"))
    tars = folder / "tars"
    tars.mkdir(exist_ok=True)
    for start in range(0, len(samples), 100):
        with tarfile.open(tars / f"{start // 100:05d}.tar", "w") as archive:
            for sample in samples[start : start + 100]:
                members = {**sample.files, "json": json.dumps({"lang": sample.meta.get("lang")}).encode()}
                for extension, content in members.items():
                    info = tarfile.TarInfo(f"{sample.key}.{extension}")
                    info.size = len(content)
                    archive.addfile(info, io.BytesIO(content))
    return {
        "jsonl": str(folder / "manifest.jsonl"),
        "tsv": str(folder / "table.tsv"),
        "parquet": str(folder / "data.parquet"),
        "webdataset": str(tars),
    }


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """`folder` over HTTP on the loopback interface, from a process of its own (not competing with training for
    this process's interpreter lock); yields its URL."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/train/index.json", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the HTTP server for {folder} did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait()


__all__ = ["build_throughput", "remote_data_wait", "sources", "write_sources"]
