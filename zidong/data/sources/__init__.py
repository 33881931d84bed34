"""What `zidong data build` reads: one class per source kind, and the registry that names them.

    zidong data build manifest.jsonl --out shards/                        one JSON object per line (the native form)
    zidong data build pairs.tsv --out shards/ --columns image=filepath text=title     open_clip's layout
    zidong data build my_dataset/ --out shards/ --split train             a `save_to_disk` folder
    zidong data build train-00000.parquet --out shards/                   a file `datasets.load_dataset` reads
    zidong data build 'tars/{00000..00099}.tar' --out shards/             WebDataset tars other tools wrote
    zidong data build 's3://bucket/tars/{00000..00099}.tar' --out shards/  any of these at an fsspec URL

Each kind is a `Source` subclass (base.py says what the build asks of one) in a module of its own; `SOURCE_KINDS`
maps `--source-kind` names to them, in the order detection asks them. A new kind joins with
`register_source_kind(MySource)`; `--source-kind` then takes its name. All records go through the same
validation, reject report and shard writer.

Columns map to modalities by name (`--columns text=caption image=jpg audio=audio id=key`); unmapped modalities
take the first column present among the defaults (`DEFAULT_COLUMNS`). A table without an id column gets `row-N`
ids. A source at a URL (`https://`, `s3://`, `gs://`, `hf://`, ...: whatever fsspec reaches) is read the same way:
a manifest or table is read into memory (relative paths in it then resolve against its URL), dataset files go to
`datasets` as URLs, and WebDataset tars are downloaded first.
"""

from __future__ import annotations

from pathlib import Path

from zidong.data.remote import is_url
from zidong.data.sources.base import DEFAULT_COLUMNS, FIELDS, OpenOptions, Source
from zidong.data.sources.hf import HfDatasetSource, is_hub_dataset
from zidong.data.sources.jsonl import JsonlSource
from zidong.data.sources.table import CsvSource, TsvSource
from zidong.data.sources.webdataset import WebDatasetSource, expand_braces
from zidong.errors import UserError

__all__ = [
    "DEFAULT_COLUMNS", "FIELDS", "SOURCE_KINDS", "OpenOptions", "Source", "expand_braces", "is_hub_dataset",
    "open_source", "parse_columns", "register_source_kind",
]  # fmt: skip

# detection asks in this order: tars before folders (a folder of tars), manifests and tables before dataset files
SOURCE_KINDS: dict[str, type[Source]] = {
    kind.kind: kind for kind in (WebDatasetSource, JsonlSource, CsvSource, TsvSource, HfDatasetSource)
}


def register_source_kind(kind: type[Source]) -> type[Source]:
    """Add a source kind (usable as a class decorator): `--source-kind NAME` reads with it, and detection asks it
    before the built-in kinds."""
    if kind.kind in SOURCE_KINDS and SOURCE_KINDS[kind.kind] is not kind:
        raise ValueError(f"a source kind named {kind.kind!r} is already registered ({SOURCE_KINDS[kind.kind]})")
    others = {name: known for name, known in SOURCE_KINDS.items() if name != kind.kind}
    SOURCE_KINDS.clear()  # in place: callers hold this dict
    SOURCE_KINDS.update({kind.kind: kind, **others})
    return kind


def open_source(
    location: str | Path,
    columns: dict[str, str] | None = None,
    split: str | None = None,
    kind: str | None = None,
    single: bool = False,
    streaming: bool = False,
) -> Source:
    """The source at `location`, its kind (a name in `SOURCE_KINDS`) detected from it or given. `single`: one
    modality is enough (a tokenizer reads only text; an audio classification set for `zidong eval` has only audio).
    `streaming`: read a Hugging Face dataset as a stream, storing none of it (a hub dataset id always is)."""
    location = str(location)
    if kind is not None and kind not in SOURCE_KINDS:
        raise UserError(f"--source-kind {kind}: no such source kind; choose from {', '.join(SOURCE_KINDS)}")
    reader = SOURCE_KINDS[kind] if kind else _detect(location)
    if streaming and not reader.streams:
        raise UserError(f"{location}: --streaming reads Hugging Face datasets; this is a {reader.kind} source")
    return reader.open(location, OpenOptions(columns or {}, split, single, streaming))


def parse_columns(pairs: list[str]) -> dict[str, str]:
    """`text=caption image=jpg` -> {"text": "caption", "image": "jpg"}; raises UserError on anything else."""
    columns = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not column:
            raise UserError(f"--columns {pair}: expected FIELD=COLUMN, e.g. text=caption")
        if name not in FIELDS:
            raise UserError(f"--columns {pair}: {name!r} is not a field; choose from {', '.join(FIELDS)}")
        columns[name] = column
    return columns


def _detect(location: str) -> type[Source]:
    found = next((kind for kind in SOURCE_KINDS.values() if kind.detects(location)), None)
    if found is not None:
        return found
    if is_url(location) and not Path(location.split("?")[0]).suffix:
        raise UserError(
            f"{location}: a folder at a URL is read as WebDataset tars with --source-kind webdataset, as a "
            "`save_to_disk` dataset with --source-kind hf; or give its files (a brace pattern such as "
            "URL/{00000..00099}.tar)"
        )
    raise UserError(
        f"{location}: cannot tell what kind of source this is from its name; a JSONL manifest ends in .jsonl, a table in "
        ".csv or .tsv, dataset files in .parquet, .arrow or .json, a dataset folder is a folder"
    )
