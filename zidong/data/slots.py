"""What each slot of the training stream reads, in which order, and how a saved position is re-split.

Slots. Every (rank, worker) pair is a slot; slot = rank * workers + worker. For each epoch of a source, the
shards are put in a seeded order and each shard's samples in a seeded order, and the concatenation is cut into
`slots` contiguous blocks of equal size (±1), one per slot: the slots of an epoch are disjoint and together
hold every sample once, and each slot reads from only a few shards at a time. Within its block a slot shuffles
windows of `shuffle_window` samples. Everything is a function of (seed, source, epoch, slot): nothing is
buffered that a resume would have to rebuild, and a slot computes its plan one window at a time (`EpochPlan`), so
its memory does not grow with the corpus.

Mixing. Each draw picks a source with probability weight ÷ total from a generator seeded by (seed, slot, draw);
each source keeps its own epoch and position, so a small, heavily weighted source repeats more often.

Resume with another layout: zidong/data/resplit.py.

Bad samples. A sample whose metadata or members cannot be read or decoded is skipped, counted and logged (shard
and key). When a worker has read at least MIN_READS samples and more than `max_bad_fraction` of them were bad,
the loader raises DataError.
zidong/data/stream.py runs one `SlotStream` per DataLoader worker and saves the slots' states with checkpoints.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from zidong.data.batching import cut_into_batches
from zidong.data.shards import RawSample, SampleError, ShardFolder
from zidong.data.transforms import SamplePipeline
from zidong.errors import UserError

MIN_READS = 100
MIX_CHUNK = 4096

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


class EpochPlan:
    """The (shard, position) pairs slot `slot` of `slots` reads in one epoch of a source, in reading order.

    The plan is computed one shuffle window at a time, when a position in it is first asked for: a slot holds the
    epoch's shard order and one window (plus the sample orders of the few shards that window reaches), so its
    memory grows with the shard count and the window, not with the corpus. `plan[i]` is the i-th pair."""

    SAMPLE_ORDERS_KEPT = 4  # a window reaches a few shards; the next one usually goes on in the last of them

    def __init__(self, counts: list[int], seed: int, source: int, epoch: int, slot: int, slots: int, window: int):
        self.key = (seed, source, epoch, slot)
        self.window = window
        self._counts = np.asarray(counts, dtype=np.int64)
        self._order = np.random.default_rng([seed, _SHARD_ORDER, source, epoch]).permutation(len(counts))
        self._ends = np.cumsum(self._counts[self._order])  # where each shard, in epoch order, ends in the epoch
        total = int(self._ends[-1]) if len(counts) else 0
        self.start, self.stop = slot * total // slots, (slot + 1) * total // slots
        self._rows: tuple[int, np.ndarray] | None = None  # (window number, its pairs)
        self._sample_orders: dict[int, np.ndarray] = {}  # by shard, the least recently used first

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"position {index} of an epoch plan of {len(self)}")
        shard, position = self._window(index // self.window)[index % self.window]
        return int(shard), int(position)

    def rows(self, begin: int, end: int) -> np.ndarray:
        """The pairs at positions `begin` to `end` (excluded; clipped to the plan), as an array of shape [n, 2]."""
        end = min(end, len(self))
        pieces = []
        for number in range(begin // self.window, (end - 1) // self.window + 1 if end > begin else 0):
            first = number * self.window
            pieces.append(self._window(number)[max(begin - first, 0) : end - first])
        return np.concatenate(pieces) if pieces else np.zeros((0, 2), dtype=np.int64)

    def _window(self, number: int) -> np.ndarray:
        if self._rows is not None and self._rows[0] == number:
            return self._rows[1]
        seed, source, epoch, slot = self.key
        begin = number * self.window
        size = min(self.window, len(self) - begin)
        low, high = self.start + begin, self.start + begin + size  # the window's samples in the epoch's sequence
        pieces = []
        for rank in range(int(np.searchsorted(self._ends, low, "right")), len(self._order)):
            shard = int(self._order[rank])
            shard_end = int(self._ends[rank])
            shard_start = shard_end - int(self._counts[shard])
            if shard_start >= high:
                break
            chosen = self._sample_order(shard)[max(low, shard_start) - shard_start : min(high, shard_end) - shard_start]
            pieces.append(np.stack([np.full_like(chosen, shard), chosen], axis=1))
        rows = np.concatenate(pieces) if pieces else np.zeros((0, 2), dtype=np.int64)
        rows = rows[np.random.default_rng([seed, _WINDOW, source, epoch, slot, begin]).permutation(size)]
        self._rows = (number, rows)
        return rows

    def _sample_order(self, shard: int) -> np.ndarray:
        order = self._sample_orders.pop(shard, None)
        if order is None:
            seed, source, epoch, _ = self.key
            order = np.random.default_rng([seed, _SAMPLE_ORDER, source, epoch, shard]).permutation(self._counts[shard])
            if len(self._sample_orders) == self.SAMPLE_ORDERS_KEPT:
                del self._sample_orders[next(iter(self._sample_orders))]
        self._sample_orders[shard] = order
        return order


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
        self._plans: dict[int, tuple[int, EpochPlan]] = {}
        self._old_plans: dict[int, tuple[tuple, EpochPlan]] = {}  # plans of the layout a re-split came from
        self._mix: tuple[int, np.ndarray] | None = None
        self._skipped: list[str] = []
        # told what the slot is about to read ("" once it returned): a hung read can then be named from outside
        self.reading: Callable[[str], None] = lambda what: None

    def __iter__(self) -> Iterator[tuple[list[Any], dict[str, Any], list[str], list[list[int]]]]:
        while True:
            if not self.state["pending"]:
                self._fill_pool()
            refs = self.state["pending"].pop(0)
            samples, decoded = [], []
            for source, shard, position, draw in refs:
                try:
                    raw = self._read(source, shard, position)
                    rng = np.random.default_rng([self.settings.seed, _SAMPLE, self.slot, draw])
                    samples.append(self.pipeline.decode(raw, rng))
                    decoded.append([source, shard, position])
                except SampleError as err:
                    self._count_bad(err)
            if samples:
                yield samples, copy.deepcopy(self.state), self._skipped, decoded
                self._skipped = []

    def _fill_pool(self) -> None:
        self._prefetch_next_pool()
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
                raw = self._read(ref[0], ref[1], ref[2], only=self.pipeline.LENGTH_MEMBERS)
                pool.append((ref, self.pipeline.lengths(raw)))
            except SampleError as err:
                self._count_bad(err)
        self.state["deferred"] = carried + self.state["deferred"]
        rng = np.random.default_rng([self.settings.seed, _POOL, self.slot, self.state["pools"]])
        self.state["pending"] = cut_into_batches(pool, self.settings.batch_size, self.settings.bucket_pool > 0, rng)
        self.state["pools"] += 1

    def _read(self, source: int, shard: int, position: int, only: Collection[str] | None = None) -> RawSample:
        folder = self.folders[source]
        self.reading(f"{folder.location(shard)}, sample {position}, since {time.time():.3f}")
        try:
            return folder.read(shard, position, only=only)
        finally:
            self.reading("")

    def _prefetch_next_pool(self) -> None:
        """Have remote sources start fetching the shards the next pool draws from them (local ones ignore it)."""
        for source, folder in enumerate(self.folders):
            cursor = self.state["sources"][source]
            if folder.remote and not cursor.get("leftover"):
                plan = self._plan(source, cursor["epoch"])
                ahead = plan.rows(cursor["position"], cursor["position"] + self.pool_size)[:, 0]
                folder.prefetch(dict.fromkeys(ahead.tolist()))

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
                plan = EpochPlan(self.folders[source].counts, self.settings.seed, *key, self.settings.shuffle_window)
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

    def _plan(self, source: int, epoch: int) -> EpochPlan:
        cached = self._plans.get(source)
        if cached is None or cached[0] != epoch:
            counts = self.folders[source].counts
            plan = EpochPlan(
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
