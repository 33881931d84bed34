"""CSV and TSV tables with a header line (open_clip's layout): one sample per row, columns mapped to fields."""

from __future__ import annotations

import csv
import io
from typing import Any

from zidong.data.sources.base import OpenOptions, Source, digest_of, map_columns, read_file, resolve, suffix_of
from zidong.errors import UserError


class CsvSource(Source):
    """Rows of a comma-separated table; an empty cell in a mapped column is a missing value."""

    kind = "csv"
    delimiter = ","

    @classmethod
    def detects(cls, location: str) -> bool:
        return suffix_of(location) == f".{cls.kind}"

    @classmethod
    def open(cls, location: str, options: OpenOptions) -> Source:
        content = read_file(location)
        try:
            text = content.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise UserError(f"{location} is not UTF-8 text (byte {err.start}); save the table as UTF-8") from None
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=cls.delimiter)
        rows = list(reader)
        header = reader.fieldnames or []
        if not rows:
            raise UserError(
                f"{location} has no rows under its header (expected a header line, then one sample per row)"
            )
        mapping = map_columns(location, header, options.columns, need_two=not options.single)
        resolved, base = resolve(location)
        return cls(resolved, base, digest_of(content, mapping), mapping, rows)

    def record(self, row: dict[str, Any], number: int) -> dict[str, Any]:
        mapped = set(self.columns.values())
        return super().record({c: None if v == "" and c in mapped else v for c, v in row.items()}, number)


class TsvSource(CsvSource):
    """Rows of a tab-separated table."""

    kind = "tsv"
    delimiter = "\t"
