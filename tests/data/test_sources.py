"""`zidong data build` from other sources: the same 48 samples as a JSONL manifest, a TSV table, a `save_to_disk`
folder and a parquet file (the dataset ones written by `datasets` itself, images and audio embedded as bytes) give
shard folders with identical samples; and each kind of bad source or row is reported as it should be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from tests.data.fixtures import write_image, write_manifest
from tests.data.samples import SAMPLES, as_dataset, assert_same_samples, read_shards
from tests.helpers import run_cli, serve_folder
from zidong.data.build import names_shard_folder
from zidong.data.sources import OpenOptions, Source
from zidong.data.tokenizer import read_sentences
from zidong.errors import UserError


def test_a_tsv_with_open_clip_columns_gives_the_same_samples(media_samples, from_jsonl, tmp_path: Path) -> None:
    _, samples = media_samples
    rows = ["id\ttitle\tfilepath\twav\tlang\tsource"]
    for s in samples:
        rows.append(
            "\t".join([s["id"], s.get("text", ""), s.get("image", ""), s.get("audio", ""), s["lang"], s["source"]])
        )
    table = tmp_path / "pairs.tsv"
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "tsv"
    result = run_cli(
        "data", "build", str(table), "--out", str(out), "--columns", "text=title,image=filepath", "shard_size=16"
    )
    assert result.returncode == 0, result.stderr
    assert f"{SAMPLES} samples in 3 shards, 0 rejected" in result.stdout
    assert_same_samples(from_jsonl, read_shards(out))
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "tsv"
    assert index["columns"] == {"id": "id", "text": "title", "image": "filepath", "audio": "wav", "lang": "lang"}


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_a_hugging_face_dataset_gives_the_same_samples(media_samples, from_jsonl, tmp_path: Path, layout: str) -> None:
    _, samples = media_samples
    dataset = as_dataset(samples)
    if layout == "save_to_disk":
        source = tmp_path / "dataset"
        datasets.DatasetDict({"train": dataset, "test": dataset.select(range(4))}).save_to_disk(str(source))
        extra = ["--split", "train"]
    else:
        source = tmp_path / "train.parquet"
        dataset.to_parquet(str(source))
        extra = []
    out = tmp_path / "shards"
    result = run_cli("data", "build", str(source), "--out", str(out), *extra, "shard_size=16")
    assert result.returncode == 0, result.stderr
    assert_same_samples(from_jsonl, read_shards(out))  # default columns: caption, jpg, flac, id, lang


@pytest.mark.parametrize("kind", ["jsonl", "tsv", "parquet"])
def test_the_same_sources_at_a_url_give_the_same_samples(media_samples, from_jsonl, tmp_path: Path, kind: str) -> None:
    folder, samples = media_samples
    served = tmp_path / "served"
    served.mkdir()
    shutil.copytree(folder / "media", served / "media")

    def relative(path: str | None) -> str:  # media paths relative to the manifest: they resolve against its URL
        return "" if path is None else f"media/{Path(path).name}"

    if kind == "jsonl":
        rows = [{**s, **{f: relative(s[f]) for f in ("image", "audio") if f in s}} for s in samples]
        write_manifest(served / "manifest.jsonl", rows)
        name, extra = "manifest.jsonl", []
    elif kind == "tsv":
        lines = ["id\ttext\timage\taudio\tlang\tsource"]
        for s in samples:
            fields = [s["id"], s.get("text", ""), relative(s.get("image")), relative(s.get("audio")), s["lang"]]
            lines.append("\t".join([*fields, s["source"]]))
        (served / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        name, extra = "pairs.tsv", []
    else:
        as_dataset(samples).to_parquet(str(served / "train.parquet"))
        name, extra = "train.parquet", []
    out = tmp_path / "shards"
    with serve_folder(served) as (url, requested):
        result = run_cli(
            "data", "build", f"{url}/{name}", "--out", str(out), *extra, "shard_size=16",
            env={"HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"},  # loopback only
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{SAMPLES} samples in 3 shards, 0 rejected" in result.stdout
    assert_same_samples(from_jsonl, read_shards(out))
    assert json.loads((out / "index.json").read_text())["manifest"] == f"{url}/{name}"
    if kind != "parquet":  # every media file fetched from the server, none read from the local copy
        media = {p.removeprefix("/media/") for p in requested if p.startswith("/media/")}
        assert media == {p.name for p in (served / "media").iterdir()}


def test_a_missing_media_file_at_a_url_is_a_reject_naming_it(media_samples, tmp_path: Path) -> None:
    folder, samples = media_samples
    served = tmp_path / "served"
    shutil.copytree(folder / "media", served / "media")
    first = next(s for s in samples if "image" in s and "text" in s)
    write_manifest(served / "manifest.jsonl", [{"id": "a", "text": first["text"], "image": "media/gone.png"}])
    with serve_folder(served) as (url, _):
        result = run_cli("data", "build", f"{url}/manifest.jsonl", "--out", str(tmp_path / "out"), "min_modalities=1")
    assert result.returncode == 0, result.stderr
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["field"] == "image"
    assert f"cannot read {url}/media/gone.png: not found" in reject["reason"]


def test_a_streamed_dataset_gives_the_same_samples_in_parts_and_after_an_interruption(
    media_samples, from_jsonl, tmp_path: Path
) -> None:
    _, samples = media_samples
    source = tmp_path / "train.parquet"
    as_dataset(samples).to_parquet(str(source))
    parts = tmp_path / "parts"
    for part in ("0/2", "1/2"):  # each part streams the whole file and keeps its own rows
        result = run_cli(
            "data", "build", str(source), "--streaming", "--out", str(parts), "--part", part, "shard_size=8"
        )
        assert result.returncode == 0, result.stderr
    assert_same_samples(from_jsonl, read_shards(parts))
    out = tmp_path / "resumed"
    result = run_cli("data", "build", str(source), "--streaming", "--out", str(out), "shard_size=16")
    assert result.returncode == 0, result.stderr
    # cut the build back to its first two shards, as if it had been killed while writing the third
    progress = out / ".build" / "part-0000-of-0001.jsonl"
    records = progress.read_text().splitlines()
    progress.write_text("\n".join(records[:2]) + "\n")
    (out / json.loads(records[2])["shard"]).unlink()
    (out / "index.json").unlink()
    again = run_cli("data", "build", str(source), "--streaming", "--out", str(out), "shard_size=16")
    assert again.returncode == 0, again.stderr
    assert "16 samples in 1 shards" not in again.stdout  # the summary counts the whole build
    assert f"{SAMPLES} samples in 3 shards, 0 rejected" in again.stdout
    assert_same_samples(from_jsonl, read_shards(out))


def test_streaming_refuses_a_source_that_is_not_a_dataset(media_samples, from_jsonl, tmp_path: Path) -> None:
    folder, _ = media_samples
    result = run_cli("data", "build", str(folder / "manifest.jsonl"), "--streaming", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "--streaming reads Hugging Face datasets; this is a jsonl source" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_hub_dataset_that_cannot_be_reached_exits_2_naming_it(tmp_path: Path) -> None:
    # the suite runs with HF_HUB_OFFLINE=1: the hub is out of reach, as on a machine without network
    result = run_cli("data", "build", "hf://datasets/zidong-tests/absent", "--split", "train", "--out", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "hf://datasets/zidong-tests/absent: `datasets` cannot load this" in result.stderr
    assert "Traceback" not in result.stderr
    # read as a dataset everywhere a source is taken, never as a shard folder at that URL
    assert not names_shard_folder("hf://datasets/zidong-tests/absent")
    assert names_shard_folder("hf://datasets/zidong-tests/absent/shards/train")
    with pytest.raises(UserError, match=r"hf://datasets/zidong-tests/absent: `datasets` cannot load this"):
        list(read_sentences(["hf://datasets/zidong-tests/absent"], split="train"))


@pytest.mark.parametrize("field", ["image", "audio"])
def test_an_imagefolder_or_audiofolder_layout_gives_the_manifests_samples(
    media_samples, tmp_path: Path, field: str
) -> None:
    # the layout `datasets` reads as imagefolder / audiofolder: files and a metadata.jsonl naming them
    _, samples = media_samples
    chosen = [s for s in samples if field in s and "text" in s][:8]
    folder = tmp_path / "layout" / "train"
    folder.mkdir(parents=True)
    rows = []
    for sample in chosen:
        name = Path(sample[field]).name
        shutil.copy(sample[field], folder / name)
        rows.append({"file_name": name, "id": sample["id"], "text": sample["text"], "lang": sample["lang"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    manifest = write_manifest(
        tmp_path / "manifest.jsonl",
        [{"id": s["id"], "text": s["text"], field: s[field], "lang": s["lang"]} for s in chosen],
    )
    for source, out in ((tmp_path / "layout", tmp_path / "from-layout"), (manifest, tmp_path / "from-manifest")):
        result = run_cli("data", "build", str(source), "--out", str(out), env={"HF_DATASETS_CACHE": str(tmp_path)})
        assert result.returncode == 0, result.stderr
        assert "8 samples in 1 shards, 0 rejected" in result.stdout
    assert_same_samples(read_shards(tmp_path / "from-manifest"), read_shards(tmp_path / "from-layout"))


def test_a_dataset_with_splits_needs_split(media_samples, tmp_path: Path) -> None:
    _, samples = media_samples
    dataset = as_dataset(samples[:4])
    datasets.DatasetDict({"train": dataset, "validation": dataset}).save_to_disk(str(tmp_path / "dataset"))
    result = run_cli("data", "build", str(tmp_path / "dataset"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "holds the splits train, validation; choose one with --split" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_mapped_column_that_does_not_exist_lists_the_columns(media_samples, tmp_path: Path) -> None:
    _, samples = media_samples
    as_dataset(samples[:4]).to_parquet(str(tmp_path / "train.parquet"))
    result = run_cli(
        "data", "build", str(tmp_path / "train.parquet"), "--out", str(tmp_path / "out"), "--columns", "text=captoin"
    )
    assert result.returncode == 2
    assert "--columns text=captoin: no column 'captoin'; it has id, caption, jpg, flac, lang, source" in result.stderr
    assert "did you mean caption?" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_column_of_the_wrong_kind_is_refused(media_samples, tmp_path: Path) -> None:
    _, samples = media_samples
    as_dataset(samples[:4]).to_parquet(str(tmp_path / "train.parquet"))
    result = run_cli(
        "data",
        "build",
        str(tmp_path / "train.parquet"),
        "--out",
        str(tmp_path / "out"),
        "--columns",
        "text=jpg,image=caption",
    )
    assert result.returncode == 2
    assert "column 'jpg' (Image(mode=None, decode=True)) is mapped to text, which needs strings" in result.stderr


def test_rows_that_fail_to_decode_are_rejected_by_row_and_the_build_goes_on(media_samples, tmp_path: Path) -> None:
    _, samples = media_samples
    broken = [dict(s) for s in samples[:8]]
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    broken[1]["image"] = str(tmp_path / "broken.jpg")  # row 1 has text and an image
    as_dataset(broken).to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "out"
    result = run_cli("data", "build", str(tmp_path / "train.parquet"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "7 samples in 1 shards, 1 rejected" in result.stdout
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1
    assert rejects[0]["row"] == 1
    assert rejects[0]["id"] == "s1"
    assert rejects[0]["field"] == "image"
    assert "not a decodable image" in rejects[0]["reason"]
    assert "(the 19 bytes in the record)" in rejects[0]["reason"]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.mkdir(), "`datasets` cannot load this"),
        (lambda p: (p.with_suffix(".tsv")).write_bytes(b"id\ttext\n1\t\xff\xfe\n"), "is not UTF-8 text"),
        (lambda p: (p.with_suffix(".csv")).write_text("id,text,image\n"), "has no rows under its header"),
        (lambda p: (p.with_suffix(".csv")).write_text("id,notes\n1,x\n"), "found columns for nothing of text, image"),
        (lambda p: (p.with_suffix(".txt")).write_text("x"), "cannot tell what kind of source this is"),
    ],
    ids=["empty-folder", "not-utf8", "no-rows", "no-modality-columns", "unknown-kind"],
)
def test_unusable_sources_exit_2_naming_the_source(tmp_path: Path, make, expected: str) -> None:
    target = tmp_path / "source"
    make(target)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("source"))
    result = run_cli("data", "build", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


class CaptionedImages(Source):
    """A toy source kind: a folder of NAME.png images, each with its caption in NAME.txt."""

    kind = "captioned-images"

    @classmethod
    def detects(cls, location: str) -> bool:
        return Path(location).is_dir() and any(Path(location).glob("*.txt"))

    @classmethod
    def open(cls, location: str, options: OpenOptions) -> Source:
        folder = Path(location).resolve()
        rows = [{"id": t.stem, "text": t.read_text(), "image": f"{t.stem}.png"} for t in sorted(folder.glob("*.txt"))]
        return cls(str(folder), folder, str(len(rows)), {"id": "id", "text": "text", "image": "image"}, rows)


def test_a_new_source_kind_is_one_class_and_one_registration(tmp_path: Path, monkeypatch) -> None:
    from zidong import cli
    from zidong.data import sources

    monkeypatch.setattr(sources, "SOURCE_KINDS", dict(sources.SOURCE_KINDS))  # the registration ends with the test
    sources.register_source_kind(CaptionedImages)
    folder = tmp_path / "captioned"
    folder.mkdir()
    for number in range(5):
        write_image(folder / f"img{number}.png", (24 + number, 20), seed=number)
        (folder / f"img{number}.txt").write_text(f"caption number {number}")

    assert isinstance(sources.open_source(folder), CaptionedImages)  # detected before the built-in folder kinds
    with pytest.raises(UserError, match="no such source kind; choose from captioned-images, webdataset, jsonl"):
        sources.open_source(folder, kind="captioned")
    out = tmp_path / "out"
    assert cli.main(["data", "build", str(folder), "--out", str(out), "--source-kind", CaptionedImages.kind]) == 0

    built = read_shards(out)
    assert len(built) == 5
    by_id = {sample["meta"]["id"]: sample for sample in built.values()}
    for number in range(5):
        sample = by_id[f"img{number}"]
        assert sample["text"] == f"caption number {number}"
        expected = np.asarray(Image.open(folder / f"img{number}.png").convert("RGB"))
        assert np.array_equal(sample["image"][1], expected)
    index = json.loads((out / "index.json").read_text())
    assert index["source"] == "captioned-images"
    assert index["samples"] == 5
