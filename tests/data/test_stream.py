"""The training stream: split by rank and worker, weighted mixing, exact resume with workers, bad samples."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data.corpus import TEXT_COMBINATIONS, make_corpus
from zidong import ZidongProcessor
from zidong.data import stream as stream_module
from zidong.data.saved_stream import RANK_FILE, SavedStreams, layout_entry, write_layout
from zidong.data.shards import ShardFolder
from zidong.data.slots import DataError, EpochPlan, SlotStream, StreamSettings, fresh_state
from zidong.data.stream import StreamLoader
from zidong.data.transforms import SamplePipeline
from zidong.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 samples in 3 shards, every combination, captions `s item N ...`."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), 48)


def item_numbers(batch: dict[str, torch.Tensor], processor: ZidongProcessor) -> list[int]:
    texts = processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return [int(re.search(r"item (\d+)", text).group(1)) for text in texts]


def whole_epoch_plan(counts: list[int], seed: int, source: int, epoch: int, slot: int, slots: int, window: int):
    """The order every zidong-stream/1 checkpoint was saved in, built for the whole epoch at once (as the stream
    did before it computed plans a window at a time): shards in a seeded order, each shard's samples in a seeded
    order, the concatenation cut into `slots` blocks, each block shuffled in windows."""
    order = np.random.default_rng([seed, 0, source, epoch]).permutation(len(counts))
    total = sum(counts)
    start, stop = slot * total // slots, (slot + 1) * total // slots
    pieces, offset = [], 0
    for shard in order:
        low, high = max(start, offset), min(stop, offset + counts[shard])
        if low < high:
            positions = np.random.default_rng([seed, 1, source, epoch, shard]).permutation(counts[shard])
            chosen = positions[low - offset : high - offset]
            pieces.append(np.stack([np.full_like(chosen, shard), chosen], axis=1))
        offset += counts[shard]
    plan = np.concatenate(pieces) if pieces else np.zeros((0, 2), dtype=np.int64)
    for begin in range(0, len(plan), window):
        chunk = plan[begin : begin + window]
        plan[begin : begin + window] = chunk[
            np.random.default_rng([seed, 2, source, epoch, slot, begin]).permutation(len(chunk))
        ]
    return plan


def as_array(plan: EpochPlan) -> np.ndarray:
    return np.array([plan[index] for index in range(len(plan))], dtype=np.int64).reshape(-1, 2)


@pytest.mark.parametrize("counts", [[5], [16, 16, 16, 7], [3, 9, 1, 12, 4], [1000, 1000, 123], [4, 0, 9, 0, 30]])
@pytest.mark.parametrize("slots", [1, 2, 3, 4, 7, 8])
def test_slots_of_an_epoch_are_disjoint_and_complete(counts: list[int], slots: int) -> None:
    if sum(counts) < slots:
        pytest.skip("fewer samples than slots is refused by the loader")
    plans = [as_array(EpochPlan(counts, 0, 0, 3, slot, slots, window=7)) for slot in range(slots)]
    seen = [tuple(pair) for plan in plans for pair in plan.tolist()]
    assert len(seen) == len(set(seen)) == sum(counts)
    assert set(seen) == {(shard, i) for shard, count in enumerate(counts) for i in range(count) if count}
    assert max(map(len, plans)) - min(map(len, plans)) <= 1
    again = EpochPlan(counts, 0, 0, 3, 0, slots, window=7)
    assert np.array_equal(plans[0], as_array(again))
    if sum(counts) > 20:
        assert not np.array_equal(plans[0], as_array(EpochPlan(counts, 0, 0, 4, 0, slots, window=7)))


@pytest.mark.parametrize("window", [1, 7, 64, 10_000])
@pytest.mark.parametrize(
    ("counts", "slots"), [([5], 1), ([3, 9, 1, 12, 4], 3), ([1000, 1000, 123], 8), ([4, 0, 9, 0, 30], 2)]
)
def test_plans_computed_a_window_at_a_time_keep_the_saved_order(counts: list[int], slots: int, window: int) -> None:
    """Checkpoints saved before plans were computed lazily resume on the same samples: same pairs, same order,
    whether read one position at a time (backwards too) or in ranges that cross windows."""
    for slot in range(slots):
        expected = whole_epoch_plan(counts, 5, 1, 2, slot, slots, window)
        plan = EpochPlan(counts, 5, 1, 2, slot, slots, window)
        assert len(plan) == len(expected)
        assert np.array_equal(as_array(plan), expected)
        assert [plan[index] for index in reversed(range(len(plan)))] == [
            tuple(pair) for pair in expected[::-1].tolist()
        ]
        for begin, end in ((0, len(plan)), (3, 3 + 2 * window + 1), (len(plan) - 2, len(plan) + 5), (4, 4)):
            assert np.array_equal(plan.rows(begin, end), expected[begin:end])
        with pytest.raises(IndexError):
            plan[len(plan)]


def test_a_plan_of_two_billion_samples_stays_small() -> None:
    """Memory per slot does not grow with the corpus: 2B samples in 200,000 shards, 64 slots, one slot reading
    its first 20,000 pairs and a window far into its block, holds under 50 MB at its peak (numpy's allocations,
    traced). A whole-epoch plan of that slot alone would be 500 MB."""
    import tracemalloc

    counts = [10_000] * 200_000
    tracemalloc.start()
    try:
        plan = EpochPlan(counts, 0, 0, 0, slot=5, slots=64, window=10_000)
        pairs = [plan[index] for index in range(20_000)]
        far = plan.rows(len(plan) - 15_000, len(plan))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(plan) == 2_000_000_000 // 64
    assert len(set(pairs)) == 20_000
    assert len(far) == 15_000
    assert peak < 50e6, f"{peak / 1e6:.0f} MB"


def test_ranks_and_workers_split_the_corpus(tmp_path: Path, processor: ZidongProcessor) -> None:
    shards = make_corpus(tmp_path, 48, combinations=TEXT_COMBINATIONS)
    settings = StreamSettings(batch_size=4, bucket_pool=3)  # 2 ranks x 2 workers: 12 samples = 3 batches a slot
    pipeline = SamplePipeline(processor, train=True)
    per_rank = []
    for rank in range(2):
        loader = StreamLoader([(shards, 1.0)], settings, pipeline, num_workers=2, rank=rank, world_size=2)
        per_rank.append([n for _, batch in zip(range(6), loader, strict=False) for n in item_numbers(batch, processor)])
        loader.close()
    assert len(per_rank[0]) == len(per_rank[1]) == 24
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(48))


def test_resumed_stream_equals_uninterrupted_with_two_workers(corpus: Path, processor: ZidongProcessor) -> None:
    # 2 slots of 24 samples, pools of 16: the positions below fall inside a pool, on worker 0 and on worker 1,
    # and past an epoch boundary
    settings = StreamSettings(batch_size=4, bucket_pool=4, seed=5)
    pipeline = SamplePipeline(processor, train=True)

    def loader(saved=None) -> StreamLoader:
        return StreamLoader([(corpus, 1.0)], settings, pipeline, num_workers=2, saved=saved)

    straight = loader()
    expected = [batch for _, batch in zip(range(16), straight, strict=False)]
    straight.close()
    for stop in (3, 8, 13):
        first = loader()
        head = [batch for _, batch in zip(range(stop), first, strict=False)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        first.close()
        resumed = loader([state])
        tail = [batch for _, batch in zip(range(16 - stop), resumed, strict=False)]
        resumed.close()
        for position, (got, want) in enumerate(zip(head + tail, expected, strict=True)):
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), f"resumed at {stop}: batch {position} differs in {key}"


def test_weighted_mixing_follows_the_weights(tmp_path: Path, processor: ZidongProcessor) -> None:
    folders = [
        ShardFolder(make_corpus(tmp_path / name, 40, seed=i, prefix=name, combinations=(("text", "vision"),)))
        for i, name in enumerate(("a", "b"))
    ]
    stream = SlotStream(
        folders, [3.0, 1.0], StreamSettings(batch_size=8), 1, SamplePipeline(processor, train=True), fresh_state(0, 2)
    )
    texts = []
    for samples, _, _, _ in stream:
        texts += [sample.text for sample in samples]
        if len(texts) >= 1600:
            break
    sources = Counter(text.split()[0] for text in texts)
    assert abs(sources["a"] / len(texts) - 0.75) < 0.03
    # each source goes through whole epochs: every sample of the small share shows up about equally often
    seen_b = Counter(re.search(r"item (\d+)", t).group(1) for t in texts if t.startswith("b"))
    assert len(seen_b) == 40
    assert max(seen_b.values()) - min(seen_b.values()) <= 2


def test_mixing_differs_by_seed_and_repeats_with_it(corpus: Path, tmp_path: Path, processor: ZidongProcessor) -> None:
    other = make_corpus(tmp_path, 40, prefix="b")
    pipeline = SamplePipeline(processor, train=False)

    def first_batches(seed: int) -> list[torch.Tensor]:
        loader = StreamLoader([(corpus, 1.0), (other, 1.0)], StreamSettings(batch_size=6, seed=seed), pipeline)
        return [batch["input_ids"] for _, batch in zip(range(3), loader, strict=False)]

    assert all(torch.equal(a, b) for a, b in zip(first_batches(1), first_batches(1), strict=True))
    assert not all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(first_batches(1), first_batches(2), strict=True)
    )


def damage_member(shards: Path, extension: str) -> tuple[str, str]:
    """Overwrite the first `.extension` member of the first shard with garbage; returns (shard, key)."""
    path = sorted(shards.glob("*.tar"))[0]
    with tarfile.open(path) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(f".{extension}"))
    with open(path, "r+b") as handle:
        handle.seek(member.offset_data)
        handle.write(b"\x00garbage" * (member.size // 8))
    return path.name, member.name.split(".")[0]


def test_a_damaged_sample_is_skipped_counted_and_logged(
    tmp_path: Path, processor: ZidongProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    shards = make_corpus(tmp_path, 48)
    shard, key = damage_member(shards, "png")
    settings = StreamSettings(batch_size=4, max_bad_fraction=0.05)
    logging.getLogger("zidong").addHandler(caplog.handler)
    try:
        loader = StreamLoader([(shards, 1.0)], settings, SamplePipeline(processor, train=True))
        batches = [batch for _, batch in zip(range(24), loader, strict=False)]  # two epochs
    finally:
        logging.getLogger("zidong").removeHandler(caplog.handler)
    state = loader.state_dict()["workers"][0]
    assert state["bad"] == 2
    assert state["read"] == 96
    assert sum(len(batch["vision_present"]) for batch in batches) == 94
    skips = [r.getMessage() for r in caplog.records if "skipped an unreadable sample" in r.getMessage()]
    assert len(skips) == 2
    assert f"{shard} key {key}: image does not decode" in skips[0]


@pytest.mark.parametrize("damage", ["truncated shard", "missing shard"])
def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path: Path, processor: ZidongProcessor, damage: str) -> None:
    shards = make_corpus(tmp_path, 48)
    path = sorted(shards.glob("*.tar"))[1]
    if damage == "missing shard":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    loader = StreamLoader([(shards, 1.0)], StreamSettings(batch_size=4), SamplePipeline(processor, train=True))

    def read_200_batches() -> None:
        for _ in range(200):
            next(loader)

    with pytest.raises(DataError, match=r"could not be decoded, more than data.max_bad_fraction=0.01") as caught:
        read_200_batches()
    assert path.name in str(caught.value)
    assert "zidong data inspect" in str(caught.value)


def test_a_changed_seed_restarts_at_the_next_epoch(
    corpus: Path, processor: ZidongProcessor, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = SamplePipeline(processor, train=True)
    loader = StreamLoader([(corpus, 1.0)], StreamSettings(batch_size=4), pipeline)
    for _ in range(20):  # into epoch 1
        next(loader)
    state = loader.state_dict()
    logging.getLogger("zidong").addHandler(caplog.handler)
    try:
        resumed = StreamLoader([(corpus, 1.0)], StreamSettings(batch_size=4, seed=1), pipeline, saved=[state])
    finally:
        logging.getLogger("zidong").removeHandler(caplog.handler)
    next_epoch = state["workers"][0]["sources"][0]["epoch"] + 1  # the cursor runs ahead by the pools drawn
    assert next_epoch >= 2
    assert f"starts afresh at epoch {next_epoch}" in caplog.text
    assert resumed.state_dict()["workers"][0]["sources"] == [{"epoch": next_epoch, "position": 0}]


def read(loader: StreamLoader, batches: int) -> list[tuple[int, ...]]:
    """The (source, shard, position) of every sample of the next `batches` batches."""
    seen = []
    for _ in range(batches):
        next(loader)
        seen += [tuple(ref) for ref in loader.last_refs]
    loader.close()
    return seen


@pytest.mark.parametrize(
    "layouts",
    [[(2, 2), (1, 1), (3, 1)], [(1, 2), (4, 1), (2, 2)]],
    ids=["2x2-1x1-3x1", "1x2-4x1-2x2"],
)
def test_another_process_layout_continues_the_epoch_exactly(
    corpus: Path, processor: ZidongProcessor, layouts: list[tuple[int, int]]
) -> None:
    # 48 samples; per process 2 batches of 4 in the first two layouts: pools of 2 batches leave drawn, not yet
    # handed out samples in the states that are re-split. The last layout reads whole pools past the epoch.
    settings = StreamSettings(batch_size=4, bucket_pool=2, seed=7, shuffle_window=5)
    pipeline = SamplePipeline(processor, train=False)
    seen: list[tuple[int, ...]] = []
    saved: list[dict] = []
    for phase, (world, workers) in enumerate(layouts):
        states = []
        for rank in range(world):
            loader = StreamLoader([(corpus, 1.0)], settings, pipeline, workers, rank, world, saved=saved)
            seen += read(loader, 2 if phase < 2 else 4)
            states.append(json.loads(json.dumps(loader.state_dict())))
        saved = states
    # the last layout reads past the epoch: every sample at least once, and a repeat only for each read beyond 48
    counts = Counter(seen)
    assert len(counts) == 48
    assert max(counts.values()) <= 2
    assert sum(count == 2 for count in counts.values()) == len(seen) - 48 > 0


def states_after_one_batch(corpus: Path, settings: StreamSettings, pipeline: SamplePipeline, processes: int):
    """The `state_dict()` of each of `processes` processes (no workers) after each read one batch."""
    states = []
    for rank in range(processes):
        loader = StreamLoader([(corpus, 1.0)], settings, pipeline, 0, rank, processes)
        read(loader, 1)
        states.append(json.loads(json.dumps(loader.state_dict())))
    return states


def test_every_process_computes_the_same_resplit(corpus: Path, processor: ZidongProcessor) -> None:
    settings = StreamSettings(batch_size=4, bucket_pool=2)
    pipeline = SamplePipeline(processor, train=False)
    saved = states_after_one_batch(corpus, settings, pipeline, 2)
    states = [StreamLoader([(corpus, 1.0)], settings, pipeline, 0, r, 3, saved=saved).state_dict() for r in range(3)]
    leftover = [w["sources"][0]["leftover"] for state in states for w in state["workers"]]
    counts = [sum(len(p["refs"]) if "refs" in p else p["stop"] - p["start"] for p in pieces) for pieces in leftover]
    assert sum(counts) == 48 - 8  # what is left of the epoch (drawn and not): shared out evenly
    assert max(counts) - min(counts) <= 1
    assert all(w["sources"][0]["epoch"] == 1 for state in states for w in state["workers"])


def save_like_a_checkpoint(folder: Path, states: list[dict], layout: bool = True) -> Path:
    """The files a checkpoint holds for these states (zidong.train.checkpoint.save_checkpoint writes the same)."""
    folder.mkdir()
    for rank, state in enumerate(states):
        (folder / RANK_FILE.format(rank=rank)).write_text(json.dumps(state))
    if layout:
        write_layout(folder, [layout_entry(state) for state in states])
    return folder


def test_a_layout_change_reads_only_the_saved_states_a_process_needs(
    corpus: Path, processor: ZidongProcessor, tmp_path: Path
) -> None:
    """4 processes x 1 worker resumed as 8 x 1 from checkpoint files: each new process reads the layout summary
    and at most two processes' states (not all four), and ends in the same states as from every state in memory;
    a checkpoint without the summary (written before it existed) gives the same states from every file."""
    settings = StreamSettings(batch_size=2, bucket_pool=3)  # pools of 3 batches: drawn samples wait in each state
    pipeline = SamplePipeline(processor, train=False)
    states = states_after_one_batch(corpus, settings, pipeline, 4)
    assert all(worker["pending"] for state in states for worker in state["workers"])
    expected = [StreamLoader([(corpus, 1.0)], settings, pipeline, 0, r, 8, saved=states).state_dict() for r in range(8)]
    for folder, most in (
        (save_like_a_checkpoint(tmp_path / "new", states), 3),
        (save_like_a_checkpoint(tmp_path / "old", states, layout=False), 4),
    ):
        for rank in range(8):
            saved = SavedStreams.in_folder(folder)
            resumed = StreamLoader([(corpus, 1.0)], settings, pipeline, 0, rank, 8, saved=saved)
            assert resumed.state_dict() == expected[rank]
            assert 1 <= saved.files_read <= most, (folder.name, rank)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "data-rank1.json").unlink(), r"processes \[0, 2\], not of 0 to 1"),
        (lambda folder: (folder / "data-rank0.json").write_text("{trunc"), r"cannot read the data-stream state"),
        (lambda folder: (folder / "data-layout.json").write_text("{}"), r"is not the data-stream layout"),
        (lambda folder: (folder / "data-rank0.json").write_text('{"workers": []}'), r"holds no reader slot 0"),
    ],
    ids=["missing-rank", "truncated-rank", "foreign-layout", "slot-missing"],
)
def test_a_damaged_saved_stream_is_refused_with_its_file(
    corpus: Path, processor: ZidongProcessor, tmp_path: Path, damage, message: str
) -> None:
    settings = StreamSettings(batch_size=2, bucket_pool=3)
    pipeline = SamplePipeline(processor, train=False)
    states = states_after_one_batch(corpus, settings, pipeline, 3)
    folder = save_like_a_checkpoint(tmp_path / "step", states)
    damage(folder)
    with pytest.raises(UserError, match=message) as error:
        StreamLoader([(corpus, 1.0)], settings, pipeline, 0, 0, 2, saved=SavedStreams.in_folder(folder))
    assert "checkpoint" in str(error.value)


def test_a_read_that_never_returns_ends_with_a_message_naming_the_shard(
    tmp_path: Path, processor: ZidongProcessor
) -> None:
    """One shard is a named pipe nobody writes to: opening it blocks forever, as a read from a hung file system
    does. One worker reads the whole epoch into its first pool, so it reaches that shard; the loader gives up
    after `worker_timeout_s` with a DataError naming the shard, instead of waiting forever."""
    shards = make_corpus(tmp_path, 48, combinations=TEXT_COMBINATIONS)
    hung = sorted(shards.glob("*.tar"))[1]
    hung.unlink()
    os.mkfifo(hung)
    timeout = 15  # longer than a worker takes to start on a loaded machine: only the hung read can exhaust it
    settings = StreamSettings(batch_size=4, bucket_pool=16)
    loader = StreamLoader([(shards, 1.0)], settings, SamplePipeline(processor, train=True), 1, worker_timeout_s=timeout)
    started = time.monotonic()
    try:
        with pytest.raises(DataError, match=r"data\.worker_timeout_s\): worker 0 has been reading") as error:
            next(loader)
    finally:
        loader.close()
    assert f"{hung}, sample " in str(error.value), str(error.value)
    assert timeout <= time.monotonic() - started < timeout + 30


def test_too_few_samples_for_the_slots_is_refused(corpus: Path, processor: ZidongProcessor) -> None:
    with pytest.raises(UserError, match=r"holds 48 samples, fewer than the 64 reader slots \(32 processes x 2"):
        StreamLoader([(corpus, 1.0)], StreamSettings(batch_size=4), SamplePipeline(processor, train=True), 2, 0, 32)


def test_a_folder_that_is_not_a_shard_folder_is_refused(tmp_path: Path, processor: ZidongProcessor) -> None:
    with pytest.raises(UserError, match=r"has no index\.json"):
        StreamLoader([(tmp_path, 1.0)], StreamSettings(batch_size=4), SamplePipeline(processor, train=True))


KILLED_TRAINER = """
import json, os, sys
from zidong import ZidongProcessor
from zidong.data.stream import StreamLoader, StreamSettings
from zidong.data.transforms import SamplePipeline

