"""WebDataset tars, both ways: tars written by the `webdataset` package's own writer (mixed jpg/png and flac/wav
members, a json member per sample) build into the same samples as the JSONL manifest, our shard folders read
back with `datasets`' webdataset loader and with the `webdataset` package give our samples, and a shard folder
of ours builds again into itself. Bad tars exit 2 or reject the sample by shard and key."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
import webdataset
from PIL import Image
from transformers import AutoTokenizer

from tests.data.fixtures import write_manifest
from tests.data.samples import SAMPLES, as_dataset, assert_same_samples, read_shards
from tests.helpers import free_port, run_cli, serve_folder
from zidong.data.tokenizer import train_tokenizer


def write_tars(folder: Path, samples: list[dict], per_tar: int = 16) -> list[Path]:
    """The samples as three tars from `webdataset.TarWriter`: key = id, the media files' own bytes and
    extensions, `txt`, and a json member with the language and the extra field."""
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for start in range(0, len(samples), per_tar):
        path = folder / f"{start // per_tar:05d}.tar"
        with webdataset.TarWriter(str(path)) as writer:
            for sample in samples[start : start + per_tar]:
                entry = {"__key__": sample["id"], "json": {"lang": sample["lang"], "source": sample["source"]}}
                if "text" in sample:
                    entry["txt"] = sample["text"]
                for field in ("image", "audio"):
                    if field in sample:
                        entry[Path(sample[field]).suffix[1:]] = Path(sample[field]).read_bytes()
                writer.write(entry)
        tars.append(path)
    return tars


def test_tars_from_the_webdataset_writer_give_the_same_samples(media_samples, from_jsonl, tmp_path: Path) -> None:
    _, samples = media_samples
    write_tars(tmp_path / "tars", samples)
    pattern = str(tmp_path / "tars" / "{00000..00002}.tar")
    out = tmp_path / "shards"
    result = run_cli("data", "build", pattern, "--out", str(out), "shard_size=16")
    assert result.returncode == 0, result.stderr
    assert f"{SAMPLES} samples in 3 shards, 0 rejected" in result.stdout
    assert_same_samples(from_jsonl, read_shards(out))


@pytest.mark.parametrize("form", ["brace pattern", "folder"])
def test_tars_at_a_url_give_the_same_samples(media_samples, from_jsonl, tmp_path: Path, form: str) -> None:
    _, samples = media_samples
    write_tars(tmp_path / "served" / "tars", samples)
    cache = tmp_path / "cache"
    with serve_folder(tmp_path / "served") as (url, requested):
        location = f"{url}/tars/{{00000..00002}}.tar" if form == "brace pattern" else f"{url}/tars/"
        kind = [] if form == "brace pattern" else ["--source-kind", "webdataset"]
        command = ["data", "build", location, *kind, "--out", str(tmp_path / "shards"), "shard_size=16"]
        result = run_cli(*command, env={"XDG_CACHE_HOME": str(cache)})
        assert result.returncode == 0, result.stderr
        assert f"{SAMPLES} samples in 3 shards, 0 rejected" in result.stdout
        assert_same_samples(from_jsonl, read_shards(tmp_path / "shards"))
        # the same command again finds the build done, and downloads nothing again
        fetched = [path for path in requested if path.endswith(".tar")]
        again = run_cli(*command, env={"XDG_CACHE_HOME": str(cache)})
        assert again.returncode == 0, again.stderr
        assert [path for path in requested if path.endswith(".tar")] == fetched
    assert sorted(path.rsplit("/", 1)[1] for path in fetched) == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in (cache / "zidong" / "sources").glob("*/*")) == sorted(
        p.name for p in (tmp_path / "served" / "tars").glob("*.tar")
    )


def test_our_shards_build_again_into_the_same_samples(media_samples, from_jsonl, tmp_path: Path) -> None:
    folder, _ = media_samples
    out = tmp_path / "again"
    result = run_cli("data", "build", str(folder / "jsonl"), "--out", str(out), "shard_size=16")
    assert result.returncode == 0, result.stderr
    assert_same_samples(from_jsonl, read_shards(out))


def test_our_shards_load_with_datasets_and_with_webdataset(media_samples, from_jsonl) -> None:
    folder, _ = media_samples
    tars = sorted(str(p) for p in (folder / "jsonl").glob("*.tar"))
    # members differ between samples (not every sample has an image), so name the features instead of letting
    # `datasets` infer them from the first five samples; audio as bytes (its Audio() encoder needs torchcodec)
    features = datasets.Features(
        {
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
            "txt": datasets.Value("string"),
            "jpg": datasets.Image(decode=False),
            "png": datasets.Image(decode=False),
            "flac": datasets.Value("binary"),
        }
    )
    loaded = datasets.load_dataset("webdataset", data_files=tars, split="train", features=features)
    packaged = {sample["__key__"]: sample for sample in webdataset.WebDataset(tars, shardshuffle=False)}
    assert len(loaded) == len(packaged) == SAMPLES
    for row in loaded:
        key = row["__key__"]
        want, other = from_jsonl[key], packaged[key]
        assert row["txt"] == want.get("text")
        assert (other["txt"].decode() if "txt" in other else None) == want.get("text")
        image = row["jpg"] or row["png"]
        if "image" in want:
            extension, pixels = want["image"]
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(image["bytes"]))), pixels)
            assert other[extension] == image["bytes"]
        else:
            assert image is None
        if "audio" in want:
            assert np.array_equal(soundfile.read(io.BytesIO(row["flac"]))[0], want["audio"])
            assert other["flac"] == row["flac"]
        assert json.loads(other["json"])["id"] == want["meta"]["id"]


def test_a_sample_split_across_tars_exits_2(media_samples, tmp_path: Path) -> None:
    _, samples = media_samples
    tars = write_tars(tmp_path / "tars", samples[:4], per_tar=2)
    with tarfile.open(tars[1], "a") as archive:  # a member of sample s0 (in the first tar) in the second
        info = tarfile.TarInfo("s0.txt")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"stray"))
    result = run_cli("data", "build", str(tmp_path / "tars"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"{tars[1]}: members of sample 's0' are also in {tars[0]}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_member_that_fails_to_decode_is_rejected_by_shard_and_key(media_samples, tmp_path: Path) -> None:
    _, samples = media_samples
    broken = [dict(s) for s in samples[:8]]
    (tmp_path / "bad.wav").write_bytes(b"RIFF but not really")
    broken[2]["audio"] = str(tmp_path / "bad.wav")  # sample 2 has text and audio
    write_tars(tmp_path / "tars", broken, per_tar=4)
    out = tmp_path / "out"
    result = run_cli("data", "build", str(tmp_path / "tars" / "00000.tar"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "3 samples in 1 shards, 1 rejected" in result.stdout
    (reject,) = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert reject["shard"] == "00000.tar"
    assert reject["key"] == "s2"
    assert reject["field"] == "audio"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("{00000..00003}.tar", "no such tar file"),
        ("none/", "no .tar files there"),
        ("http://{server}/tars/{00000..00003}.tar", "cannot fetch http://{server}/tars/00002.tar: not found"),
        ("http://{nothing}/tars/{00000..00001}.tar", "cannot fetch http://{nothing}/tars/00000.tar: not found"),
    ],
    ids=["brace-past-the-end", "empty-folder", "url-past-the-end", "no-server"],
)
def test_missing_tars_exit_2(media_samples, tmp_path: Path, pattern: str, expected: str) -> None:
    _, samples = media_samples
    write_tars(tmp_path / "tars", samples[:8], per_tar=4)
    (tmp_path / "tars" / "none").mkdir()
    with serve_folder(tmp_path) as (url, _):
        hosts = {"server": url.removeprefix("http://"), "nothing": f"127.0.0.1:{free_port()}"}
        location = pattern.replace("{server}", hosts["server"]).replace("{nothing}", hosts["nothing"])
        if not location.startswith("http"):
            location = str(tmp_path / "tars" / pattern)
        result = run_cli(
            "data", "build", location, "--out", str(tmp_path / "out"), "--source-kind", "webdataset",
            env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert expected.replace("{server}", hosts["server"]).replace("{nothing}", hosts["nothing"]) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_trains_alike_from_every_source(media_samples, from_jsonl, tmp_path: Path) -> None:
    folder, samples = media_samples
    captions = [s["text"] for s in samples if "text" in s]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    manifest = write_manifest(tmp_path / "manifest.jsonl", samples)
    rows = ["id\ttitle"] + [f"{s['id']}\t{s.get('text', '')}" for s in samples]  # a text-only table
    (tmp_path / "titles.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    as_dataset(samples).to_parquet(str(tmp_path / "train.parquet"))
    inputs = {
        "text file": ([tmp_path / "captions.txt"], None),
        "manifest": ([manifest], None),
        "table": ([tmp_path / "titles.tsv"], {"text": "title"}),
        "parquet": ([tmp_path / "train.parquet"], None),
        "shards": ([folder / "jsonl"], None),
        "tars": ([str(write_tars(tmp_path / "tars", samples)[0].parent / "{00000..00002}.tar")], None),
    }
    pieces = {}
    for name, (paths, columns) in inputs.items():
        out = train_tokenizer(paths, 8000, tmp_path / name.replace(" ", "-"), columns=columns)
        pieces[name] = AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(pieces["text file"]) > 265  # learned pieces beyond the 8 specials and 256 bytes
    for name, vocabulary in pieces.items():
        assert vocabulary == pieces["text file"], name
