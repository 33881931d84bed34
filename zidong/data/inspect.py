"""`zidong data inspect DIR`: the index of a shard folder as a readable summary, checked against the shards.

Every shard listed in `index.json` must exist with the recorded size and sample count (read from the tar
headers); `--checksums` also recomputes each sha256. Shards on disk that the index does not list are flagged too.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Any


def check_shards(folder: Path, index: dict[str, Any], checksums: bool = False) -> list[str]:
    """Problems where the shards on disk differ from the index (an empty list when they agree)."""
    problems = []
    listed = set()
    for entry in index["shards"]:
        path = folder / entry["shard"]
        listed.add(entry["shard"])
        if not path.is_file():
            problems.append(f"{entry['shard']}: listed in the index but missing")
            continue
        if path.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['shard']}: {path.stat().st_size} bytes, the index says {entry['bytes']}")
            continue
        try:
            with tarfile.open(path) as archive:
                keys = {Path(name).name.split(".", 1)[0] for name in archive.getnames()}
        except (tarfile.TarError, OSError) as err:
            problems.append(f"{entry['shard']}: unreadable tar ({err})")
            continue
        if len(keys) != entry["samples"]:
            problems.append(f"{entry['shard']}: {len(keys)} samples, the index says {entry['samples']}")
        if checksums and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            problems.append(f"{entry['shard']}: sha256 differs from the index")
    for path in sorted(folder.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: a shard on disk that the index does not list")
    if sum(entry["samples"] for entry in index["shards"]) != index["samples"]:
        problems.append("the shard sample counts do not add up to the index's total")
    return problems


def summary(folder: Path, index: dict[str, Any], problems: list[str]) -> str:
    """The readable report `zidong data inspect` prints."""
    total_bytes = sum(entry["bytes"] for entry in index["shards"])
    lines = [
        f"{folder}: {len(index['shards'])} shards, {total_bytes / 1e6:.1f} MB",
        f"samples: {index['samples']:,}   rejected: {index['rejected']:,}"
        + ("  (reasons in rejects.jsonl)" if index["rejected"] else ""),
    ]
    width = max((len(name) for name in index["combinations"]), default=0)
    for combination, count in index["combinations"].items():
        share = count / index["samples"] if index["samples"] else 0.0
        lines.append(f"  {combination:<{width}}  {count:>10,}  {share:6.1%}")
    if index["rejected_by_field"]:
        lines.append("rejected by field: " + ", ".join(f"{k} {v:,}" for k, v in index["rejected_by_field"].items()))
    lines.append(
        f"audio: {index['audio_hours']:.3f} h   images: {index['images']:,}   "
        f"text: {index['text_characters']:,} characters"
    )
    if index["languages"]:
        lines.append("languages: " + ", ".join(f"{k} {v:,}" for k, v in index["languages"].items()))
    settings = index.get("settings", {})
    lines.append("built with: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if problems:
        lines.append(f"INDEX DOES NOT MATCH THE SHARDS ({len(problems)} problems):")
        lines.extend(f"  - {problem}" for problem in problems)
    else:
        lines.append("check: the index matches the shards")
    return "\n".join(lines) + "\n"
