"""A zidong JSONL manifest: one JSON object per line, the native form (docs/data.md lists its fields)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from zidong.data.sources.base import OpenOptions, Source, read_file, resolve, suffix_of
from zidong.errors import UserError


class JsonlSource(Source):
    """Records are the manifest's lines as bytes: the build's workers parse and check them, so a malformed line is
    a reject like any other."""

    kind = "jsonl"

    @classmethod
    def detects(cls, location: str) -> bool:
        return suffix_of(location) == ".jsonl"

    @classmethod
    def open(cls, location: str, options: OpenOptions) -> Source:
        if options.columns:
            raise UserError(f"{location}: --columns applies to tables and datasets; a JSONL manifest names its fields")
        content = read_file(location, "manifest ")
        lines = content.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if not any(line.strip() for line in lines):
            raise UserError(f"manifest {location} has no samples (expected one JSON object per line)")
        resolved, base = resolve(location)
        return cls(resolved, base, hashlib.sha256(content).hexdigest(), {}, lines)

    def raw(self, number: int) -> bytes:
        return self._rows[number - 1]

    def ids(self) -> Iterator[tuple[int, Any]]:
        """The raw lines: the caller parses them (a malformed one is rejected later)."""
        yield from enumerate(self._rows, start=1)

    def texts(self) -> Iterator[Any]:
        for line in self._rows:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a malformed line has no text to give; `data build` reports it
            yield record.get("text") if isinstance(record, dict) else None

    def where(self, number: int) -> dict[str, Any]:
        return {"line": number}

    def claim(self) -> dict[str, Any]:
        """The keys of builds written before other sources existed."""
        return {"manifest": self.location, "manifest_sha256": self.digest}