pipeline = SamplePipeline(ZidongProcessor.from_pretrained(sys.argv[2]), train=True)
loader = StreamLoader([(sys.argv[1], 1.0)], StreamSettings(batch_size=4, seed=0), pipeline, num_workers=2)
next(loader)
print(json.dumps([worker.pid for worker in loader._iterator._workers]), flush=True)
os.kill(os.getpid(), 9)
"""


def test_workers_end_when_the_training_process_is_killed(
    corpus: Path, processor: ZidongProcessor, tmp_path: Path
) -> None:
    processor.save_pretrained(tmp_path / "processor")
    # the output pipes close only once every process holding them has ended: the workers and their forkserver
    # outlive a killed trainer unless they watch it, and then this call runs into its timeout
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", KILLED_TRAINER, str(corpus), str(tmp_path / "processor")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert len(json.loads(done.stdout)) == 2
    assert time.monotonic() - started < 60


def test_a_single_process_stream_left_open_ends_quietly(
    corpus: Path, processor: ZidongProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop over a num_workers=0 stream left before its end: the generator is closed at garbage collection,
    at interpreter exit after module globals are cleared, where `except UserError` printed "Exception ignored
    ... catching classes that do not inherit from BaseException"."""
    loader = StreamLoader([(corpus, 1.0)], StreamSettings(batch_size=4), SamplePipeline(processor, train=True))
    next(loader)
    generator = loader._iterator
    monkeypatch.setattr(stream_module, "UserError", None)  # what interpreter shutdown does to module globals
    generator.close()
    monkeypatch.undo()
    # and close() ends the generator itself, not only worker processes
    again = StreamLoader([(corpus, 1.0)], StreamSettings(batch_size=4), SamplePipeline(processor, train=True))
    next(again)
    generator = again._iterator
    again.close()
    assert generator.gi_frame is None  # finished
