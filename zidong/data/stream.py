"""The training stream: shard folders -> batches, split by rank and worker, shuffled, mixed, exactly resumable.

    loader = StreamLoader([("data/demo/train", 1.0)], StreamSettings(batch_size=32, seed=0), pipeline,
                          num_workers=2, rank=accelerator.process_index, world_size=accelerator.num_processes)
    for batch in loader: ...                        # endless; the trainer counts steps
    state = loader.state_dict()                     # JSON-able; each process saves its own with every checkpoint
    loader = StreamLoader(..., saved=[state of rank 0, state of rank 1, ...])   # continues exactly

Slots. Every (rank, worker) pair is a slot; slot = rank * workers + worker. For each epoch of a source, the
shards are put in a seeded order and each shard's samples in a seeded order, and the concatenation is cut into
`slots` contiguous blocks of equal size (±1), one per slot: the slots of an epoch are disjoint and together
hold every sample once, and each slot reads from only a few shards at a time. Within its block a slot shuffles
windows of `shuffle_window` samples. Everything is a function of (seed, source, epoch, slot): nothing is
buffered that a resume would have to rebuild.

Mixing. Each draw picks a source with probability weight ÷ total from a generator seeded by (seed, slot, draw);
each source keeps its own epoch and position, so a small, heavily weighted source repeats more often.

Resume. A slot's whole state is small: per source (epoch, position), the draw and pool counters, the batches
of the current length-bucketing pool not yet emitted and the samples deferred to the next pool (as sample
references), and the read/bad counters. Each
batch travels from its worker with the state after it; the loader keeps the state of the last batch it handed
out from each worker. A DataLoader serves workers round-robin, so on resume the saved worker states are
rotated so that worker 0 holds the one whose batch comes next.

Resume with another layout. When the checkpoint was written by another number of processes or workers (same
sources, seed and shuffle window), every process reads every process's saved state and computes the same
re-split: the samples the old slots had drawn but not yet handed out, and the rest of each old slot's plan up to
the furthest epoch any slot had reached, are cut into contiguous blocks, one per new slot, which each reads
before going on with the next epoch. So 2 -> 4 -> 1 processes see every sample of the interrupted epoch exactly
once, and nothing twice. A changed source, seed or shuffle window starts the next epoch afresh instead.

Bad samples. A sample whose metadata or members cannot be read or decoded is skipped, counted and logged (shard
and key). When a worker has read at least MIN_READS samples and more than `max_bad_fraction` of them were bad,
the loader raises DataError.
"""

from __future__ import annotations

import copy
import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zidong.data.batching import cut_into_batches
from zidong.data.shards import SampleError, ShardFolder
from zidong.data.transforms import SamplePipeline
from zidong.errors import UserError
from zidong.utils.log import EVERY_RANK, get_logger

STATE_FORMAT = "zidong-stream/1"
MIN_READS = 100
MIX_CHUNK = 4096
logger = get_logger(__name__)

# Distinct first words for the seeded generators, so no two uses of one seed draw the same numbers.
_SHARD_ORDER, _SAMPLE_ORDER, _WINDOW, _MIX, _POOL, _SAMPLE = range(6)


class DataError(UserError):
    """Too many samples of the training data could not be read back."""


@dataclass(frozen=True)
class StreamSettings:
    """How a stream orders and batches samples.

    Args:
        batch_size: samples per batch (per rank).
        seed: the seed every order derives from.
        shuffle_window: a slot shuffles its block of an epoch in windows of this many samples.
        bucket_pool: batches per length-sorted pool; 0 batches consecutive samples (no bucketing).
        max_bad_fraction: the largest tolerated fraction of unreadable samples per worker.
    """

    batch_size: int
    seed: int = 0
    shuffle_window: int = 10_000
    bucket_pool: int = 128
    max_bad_fraction: float = 0.01


