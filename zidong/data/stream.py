"""The training stream: shard folders -> batches, split by rank and worker, shuffled, mixed, exactly resumable.

    loader = StreamLoader([("data/demo/train", 1.0)], StreamSettings(batch_size=32, seed=0), pipeline,
                          num_workers=2, rank=accelerator.process_index, world_size=accelerator.num_processes)
    for batch in loader: ...                        # endless; the trainer counts steps
    state = loader.state_dict()                     # JSON-able; each process saves its own with every checkpoint
    loader = StreamLoader(..., saved=[state of rank 0, state of rank 1, ...])   # continues exactly

Every (rank, worker) pair is a slot that reads its own disjoint share of each epoch; how the shares are cut,
shuffled, mixed and re-split on another layout, and how bad samples are counted, is zidong/data/slots.py.

Resume. A slot's whole state is small: per source (epoch, position), the draw and pool counters, the batches
of the current length-bucketing pool not yet emitted and the samples deferred to the next pool (as sample
references), and the read/bad counters. Each batch travels from its worker with the state after it; the loader keeps the state of the last batch it handed
out from each worker. A DataLoader serves workers round-robin, so on resume the saved worker states are
rotated so that worker 0 holds the one whose batch comes next.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zidong.data.remote import ShardCache, configure_storage, configured_storage
from zidong.data.resplit import piece_length, ref_pieces, resplit
from zidong.data.saved_stream import SavedStreams
from zidong.data.shards import ShardFolder
from zidong.data.slots import DataError, SlotStream, StreamSettings, fresh_state
from zidong.data.transforms import SamplePipeline
from zidong.errors import UserError
from zidong.utils.log import EVERY_RANK, get_logger

STATE_FORMAT = "zidong-stream/1"
logger = get_logger(__name__)


class _StreamDataset(IterableDataset):
    """Runs one SlotStream per DataLoader worker and collates its batches there."""

    def __init__(self, folders, weights, settings, slots, pipeline, worker_states, reading=None):
        self.folders = folders
        self.weights = weights
        self.settings = settings
        self.slots = slots
        self.pipeline = pipeline
        self.worker_states = worker_states
        self.reading = reading  # per worker, shared with the training process: what it is reading now

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = SlotStream(
            self.folders, self.weights, self.settings, self.slots, self.pipeline, self.worker_states[worker]
        )
        if self.reading is not None:
            stream.reading = functools.partial(_note, self.reading[worker])
        # held here: a generator left open is closed at interpreter exit, after module globals have become None
        user_error = UserError
        try:
            for samples, after, skipped, refs in stream:
                yield {"batch": self.pipeline.collate(samples), "state": after, "skipped": skipped, "refs": refs}
        except user_error as err:  # too many bad samples, or a remote shard that cannot be fetched
            # travels as data: an exception raised in a worker would reach the user wrapped in a traceback
            yield {"error": err, "skipped": stream._skipped}


def _unchanged(item: Any) -> Any:
    return item


def _note(shared: ctypes.Array, what: str) -> None:
    shared.value = what.encode()[: len(shared) - 1]


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a forkserver, a clean process that has imported zidong but run nothing: forking the
    training process itself can deadlock once torch's thread pools have run, and spawned workers were seen to
    abort at exit ("terminate called without an active exception") where forked ones exit without that."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _init_worker(_: int, trainer_pid: int, storage: dict[str, dict[str, Any]]) -> None:
    configure_storage(storage)  # the forkserver's children do not inherit the trainer's fsspec settings
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
        saved: the `state_dict()` of every process of the run resumed, in rank order, or a checkpoint's
            `SavedStreams`. With the same layout this process continues exactly from its own; with another number
            of processes or workers (or another batch size or bucketing pool) every process computes its share of
            an exact re-split of the saved position (module docstring), reading only the saved states it needs;
            if the sources, seed or shuffle window changed, the stream starts afresh at the epoch after the
            furthest saved one (with a warning). Every process takes, and logs, the same decision.
        worker_timeout_s: with workers, how long to wait for a batch before raising DataError naming the shard
            each worker is reading (a read that never returns); 0 waits forever.

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
        saved: SavedStreams | list[dict[str, Any]] | None = None,
        pin_memory: bool = False,
        cache: ShardCache | None = None,
        worker_timeout_s: float = 0.0,
    ):
        self.folders = [ShardFolder(path, cache) for path, _ in sources]
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
                {"path": folder.name, "weight": weight, "shards": folder.fingerprint}
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
        self.worker_timeout_s = worker_timeout_s
        self._reading: list[ctypes.Array] = []
        if not isinstance(saved, SavedStreams):
            saved = SavedStreams.of(saved or [])
        self.worker_states = self._starting_states(saved)
        self.consumed = 0
        self.last_refs: list[list[int]] = []  # (source, shard, position) of each sample of the last batch
        self._iterator: Iterator[dict[str, Any]] | None = None

    def _starting_states(self, saved: SavedStreams) -> list[dict[str, Any]]:
        first_slot = self.rank * self.workers
        wanted = range(first_slot, first_slot + self.workers)
        if not len(saved):
            return [fresh_state(slot, len(self.folders)) for slot in wanted]
        own = saved.rank(self.rank) if self.rank < len(saved) else {}
        if own.get("format") == STATE_FORMAT and own.get("signature") == self.signature:
            return copy.deepcopy(own["workers"])
        layout = saved.layout()
        if all(entry["format"] == STATE_FORMAT and self._same_samples(entry["signature"]) for entry in layout):
            old = layout[0]["signature"]
            old_slots = old["world_size"] * old["workers"]
            summaries = [worker for entry in layout for worker in entry["workers"]]
            states = resplit(summaries, old_slots, self.slots, [len(folder) for folder in self.folders], wanted)
            states = [ref_pieces(state, saved.slot) for state in states]
            waiting = sum(piece_length(p) for state in states for c in state["sources"] for p in c.get("leftover", []))
            logger.info(
                "the checkpoint's data stream was read by %d process(es) x %d worker(s), this run has %d x %d: "
                "its position is re-split exactly",
                old["world_size"],
                old["workers"],
                self.slots // self.workers,
                self.workers,
                extra=EVERY_RANK,
            )
            logger.info(
                "this process reads %d samples of the epoch(s) in progress first (%d saved stream file(s) read)",
                waiting,
                saved.files_read,
                extra=EVERY_RANK,
            )
            return states
        epochs = [c["epoch"] for entry in layout for w in entry.get("workers", []) for c in w.get("sources", [])]
        epoch = max(epochs, default=-1) + 1
        logger.warning(
            "the data sources, seed or shuffle window changed since the checkpoint; the data stream starts afresh "
            "at epoch %d instead of resuming exactly",
            epoch,
            extra=EVERY_RANK,
        )
        return [fresh_state(slot, len(self.folders), epoch) for slot in wanted]

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
        try:
            item = next(self._iterator)
        except RuntimeError as err:
            if "DataLoader timed out" not in str(err):
                raise
            raise DataError(self._timeout_message()) from None
        for report in item["skipped"]:
            logger.warning("skipped an unreadable sample: %s", report, extra=EVERY_RANK)
        if "error" in item:
            raise item["error"]
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
        context = _worker_context()
        self._reading = [context.Array(ctypes.c_char, 1024, lock=False) for _ in range(self.num_workers)]
        dataset.reading = self._reading
        loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_unchanged,
            worker_init_fn=functools.partial(_init_worker, trainer_pid=os.getpid(), storage=configured_storage()),
            num_workers=self.num_workers,
            multiprocessing_context=context,
            timeout=self.worker_timeout_s,
            persistent_workers=True,
            prefetch_factor=2,
            pin_memory=self.pin_memory,
            # the loader draws its workers' seeds from this generator, not from torch's global one: creating it
            # must not shift the training process's random stream (a resumed run creates it at another step)
            generator=torch.Generator().manual_seed(self.settings.seed),
        )
        return iter(loader)

    def _timeout_message(self) -> str:
        """What a loader whose workers sent no batch for `worker_timeout_s` says: what each worker is reading."""
        reads = []
        for worker, shared in enumerate(self._reading):
            what = shared.value.decode(errors="replace")
            if what:
                where, _, since = what.rpartition(", since ")
                reads.append(f"worker {worker} has been reading {where} for {time.time() - float(since):.0f} s")
        doing = "; ".join(reads) or "no worker is inside a shard read (they are decoding or collating)"
        return (
            f"no batch came from the {self.num_workers} data worker(s) of this process for {self.worker_timeout_s:.0f} "
            f"s (data.worker_timeout_s): {doing}. A read that never returns is a hung file system or remote store: "
            "check that shard and its storage (`zidong data inspect FOLDER --checksums`), or raise "
            "data.worker_timeout_s if reads there are only slow"
        )

    def close(self) -> None:
        """Stops the worker processes now (not whenever the iterator happens to be garbage-collected)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # a DataLoader's multi-process iterator
        if shutdown is not None:
            shutdown()
        elif isinstance(iterator, Generator):  # num_workers=0: the stream itself
            iterator.close()
        for folder in self.folders:
            folder.close()
