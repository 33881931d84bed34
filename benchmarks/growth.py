"""Measurement 10: how the pipeline's fixed costs grow toward a lab's run, each measured at three sizes or more.

Real scale cannot run on a development machine, so each cost is measured on what its size depends on, built
synthetically, through the library's own functions:

- data plan: one reader slot's `EpochPlan` (first shuffle window and a far one) for 1M to 2B samples in shards of
  10,000, and 8 to 8,192 slots; peak memory traced (numpy allocates through Python's tracer).
- shard index: `ShardFolder` opening an `index.json` of 1,000 to 200,000 shards (what every process and every data
  worker does at start); time, traced peak memory, and the pickled size each DataLoader worker receives.
- stream state: the `data-rank{r}.json` of one process (batch 256, bucketing pool 128, 8 workers, pools full),
  and resuming on another layout (R x 8 -> 2R x 8, R = 8 to 4,096 processes): parsing `data-layout.json`, the
  re-split of one new process's share, and the saved files it reads.
- checkpoint: write and read of model + AdamW state (fp32) of the tiny, base and large presets through
  `save_checkpoint` / `load_checkpoint`, one process; the trainer waits for the whole write at every save.
- shard cache: making room for one download (`ShardCache._reserve`: a scan of the cache folder under its lock)
  with 1,000 to 100,000 shards cached.
- build: `zidong data build` throughput with 1, 2 and 4 worker processes, and merging the indexes of 1,000
  `--part` tasks.

Each item's growth is the slope of log(cost) against log(size) (1: linear, 0: flat). `--quick` uses smaller sizes.
"""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Result, Settings, median, timings
from benchmarks.sources import write_sources
from zidong.data.build import STATE_DIR, ShardStats, build, merge_if_complete
from zidong.data.normalize import BuildSettings
from zidong.data.remote import ShardCache
from zidong.data.resplit import ref_pieces, resplit
from zidong.data.saved_stream import SavedStreams, layout_entry
from zidong.data.shards import ShardFolder, write_index
from zidong.data.slots import EpochPlan, fresh_state, slot_share
from zidong.data.sources import open_source
from zidong.data.stream import STATE_FORMAT

SHARD_SAMPLES = 10_000  # samples per shard of the synthetic corpora
WINDOW = 10_000  # data.shuffle_window's default
MB = 1e6


def growth(settings: Settings) -> list[Result]:
    """Every row of measurement 10."""
    rows: list[Result] = []
    for measure in (plan_memory, index_cost, stream_state, shard_cache, build_cost, checkpoint_cost):
        rows.extend(measure(settings))
    return rows


def slope(sizes: list[float], costs: list[float]) -> float:
    """The fitted exponent k of cost ~ size^k (least squares in log-log)."""
    logs = [math.log(max(cost, 1e-12)) for cost in costs]
    return round(float(np.polyfit([math.log(size) for size in sizes], logs, 1)[0]), 2)


