"""`zidong data build`: a JSONL manifest -> validated, normalised webdataset-style tar shards + index.json.

    zidong data build corpus/manifest.jsonl --out shards/ --workers 8
    zidong data build corpus/manifest.jsonl --out shards/ --part 3/16     # one task of a job array

Layout of the output folder:

    0000-00000.tar ...   shards, named {part}-{shard}; members {key}.txt|jpg|png|flac|json per sample
    index.json           totals, per-shard sample counts and sha256, the build's settings (written last)
    rejects.jsonl        every rejected manifest line: line, id, field, reason
    .build/              progress of each part (what makes an interrupted build resumable)

Parts: manifest line n (1-based) belongs to part (n - 1) % N. Every part records each shard in
`.build/part-i-of-N.jsonl` right after the shard's atomic rename; a re-run of the same command skips the recorded
shards and carries on from the next line, so no sample is lost or written twice. The part that finishes last
merges all records into `index.json` and `rejects.jsonl`. Duplicate ids are found by a pre-pass over the whole
manifest (the first line with an id wins), so parts agree without talking to each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zidong.data.normalize import BuildSettings, Rejected, Sample, normalize_sample, parse_line
from zidong.data.remote import configure_storage, configured_storage, is_url
from zidong.data.shards import write_atomic, write_index
from zidong.data.sources import Source, is_hub_dataset, open_source
from zidong.errors import UserError
from zidong.utils.log import get_logger, progress

STATE_DIR = ".build"
logger = get_logger(__name__)


def names_shard_folder(location: str | Path) -> bool:
    """Does `location` name a shard folder (or an unfinished build of one) rather than a source to build? A URL
    does when it names no file (no suffix, no brace pattern) and no hub dataset; its index.json is read when the
    folder is opened."""
    if is_hub_dataset(location):
        return False
    if is_url(location):
        return "{" not in str(location) and not Path(str(location).split("?")[0]).suffix
    path = Path(location)
    return (path / "index.json").is_file() or (path / STATE_DIR).is_dir()


@dataclass
class ShardStats:
    samples: int = 0
    combinations: Counter = field(default_factory=Counter)
    audio_seconds: float = 0.0
    images: int = 0
    text_chars: int = 0
    languages: Counter = field(default_factory=Counter)

    def add(self, sample: Sample) -> None:
        self.samples += 1
        self.combinations[sample.combination] += 1
        self.audio_seconds += sample.meta.get("audio_seconds", 0.0)
        self.images += "vision" in sample.meta["modalities"]
        self.text_chars += sample.meta.get("text_chars", 0)
        if "lang" in sample.meta:
            self.languages[sample.meta["lang"]] += 1

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "combinations": dict(self.combinations), "languages": dict(self.languages)}


@dataclass
class BuildResult:
    part: tuple[int, int]
    samples: int
    rejected: int
    shards: int
    index_written: bool


def build(
    manifest: Path | Source,
    out: Path,
    settings: BuildSettings,
    workers: int = 1,
    part: tuple[int, int] = (0, 1),
) -> BuildResult:
    """Build (or finish building) part `part` of `manifest` (a JSONL manifest's path, or any `Source`) into `out`;
    merge the index when all parts are done.

    Raises UserError when the source cannot be read or `out` holds a build with other settings.
    """
    source = manifest if isinstance(manifest, Source) else open_source(manifest, kind="jsonl")
    index, count = part
    state = out / STATE_DIR
    _claim_output(out, state, source, settings, count)
    progress_file = state / f"part-{index:04d}-of-{count:04d}.jsonl"
    records = _completed_records(out, progress_file)
    if records and records[-1].get("done"):
        logger.info("part %d/%d of %s is already built", index, count, out)
    else:
        records = _build_part(source, out, settings, workers, part, progress_file, records)
    samples = sum(r.get("samples", 0) for r in records)
    rejected = sum(len(r["rejects"]) for r in records)
    shards = sum(1 for r in records if "shard" in r)
    return BuildResult(part, samples, rejected, shards, merge_if_complete(out, state, source, settings, count))


def _claim_output(out: Path, state: Path, source: Source, settings: BuildSettings, parts: int) -> None:
    """Create `out`, or check that the build already in it used the same source, settings and part count."""
    claim = {**source.claim(), "settings": dataclasses.asdict(settings), "parts": parts}
    claim_file = state / "build.json"
    try:
        state.mkdir(parents=True, exist_ok=True)
        if claim_file.exists():
            previous = json.loads(claim_file.read_text())
            if previous != claim:
                names = {
                    "manifest_sha256": "manifest content",
                    "manifest": "manifest path",
                    "parts": "part count",
                    "columns": "column mapping",
                }
                changed = [names.get(key, key) for key in claim if claim[key] != previous.get(key)]
                raise UserError(
                    f"{out} holds a build with a different {' and '.join(changed)}; re-run the command that started "
                    "it to finish that build, or choose another --out"
                )
        else:
            write_atomic(claim_file, json.dumps(claim, indent=2).encode())
    except OSError as err:
        raise UserError(f"cannot write into {out}: {err.strerror or err}") from None


def _completed_records(out: Path, progress_file: Path) -> list[dict[str, Any]]:
    """The part's progress records whose shards are intact; a torn last line or a missing shard ends the list."""
    records: list[dict[str, Any]] = []
    if not progress_file.exists():
        return records
    for text in progress_file.read_text().splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            break
        if "shard" in record:
            shard = out / record["shard"]
            if not shard.is_file() or shard.stat().st_size != record["bytes"]:
                break
        records.append(record)
    write_atomic(progress_file, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


def _duplicate_lines(source: Source) -> dict[int, int]:
    """Record -> the earlier record holding the same id (pre-pass over the whole source, so parts agree)."""
    first_seen: dict[str, int] = {}
    duplicates: dict[int, int] = {}
    for number, raw in source.ids():
        try:
            sample_id = parse_line(raw).get("id") if isinstance(raw, bytes) else raw
        except Rejected:
            continue
        if isinstance(sample_id, str):
            if sample_id in first_seen:
                duplicates[number] = first_seen[sample_id]
            else:
                first_seen[sample_id] = number
    return duplicates


def _build_part(
    source: Source,
    out: Path,
    settings: BuildSettings,
    workers: int,
    part: tuple[int, int],
    progress_file: Path,
    records: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    index, count = part
    duplicates = _duplicate_lines(source)
    resume_after = records[-1]["last_line"] if records else 0
    numbers = [n for n in range(1, len(source) + 1) if (n - 1) % count == index and n > resume_after]
    for leftover in out.glob(f"{index:04d}-*.tar.tmp*"):
        leftover.unlink()  # a shard an interrupted run did not finish
    pending: list[Sample] = []
    rejects: list[dict[str, Any]] = []
    shard_number = sum(1 for r in records if "shard" in r)
    jobs = ((n, source.raw(n), duplicates.get(n), source.where(n)) for n in numbers)
    with _pool(workers, source.base_dir, settings) as results:
        for number, outcome in progress(zip(numbers, results(jobs), strict=True), total=len(numbers), desc="build"):
            if isinstance(outcome, Sample):
                pending.append(outcome)
            else:
                rejects.append(outcome)
            if len(pending) == settings.shard_size:
                records.append(_write_shard(out, progress_file, index, shard_number, pending, rejects, number))
                shard_number += 1
                pending, rejects = [], []
    last_line = numbers[-1] if numbers else resume_after
    if pending:
        records.append(_write_shard(out, progress_file, index, shard_number, pending, rejects, last_line))
        rejects = []
    records.append({"done": True, "last_line": last_line, "rejects": rejects})
    _append_record(progress_file, records[-1])
    return records


def _normalize_job(job: tuple[int, bytes | dict[str, Any], int | None, dict[str, int]]) -> Sample | dict[str, Any]:
    number, raw, duplicate_of, where = job
    try:
        if duplicate_of is not None:
            first = (
                f"row {duplicate_of - 1}"
                if "row" in where
                else f"sample {duplicate_of} of the tars"
                if "key" in where
                else f"manifest line {duplicate_of}"
            )
            raise Rejected("id", f"duplicate id, first used on {first}")
        return normalize_sample(number, raw, _WORKER["manifest_dir"], _WORKER["settings"])
    except Rejected as rejected:
        sample_id = None
        with contextlib.suppress(Rejected):
            sample_id = (parse_line(raw) if isinstance(raw, bytes) else raw).get("id")
        return {
            **where,
            "id": sample_id if isinstance(sample_id, str) else None,
            "field": rejected.field,
            "reason": rejected.reason,
        }


_WORKER: dict[str, Any] = {}


def _init_worker(
    manifest_dir: Path | str, settings: BuildSettings, storage: dict[str, dict[str, Any]] | None = None
) -> None:
    if storage:  # a spawned worker starts without the fsspec settings of the command (`configure_storage`)
        configure_storage(storage)
    _WORKER.update(manifest_dir=manifest_dir, settings=settings)


@contextlib.contextmanager
def _pool(workers: int, manifest_dir: Path | str, settings: BuildSettings) -> Iterator:
    """Yield `map(jobs) -> outcomes in job order`, in this process or in `workers` spawned ones."""
    if workers <= 1:
        _init_worker(manifest_dir, settings)
        yield lambda jobs: map(_normalize_job, jobs)
        return
    # spawn, not fork: forking a process whose torch thread pools have started (resampling) can deadlock
    context = multiprocessing.get_context("spawn")
    initargs = (manifest_dir, settings, configured_storage())
    with context.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        yield lambda jobs: pool.imap(_normalize_job, jobs, chunksize=4)


def _write_shard(
    out: Path,
    progress_file: Path,
    part_index: int,
    shard_number: int,
    samples: list[Sample],
    rejects: list[dict[str, Any]],
    last_line: int,
) -> dict[str, Any]:
    name = f"{part_index:04d}-{shard_number:05d}.tar"
    stats = ShardStats()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for sample in samples:
            key = f"{sample.line:09d}"
            members = {**sample.files, "json": json.dumps(sample.meta).encode()}
            for extension, content in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mode, info.mtime = len(content), 0o644, 0
                archive.addfile(info, io.BytesIO(content))
            stats.add(sample)
    content = buffer.getvalue()
    write_atomic(out / name, content)
    record = {
        "shard": name,
        "samples": len(samples),
        "bytes": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
        "last_line": last_line,
        "stats": stats.to_json(),
        "rejects": rejects,
    }
    _append_record(progress_file, record)
    return record


def _append_record(progress_file: Path, record: dict[str, Any]) -> None:
    with progress_file.open("a") as stream:
        stream.write(json.dumps(record) + "\n")
        stream.flush()
        os.fsync(stream.fileno())


def merge_if_complete(out: Path, state: Path, source: Source, settings: BuildSettings, parts: int) -> bool:
    """Write index.json and rejects.jsonl from every part's records once every part is done."""
    all_records = []
    for index in range(parts):
        progress_file = state / f"part-{index:04d}-of-{parts:04d}.jsonl"
        records = [json.loads(t) for t in progress_file.read_text().splitlines()] if progress_file.exists() else []
        if not records or not records[-1].get("done"):
            return False
        all_records.extend(records)
    shards = [r for r in all_records if "shard" in r]
    totals = ShardStats()
    for record in shards:
        stats = record["stats"]
        totals.samples += stats["samples"]
        totals.combinations.update(stats["combinations"])
        totals.audio_seconds += stats["audio_seconds"]
        totals.images += stats["images"]
        totals.text_chars += stats["text_chars"]
        totals.languages.update(stats["languages"])
    rejects = sorted((reject for r in all_records for reject in r["rejects"]), key=lambda reject: reject["line"])
    index = {
        "samples": totals.samples,
        "combinations": dict(sorted(totals.combinations.items())),
        "audio_hours": round(totals.audio_seconds / 3600, 6),
        "images": totals.images,
        "text_characters": totals.text_chars,
        "languages": dict(sorted(totals.languages.items())),
        "rejected": len(rejects),
        "rejected_by_field": dict(sorted(Counter(reject["field"] for reject in rejects).items())),
        "shards": [{k: r[k] for k in ("shard", "samples", "bytes", "sha256")} for r in shards],
        **{key: value for key, value in source.claim().items() if key != "manifest_sha256"},
        "settings": dataclasses.asdict(settings),
    }
    write_index(out, index, rejects)
    return True