def epoch_plan(counts: list[int], seed: int, source: int, epoch: int, slot: int, slots: int, window: int) -> np.ndarray:
    """The (shard, position) pairs slot `slot` of `slots` reads in one epoch of a source, in reading order."""
    order = np.random.default_rng([seed, _SHARD_ORDER, source, epoch]).permutation(len(counts))
    total = sum(counts)
    start, stop = slot * total // slots, (slot + 1) * total // slots
    pieces = []
    offset = 0
    for shard in order:
        count = counts[shard]
        low, high = max(start, offset), min(stop, offset + count)
        if low < high:
            positions = np.random.default_rng([seed, _SAMPLE_ORDER, source, epoch, shard]).permutation(count)
            chosen = positions[low - offset : high - offset]
            pieces.append(np.stack([np.full_like(chosen, shard), chosen], axis=1))
        offset += count
    plan = np.concatenate(pieces) if pieces else np.zeros((0, 2), dtype=np.int64)
    for begin in range(0, len(plan), window):
        chunk = plan[begin : begin + window]
        plan[begin : begin + window] = chunk[
            np.random.default_rng([seed, _WINDOW, source, epoch, slot, begin]).permutation(len(chunk))
        ]
    return plan


def fresh_state(slot: int, sources: int, epoch: int = 0) -> dict[str, Any]:
    return {
        "slot": slot,
        "sources": [{"epoch": epoch, "position": 0} for _ in range(sources)],
        "draws": 0,
        "pools": 0,
        "pending": [],
        "deferred": [],
        "read": 0,
        "bad": 0,
    }


def slot_share(total: int, slot: int, slots: int) -> int:
    """How many of an epoch's `total` samples slot `slot` of `slots` reads (its contiguous block)."""
    return (slot + 1) * total // slots - slot * total // slots


def resplit(states: list[dict[str, Any]], old_slots: int, new_slots: int, totals: list[int]) -> list[dict[str, Any]]:
    """The states of `new_slots` slots that continue, between them, exactly where `states` (every old slot's) left.

    Per source, what the old slots had not yet handed out: the refs they had drawn (pending batches, deferred),
    and each one's unread leftover and plan up to the furthest epoch any of them reached, as pieces (explicit
    refs, or a range of an old slot's epoch plan). Each epoch's pieces, earliest first, are cut into `new_slots`
    contiguous blocks, so every new slot reads its share of the interrupted epoch first; its cursor then goes on
    at the furthest epoch + 1."""
    states = sorted(states, key=lambda state: state["slot"])
    fresh = [fresh_state(slot, len(totals)) for slot in range(new_slots)]
    for source, total in enumerate(totals):
        furthest = max(state["sources"][source]["epoch"] for state in states)
        by_epoch: dict[int, list[dict[str, Any]]] = {}
        drawn = [
            ref[1:3]
            for state in states
            for ref in [*(ref for batch in state["pending"] for ref in batch), *state["deferred"]]
            if ref[0] == source
        ]
        if drawn:  # drawn before anything still in the plans
            by_epoch[-1] = [{"refs": drawn}]
        for state in states:
            cursor = state["sources"][source]
            for piece in cursor.get("leftover", []):
                by_epoch.setdefault(piece.get("epoch", -1), []).append(copy.deepcopy(piece))
            share = slot_share(total, state["slot"], old_slots)
            for epoch in range(cursor["epoch"], furthest + 1):
                start = cursor["position"] if epoch == cursor["epoch"] else 0
                if start < share:
                    piece = {"epoch": epoch, "slot": state["slot"], "slots": old_slots, "start": start, "stop": share}
                    by_epoch.setdefault(epoch, []).append(piece)
        blocks: list[list[dict[str, Any]]] = [[] for _ in range(new_slots)]
        for turn, epoch in enumerate(sorted(by_epoch)):
            # the cut's longer parts come last; rotating by epoch spreads them over the slots
            for index, part in enumerate(_cut(by_epoch[epoch], new_slots)):
                blocks[(index + turn) % new_slots].extend(part)
        for slot, block in enumerate(blocks):
            cursor = {"epoch": furthest + 1, "position": 0}
            if block:
                cursor["leftover"] = block
            fresh[slot]["sources"][source] = cursor
    return fresh