def traced(work: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MB traced) of `work()`."""
    gc.collect()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = work()
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, seconds, peak / MB


def plan_memory(settings: Settings) -> list[Result]:
    corpora = [1_000_000, 100_000_000, 2_000_000_000]
    slot_counts = [8, 64, 8192]

    def one(samples: int, slots: int) -> dict[str, float]:
        counts = [SHARD_SAMPLES] * (samples // SHARD_SAMPLES)  # the index's counts: measured on their own below

        def read() -> int:
            plan = EpochPlan(counts, 0, 0, 0, slots // 2, slots, WINDOW)
            return len(plan.rows(0, WINDOW)) + len(plan.rows(len(plan) - WINDOW, len(plan)))

        _, seconds, peak = traced(read)
        return {"samples": samples, "slots": slots, "peak_mb": round(peak, 2), "seconds": round(seconds, 4)}

    by_corpus = [one(samples, 64) for samples in corpora]
    by_slots = [one(corpora[-1], slots) for slots in slot_counts]
    details = {
        "by_corpus_at_64_slots": by_corpus,
        "by_slots_at_2B": by_slots,
        "memory_slope_vs_corpus": slope(corpora, [row["peak_mb"] for row in by_corpus]),
        "memory_slope_vs_slots": slope(slot_counts, [row["peak_mb"] for row in by_slots]),
        "shard_samples": SHARD_SAMPLES,
        "shuffle_window": WINDOW,
    }
    return [
        Result(
            10, "data plan: peak MB per reader slot, 2B samples, 64 slots", by_corpus[-1]["peak_mb"], "<= 50", details
        )
    ]


def index_cost(settings: Settings) -> list[Result]:
    shard_counts = [1_000, 10_000, 50_000 if settings.quick else 200_000]
    rows = []
    for shards in shard_counts:
        folder = settings.work / "growth-index" / str(shards)
        folder.mkdir(parents=True, exist_ok=True)
        entries = [
            {"shard": f"{n // 10_000:04d}-{n % 10_000:05d}.tar", "samples": SHARD_SAMPLES, "bytes": 1 << 30,
             "sha256": f"{n:064x}"}
            for n in range(shards)
        ]  # fmt: skip
        write_index(folder, {"samples": shards * SHARD_SAMPLES, "shards": entries}, [])
        del entries
        opened, _, peak = traced(lambda folder=folder: ShardFolder(folder))
        seconds = median(timings(lambda folder=folder: ShardFolder(folder), 0, 3))  # untraced: tracing slows parsing
        rows.append(
            {
                "shards": shards,
                "index_mb": round((folder / "index.json").stat().st_size / MB, 2),
                "seconds": round(seconds, 3),
                "peak_mb": round(peak, 1),
                "pickled_mb": round(len(pickle.dumps(opened)) / MB, 2),
            }
        )
    largest = rows[-1]
    details = {
        "by_shards": rows,
        "seconds_slope": slope(shard_counts, [row["seconds"] for row in rows]),
        "memory_slope": slope(shard_counts, [row["peak_mb"] for row in rows]),
    }
    label = f"{largest['shards'] // 1000}k"
    return [
        Result(10, f"shard index: seconds to open index.json of {label} shards", largest["seconds"], "<= 2", details),
        Result(10, f"shard index: peak MB to open index.json of {label} shards", largest["peak_mb"], "<= 200", {}),
    ]


def synthetic_stream_state(rank: int, ranks: int, workers: int, batch: int, pool: int, total: int) -> dict[str, Any]:
    """A process's `StreamLoader.state_dict()` halfway through an epoch, each slot's pool of `pool` batches of
    `batch` references drawn and not yet handed out (the most a slot holds)."""
    slots = ranks * workers
    states = []
    for slot in range(rank * workers, (rank + 1) * workers):
        state = fresh_state(slot, 1)
        share = slot_share(total, slot, slots)
        position = share // 2 + slot % 7
        draws = np.arange(position - pool * batch, position)
        shards = (slot * 7919 + draws * 31) % (total // SHARD_SAMPLES)
        refs = np.stack([np.zeros_like(draws), shards, draws % SHARD_SAMPLES, draws], axis=1).tolist()
        state["pending"] = [refs[start : start + batch] for start in range(0, len(refs), batch)]
        state["sources"][0]["position"] = position
        state.update(draws=position, pools=position // (pool * batch), read=position)
        states.append(state)
    signature = {
        "sources": [{"path": "/corpus/train", "weight": 1.0, "shards": "0" * 16}],
        "settings": {"batch_size": batch, "seed": 0, "shuffle_window": WINDOW, "bucket_pool": pool},
        "world_size": ranks,
        "workers": workers,
        "rank": rank,
    }
    return {"format": STATE_FORMAT, "signature": signature, "workers": states}


def stream_state(settings: Settings) -> list[Result]:
    workers, total = 8, 400_000_000
    rank_file = json.dumps(synthetic_stream_state(0, 8, workers, 256, 128, total))
    rank_counts = [8, 64, 256] if settings.quick else [8, 512, 4096]
    rows = []
    for ranks in rank_counts:
        # small pools here: the summaries hold counts only, so their size does not depend on the pool
        states = {rank: synthetic_stream_state(rank, ranks, workers, 4, 2, total) for rank in range(ranks)}
        layout_text = json.dumps({"ranks": [layout_entry(states[rank]) for rank in range(ranks)]})
        new_rank, new_slots = ranks, 2 * ranks * workers  # the middle process of twice as many
        wanted = range(new_rank * workers, (new_rank + 1) * workers)
        started = time.perf_counter()
        saved = SavedStreams(ranks, states.__getitem__, lambda text=layout_text: json.loads(text)["ranks"])
        summaries = [worker for entry in saved.layout() for worker in entry["workers"]]
        shares = resplit(summaries, ranks * workers, new_slots, [total], wanted)
        shares = [ref_pieces(share, saved.slot) for share in shares]
        seconds = time.perf_counter() - started
        rows.append(
            {
                "ranks": ranks,
                "layout_mb": round(len(layout_text) / MB, 3),
                "resplit_seconds": round(seconds, 4),
                "files_read": saved.files_read,
            }
        )
    largest = rows[-1]
    details = {
        "rank_file_mb": round(len(rank_file) / MB, 2),
        "rank_file": f"batch 256, bucket_pool 128, {workers} workers, every pool full",
        "by_ranks": rows,
        "resplit_slope": slope(rank_counts, [row["resplit_seconds"] for row in rows]),
        "layout_slope": slope(rank_counts, [row["layout_mb"] for row in rows]),
        "layout_change": f"R x {workers} -> 2R x {workers}, one new process, {total:,} samples",
    }
    return [
        Result(10, "stream state: MB of one process's data-rank file (batch 256, 8 workers)", details["rank_file_mb"],
               "<= 64", details),
        Result(10, f"stream state: re-split seconds on a layout change, {largest['ranks']:,} x {workers} processes",
               largest["resplit_seconds"], "<= 1", {}),
        Result(10, f"stream state: saved files one process reads then, {largest['ranks']:,} processes",
               largest["files_read"], "<= 3", {}),
    ]  # fmt: skip


def shard_cache(settings: Settings) -> list[Result]:
    cached_counts = [1_000, 3_000, 10_000] if settings.quick else [1_000, 10_000, 100_000]
    rows = []
    for cached in cached_counts:
        directory = settings.work / "growth-cache" / str(cached)
        directory.mkdir(parents=True)
        for number in range(cached):
            with open(directory / f"{number:064x}.tar", "wb") as shard:
                shard.truncate(1 << 20)  # sparse: the size counts, not the bytes
        cache = ShardCache(directory, limit_bytes=(cached + 10) << 20)
        times = []
        for attempt in range(3):
            part = directory / f"{'f' * 64}.{1 << 20}.{attempt}.part"
            started = time.perf_counter()
            cache._reserve(part, 1 << 20, "bench://shard")
            times.append(time.perf_counter() - started)
            part.unlink()
        rows.append({"cached_shards": cached, "reserve_seconds": round(median(times), 4)})
    details = {"by_cached_shards": rows, "slope": slope(cached_counts, [row["reserve_seconds"] for row in rows])}
    label = f"{cached_counts[-1] // 1000}k"
    return [Result(10, f"shard cache: seconds to make room for a download, {label} shards cached",
                   rows[-1]["reserve_seconds"], "<= 0.5", details)]  # fmt: skip


def build_cost(settings: Settings) -> list[Result]:
    counts = (96, 192) if settings.quick else (480, 1920)
    folder = settings.work / "growth-build"
    manifests = {
        count: write_sources(settings.corpus / "train", count, folder / str(count))["jsonl"] for count in counts
    }
    rates, starts = {}, {}
    for workers in (1, 2, 4):
        seconds = {}
        for count, manifest in manifests.items():
            started = time.perf_counter()
            out = folder / f"built-{count}-{workers}"
            result = build(open_source(manifest), out, BuildSettings(shard_size=100), workers)
            seconds[count] = time.perf_counter() - started
            if result.samples != count:
                raise RuntimeError(f"the build kept {result.samples} of {count} samples")
        # a build costs a fixed start (spawning and importing the worker processes) plus a rate per sample
        rates[workers] = (counts[1] - counts[0]) / max(seconds[counts[1]] - seconds[counts[0]], 1e-6)
        starts[workers] = round(seconds[counts[0]] - counts[0] / rates[workers], 2)
    manifest = manifests[counts[0]]
    parts = 1000
    out = folder / "merged"
    state = out / STATE_DIR
    state.mkdir(parents=True)
    stats = ShardStats(samples=SHARD_SAMPLES, audio_seconds=1.0, images=1).to_json()
    for part in range(parts):
        records = [
            {"shard": f"{part:04d}-{n:05d}.tar", "samples": SHARD_SAMPLES, "bytes": 1 << 30, "sha256": "0" * 64,
             "last_line": n, "stats": stats, "rejects": []}
            for n in range(20 if settings.quick else 200)  # 200k shards in all: the largest index above
        ] + [{"done": True, "last_line": 0, "rejects": []}]  # fmt: skip
        (state / f"part-{part:04d}-of-{parts:04d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    started = time.perf_counter()
    merged = merge_if_complete(out, state, open_source(manifest), BuildSettings(shard_size=100), parts)
    merge_seconds = time.perf_counter() - started
    if not merged:
        raise RuntimeError("the synthetic parts did not merge")
    shards = len(json.loads((out / "index.json").read_text())["shards"])
    details = {
        "samples": list(counts),
        "samples_per_s_by_workers": {workers: round(rate, 1) for workers, rate in rates.items()},
        "start_seconds_by_workers": starts,
        "cores": os.cpu_count(),
        "merge": {"parts": parts, "shards": shards, "seconds": round(merge_seconds, 3)},
    }
    return [
        Result(
            10,
            "build: samples/s with 2 worker processes ÷ 1 (after their start)",
            rates[2] / rates[1],
            ">= 1.50",
            details,
        ),
        Result(10, f"build: seconds to merge {parts:,} --part indexes ({shards:,} shards)", merge_seconds, "<= 10", {}),
    ]


def checkpoint_cost(settings: Settings) -> list[Result]:
    presets = ["tiny"] if settings.quick else ["tiny", "base", "large"]
    rows = [_checkpoint_round_trip(preset, settings.work / "growth-checkpoint" / preset) for preset in presets]
    largest = rows[-1]
    details = {
        "by_preset": rows,
        "write_slope_vs_bytes": slope([row["gb"] for row in rows], [row["write_seconds"] for row in rows])
        if len(rows) > 1 else None,
        "what": "model weights (safetensors) + AdamW state (two fp32 moments), one process, local disk; dcp_*: the "
        "same state through torch.distributed.checkpoint (FSDP2's format)",
    }  # fmt: skip
    return [
        Result(10, f"checkpoint: write GB/s, {largest['preset']} preset (model + AdamW, one process)",
               largest["gb"] / largest["write_seconds"], ">= 0.50", details),
        Result(10, f"checkpoint: read GB/s, {largest['preset']} preset", largest["gb"] / largest["read_seconds"],
               ">= 0.50", {}),
    ]  # fmt: skip


def _checkpoint_round_trip(preset: str, output: Path) -> dict[str, Any]:
    from accelerate import Accelerator

    from zidong.models.zidong.configuration_zidong import ZidongConfig
    from zidong.models.zidong.modeling_zidong import ZidongModel
    from zidong.train.checkpoint import load_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = ZidongModel(ZidongConfig.from_preset(preset, text={"vocab_size": 32_000}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for parameter in model.parameters():  # AdamW's state after a step, without holding gradients
        optimizer.state[parameter] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros_like(parameter),
            "exp_avg_sq": torch.zeros_like(parameter),
        }
    model, optimizer = accelerator.prepare(model, optimizer)
    data_state = synthetic_stream_state(0, 1, 1, 4, 2, 1_000_000)
    started = time.perf_counter()
    folder = save_checkpoint(accelerator, output, 1, {"processes": 1}, data_state, keep_last=1)
    write_seconds = time.perf_counter() - started
    gb = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e9
    optimizer.optimizer.state.clear()  # as a fresh launch would hold it: room for what is read
    gc.collect()
    started = time.perf_counter()
    load_checkpoint(accelerator, folder)
    read_seconds = time.perf_counter() - started
    dcp_seconds = _dcp_round_trip(model, optimizer.optimizer, output / "dcp")
    parameters = sum(parameter.numel() for parameter in model.parameters())
    accelerator.free_memory()
    del model, optimizer
    gc.collect()
    return {
        "preset": preset,
        "parameters": parameters,
        "gb": round(gb, 3),
        "write_seconds": round(write_seconds, 2),
        "read_seconds": round(read_seconds, 2),
        "dcp_write_seconds": round(dcp_seconds[0], 2),
        "dcp_read_seconds": round(dcp_seconds[1], 2),
    }


def _dcp_round_trip(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> tuple[float, float]:
    """Seconds to write and read the same model and optimizer state with torch.distributed.checkpoint, as an
    FSDP2 run does (one process here: every shard is this process's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    started = time.perf_counter()
    dcp.save(state, checkpoint_id=folder)
    written = time.perf_counter()
    dcp.load(state, checkpoint_id=folder)
    return written - started, time.perf_counter() - written