def _piece_length(piece: dict[str, Any]) -> int:
    return len(piece["refs"]) if "refs" in piece else piece["stop"] - piece["start"]


def _cut(pieces: list[dict[str, Any]], blocks: int) -> list[list[dict[str, Any]]]:
    """`pieces` (read in order) cut into `blocks` contiguous runs of equal length (±1)."""
    total = sum(_piece_length(piece) for piece in pieces)
    bounds = [block * total // blocks for block in range(blocks + 1)]
    cut: list[list[dict[str, Any]]] = [[] for _ in range(blocks)]
    offset = 0
    for piece in pieces:
        length = _piece_length(piece)
        for block in range(blocks):
            low, high = max(bounds[block], offset), min(bounds[block + 1], offset + length)
            if low < high:
                first, last = low - offset, high - offset
                if "refs" in piece:
                    cut[block].append({"refs": piece["refs"][first:last]})
                else:
                    cut[block].append({**piece, "start": piece["start"] + first, "stop": piece["start"] + last})
        offset += length
    return cut


class SlotStream:
    """The endless batches of one slot, each yielded with the slot's state after it and the skips it met.

    Args:
        folders / weights: the sources and their mixing weights.
        pipeline: measures samples for bucketing and decodes them (collation happens outside).
        state: where to start (see `fresh_state`); not modified.
    """

    def __init__(
        self,
        folders: list[ShardFolder],
        weights: list[float],
        settings: StreamSettings,
        slots: int,
        pipeline: SamplePipeline,
        state: dict[str, Any],
    ):
        self.folders = folders
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.settings = settings
        self.slots = slots
        self.pipeline = pipeline
        self.state = copy.deepcopy(state)
        self.slot = state["slot"]
        # A pool never holds one sample twice (two copies would sort into one batch: a false negative); a
        # repeat is deferred to the next pool, and dropped if it repeats there too. A sample that cannot be
        # read leaves the pool one short. The pool is small enough that no source is expected to run
        # through more than one epoch of this slot's share within one pool.
        shares = [(self.slot + 1) * len(f) // slots - self.slot * len(f) // slots for f in folders]
        draws_per_epoch = min(share / p for share, p in zip(shares, self.probabilities, strict=True))
        pool_batches = max(1, min(settings.bucket_pool, int(draws_per_epoch) // settings.batch_size))
        self.pool_size = min(settings.batch_size * pool_batches, sum(shares))
        self._plans: dict[int, tuple[int, np.ndarray]] = {}
        self._old_plans: dict[int, tuple[tuple, np.ndarray]] = {}  # plans of the layout a re-split came from
        self._mix: tuple[int, np.ndarray] | None = None
        self._skipped: list[str] = []

    def __iter__(self) -> Iterator[tuple[list[Any], dict[str, Any], list[str], list[list[int]]]]:
        while True:
            if not self.state["pending"]:
                self._fill_pool()
            refs = self.state["pending"].pop(0)
            samples, decoded = [], []
            for source, shard, position, draw in refs:
                try:
                    raw = self.folders[source].read(shard, position)
                    rng = np.random.default_rng([self.settings.seed, _SAMPLE, self.slot, draw])
                    samples.append(self.pipeline.decode(raw, rng))
                    decoded.append([source, shard, position])
                except SampleError as err:
                    self._count_bad(err)
            if samples:
                yield samples, copy.deepcopy(self.state), self._skipped, decoded
                self._skipped = []

    def _fill_pool(self) -> None:
        pool = []
        drawn = set()
        carried, self.state["deferred"] = self.state["deferred"], []
        while len(drawn) < self.pool_size:
            fresh = not carried
            ref = self._next_ref() if fresh else carried.pop(0)
            if tuple(ref[:3]) in drawn:
                if fresh:  # deferred once at most, so the deferred list stays shorter than a pool
                    self.state["deferred"].append(ref)
                continue
            drawn.add(tuple(ref[:3]))
            self.state["read"] += 1
            try:
                raw = self.folders[ref[0]].read(ref[1], ref[2], only=self.pipeline.LENGTH_MEMBERS)
                pool.append((ref, self.pipeline.lengths(raw)))
            except SampleError as err:
                self._count_bad(err)
        self.state["deferred"] = carried + self.state["deferred"]
        rng = np.random.default_rng([self.settings.seed, _POOL, self.slot, self.state["pools"]])
        self.state["pending"] = cut_into_batches(pool, self.settings.batch_size, self.settings.bucket_pool > 0, rng)
        self.state["pools"] += 1

    def _next_ref(self) -> list[int]:
        draw = self.state["draws"]
        source = self._source_of(draw)
        cursor = self.state["sources"][source]
        if cursor.get("leftover"):  # what a re-split handed this slot comes first
            shard, position = self._take_leftover(source, cursor)
        else:
            plan = self._plan(source, cursor["epoch"])
            shard, position = plan[cursor["position"]]
            cursor["position"] += 1
            if cursor["position"] == len(plan):
                cursor["epoch"] += 1
                cursor["position"] = 0
        self.state["draws"] += 1
        return [source, int(shard), int(position), draw]

    def _take_leftover(self, source: int, cursor: dict[str, Any]) -> tuple[int, int]:
        piece = cursor["leftover"][0]
        if "refs" in piece:
            shard, position = piece["refs"].pop(0)
            done = not piece["refs"]
        else:
            key = (source, piece["epoch"], piece["slot"], piece["slots"])
            cached = self._old_plans.get(source)
            if cached is None or cached[0] != key:  # a slot reads its pieces in order: one plan per source
                plan = epoch_plan(self.folders[source].counts, self.settings.seed, *key, self.settings.shuffle_window)
                self._old_plans[source] = cached = (key, plan)
            shard, position = cached[1][piece["start"]]
            piece["start"] += 1
            done = piece["start"] == piece["stop"]
        if done:
            cursor["leftover"].pop(0)
            if not cursor["leftover"]:
                del cursor["leftover"]
        return shard, position

    def _source_of(self, draw: int) -> int:
        if len(self.folders) == 1:
            return 0
        chunk = draw // MIX_CHUNK
        if self._mix is None or self._mix[0] != chunk:
            rng = np.random.default_rng([self.settings.seed, _MIX, self.slot, chunk])
            self._mix = (chunk, rng.choice(len(self.folders), size=MIX_CHUNK, p=self.probabilities))
        return int(self._mix[1][draw % MIX_CHUNK])

    def _plan(self, source: int, epoch: int) -> np.ndarray:
        cached = self._plans.get(source)
        if cached is None or cached[0] != epoch:
            counts = self.folders[source].counts
            plan = epoch_plan(
                counts, self.settings.seed, source, epoch, self.slot, self.slots, self.settings.shuffle_window
            )
            self._plans[source] = cached = (epoch, plan)
        return cached[1]

    def _count_bad(self, err: SampleError) -> None:
        self.state["bad"] += 1
        self._skipped.append(str(err))
        read, bad = self.state["read"], self.state["bad"]
        if read >= MIN_READS and bad > self.settings.max_bad_fraction * read:
            raise DataError(
                f"{bad} of {read} samples read by one data worker could not be decoded, more than "
                f"data.max_bad_fraction={self.settings.max_bad_fraction}; last: {err}. Check the shards with "
                "`zidong data inspect DIR --checksums` and rebuild the damaged ones, or raise data.max_bad_fraction"
            )


class _StreamDataset(IterableDataset):
    """Runs one SlotStream per DataLoader worker and collates its batches there."""

    def __init__(self, folders, weights, settings, slots, pipeline, worker_states):
        self.folders = folders
        self.weights = weights
        self.settings = settings
        self.slots = slots
        self.pipeline = pipeline
        self.worker_states = worker_states

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        state = self.worker_states[info.id if info is not None else 0]
        stream = SlotStream(self.folders, self.weights, self.settings, self.slots, self.pipeline, state)
        try:
            for samples, after, skipped, refs in stream:
                yield {"batch": self.pipeline.collate(samples), "state": after, "skipped": skipped, "refs": refs}
        except DataError as err:
            # travels as data: an exception raised in a worker would reach the user wrapped in a traceback
            yield {"error": str(err), "skipped": stream._skipped}


def _unchanged(item: Any) -> Any:
    return item


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a forkserver, a clean process that has imported zidong but run nothing: forking the
    training process itself can deadlock once torch's thread pools have run, and spawned workers were seen to
    abort at exit ("terminate called without an active exception") where forked ones exit without that."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _init_worker(_: int, trainer_pid: int) -> None:
    # Each worker tokenises one batch at a time: the tokenizer's own thread pool only adds threads, and
    # threads still running when the worker exits were seen to abort it.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    threading.Thread(target=_exit_with, args=(trainer_pid,), name="zidong-trainer-watch", daemon=True).start()


def _exit_with(trainer_pid: int) -> None:
    """End this worker once the training process is gone (killed -9, or exited without closing its loader).

    torch's own watchdog watches the worker's parent, which here is the forkserver; the forkserver in turn lives
    as long as any worker holds its liveness pipe, so without this an orphaned worker waits forever, holding
    the launcher's stdout and stderr open."""
    while _is_running(trainer_pid):
        time.sleep(1.0)
    os._exit(0)


def _is_running(pid: int) -> bool:
    """Whether `pid` runs: on Linux a killed process stays a zombie (still signalable) until its parent reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return False
    try:  # no procfs
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class StreamLoader:
    """Endless, resumable batches for one rank; see the module docstring.

    Args:
        sources: (shard folder, weight) pairs.
        settings: order and batching (StreamSettings).
        pipeline: measures, decodes and collates samples (in the workers).
        num_workers: DataLoader worker processes (0 reads in this process).
        rank / world_size: this process among the training processes.
        saved: the `state_dict()` of every process of the run resumed, in rank order. With the same layout
            this process continues exactly from its own; with another number of processes or workers (or another
            batch size or bucketing pool) every process re-splits the saved position exactly (module docstring);
            if the sources, seed or shuffle window changed, the stream starts afresh at the epoch after the
            furthest saved one (with a warning). Every process takes, and logs, the same decision.

    Raises UserError when a source folder is not a shard folder or has fewer samples than reader slots.
    """

    def __init__(
        self,
        sources: list[tuple[str | Path, float]],
        settings: StreamSettings,
        pipeline: SamplePipeline,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        saved: list[dict[str, Any]] | None = None,
        pin_memory: bool = False,
    ):
        self.folders = [ShardFolder(path) for path, _ in sources]
        self.weights = [float(weight) for _, weight in sources]
        self.settings = settings
        self.num_workers = num_workers
        self.rank = rank
        self.workers = max(1, num_workers)
        self.slots = world_size * self.workers
        for (path, _), folder in zip(sources, self.folders, strict=True):
            if len(folder) < self.slots:
                raise UserError(
                    f"{path} holds {len(folder)} samples, fewer than the {self.slots} reader slots "
                    f"({world_size} processes x {self.workers} workers); lower data.num_workers or add data"
                )
        self.signature = {
            "sources": [
                {"path": str(Path(path).resolve()), "weight": weight, "shards": folder.fingerprint}
                for (path, weight), folder in zip(sources, self.folders, strict=True)
            ],
            "settings": {
                "batch_size": settings.batch_size,
                "seed": settings.seed,
                "shuffle_window": settings.shuffle_window,
                "bucket_pool": settings.bucket_pool,
            },
            "world_size": world_size,
            "workers": self.workers,
            "rank": rank,
        }
        self.pipeline = pipeline
        self.pin_memory = pin_memory
        self.worker_states = self._starting_states(saved or [])
        self.consumed = 0
        self.last_refs: list[list[int]] = []  # (source, shard, position) of each sample of the last batch
        self._iterator: Iterator[dict[str, Any]] | None = None

    def _starting_states(self, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
        first_slot = self.rank * self.workers
        if not saved:
            return [fresh_state(first_slot + w, len(self.folders)) for w in range(self.workers)]
        valid = [state for state in saved if state.get("format") == STATE_FORMAT]
        own = saved[self.rank] if self.rank < len(saved) else {}
        if len(valid) == len(saved) and own.get("signature") == self.signature:
            return copy.deepcopy(own["workers"])
        if len(valid) == len(saved) and all(self._same_samples(state["signature"]) for state in saved):
            layout = saved[0]["signature"]
            old_slots = layout["world_size"] * layout["workers"]
            states = resplit(
                [worker for state in saved for worker in state["workers"]],
                old_slots,
                self.slots,
                [len(folder) for folder in self.folders],
            )
            waiting = sum(_piece_length(p) for state in states for c in state["sources"] for p in c.get("leftover", []))
            logger.info(
                "the checkpoint's data stream was read by %d process(es) x %d worker(s), this run has %d x %d: "
                "its position is re-split exactly (%d samples of the epoch(s) in progress come first)",
                layout["world_size"],
                layout["workers"],
                self.slots // self.workers,
                self.workers,
                waiting,
                extra=EVERY_RANK,
            )
            return states[first_slot : first_slot + self.workers]
        epochs = [c["epoch"] for state in saved for w in state.get("workers", []) for c in w.get("sources", [])]
        epoch = max(epochs, default=-1) + 1
        logger.warning(
            "the data sources, seed or shuffle window changed since the checkpoint; the data stream starts afresh "
            "at epoch %d instead of resuming exactly",
            epoch,
            extra=EVERY_RANK,
        )
        return [fresh_state(first_slot + w, len(self.folders), epoch) for w in range(self.workers)]

    def _same_samples(self, signature: dict[str, Any]) -> bool:
        """Whether a saved stream read the same samples in the same epoch plans (any layout or batching)."""
        settings, mine = signature.get("settings", {}), self.signature["settings"]
        return (
            signature.get("sources") == self.signature["sources"]
            and settings.get("seed") == mine["seed"]
            and settings.get("shuffle_window") == mine["shuffle_window"]
        )

    def state_dict(self) -> dict[str, Any]:
        """The stream position after the last batch handed out (JSON-able)."""
        shift = self.consumed % self.workers
        workers = self.worker_states[shift:] + self.worker_states[:shift]
        return {"format": STATE_FORMAT, "signature": self.signature, "workers": copy.deepcopy(workers)}

    def __iter__(self) -> StreamLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._start()
        item = next(self._iterator)
        for report in item["skipped"]:
            logger.warning("skipped an unreadable sample: %s", report, extra=EVERY_RANK)
        if "error" in item:
            raise DataError(item["error"])
        self.worker_states[self.consumed % self.workers] = item["state"]
        self.consumed += 1
        self.last_refs = item["refs"]
        return item["batch"]

    def _start(self) -> Iterator[dict[str, Any]]:
        dataset = _StreamDataset(
            self.folders, self.weights, self.settings, self.slots, self.pipeline, self.worker_states
        )
        if self.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_unchanged,
            worker_init_fn=functools.partial(_init_worker, trainer_pid=os.getpid()),
            num_workers=self.num_workers,
            multiprocessing_context=_worker_context(),
            persistent_workers=True,
            prefetch_factor=2,
            pin_memory=self.pin_memory,
            # the loader draws its workers' seeds from this generator, not from torch's global one: creating it
            # must not shift the training process's random stream (a resumed run creates it at another step)
            generator=torch.Generator().manual_seed(self.settings.seed),
        )
        return iter(loader)

    def close(self) -> None:
        """Stops the worker processes now (not whenever the iterator happens to be garbage-collected)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # a DataLoader's multi-process iterator
        if shutdown is not None:
            shutdown()
        for folder in self.folders:
            folder.close()
