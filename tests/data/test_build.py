"""`zidong data build` / `inspect`: every bad-input case is rejected with a reason, repairs, parts, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from tests.data.fixtures import shard_members, truncate, write_audio, write_image, write_manifest
from tests.helpers import run_cli
from zidong.cli import EXIT_USAGE, main
from zidong.data.build import build
from zidong.data.inspect import check_shards
from zidong.data.normalize import BuildSettings
from zidong.data.shards import load_index


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A manifest with good samples, repairable ones, and one line for every rejection reason."""
    media = tmp_path / "corpus"
    write_image(media / "a.png")
    write_image(media / "b.jpg", size=(64, 48))
    write_image(media / "alpha.png", mode="RGBA")
    write_image(media / "large.png", size=(1200, 600))
    write_image(media / "bomb.png", size=(1100, 1000))
    write_audio(media / "a.wav")
    write_audio(media / "stereo44k.wav", rate=44100, channels=2)
    write_audio(media / "a.flac", file_format="FLAC")
    write_audio(media / "short.wav", seconds=0.05)
    write_audio(media / "long.wav", seconds=3.0)
    truncate(write_audio(media / "cut.wav", seconds=1.0))
    truncate(write_audio(media / "cut.flac", seconds=1.0, file_format="FLAC"))
    truncate(write_image(media / "cut.jpg", size=(200, 200)), keep=0.3)
    (media / "empty.jpg").write_bytes(b"")
    (media / "empty.wav").write_bytes(b"")
    (media / "text.jpg").write_text("this is not an image")
    (media / "noise.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    (media / "folder.wav").mkdir()
    lines: list = [
        {"id": "good-1", "text": "  a red\tcircle  ", "image": "a.png", "audio": "a.wav", "lang": "en"},
        {"id": "good-2", "text": "两个蓝色的方块", "image": "b.jpg", "lang": "zh"},
        {"id": "good-3", "text": "e\u0301te\u0301", "audio": "a.flac", "lang": "fr", "source": "unit-test"},
        {"id": "repair-stereo", "image": "a.png", "audio": "stereo44k.wav"},
        {"id": "repair-alpha", "text": "alpha", "image": "alpha.png"},
        {"id": "repair-large", "text": "large", "image": "large.png"},
        "{not json",
        {"text": "no id", "image": "a.png"},
        {"id": "good-1", "text": "duplicate", "image": "a.png"},
        {"id": "one-modality", "text": "only text"},
        {"id": "missing-file", "text": "x", "image": "nowhere.png"},
        {"id": "folder", "text": "x", "audio": "folder.wav"},
        {"id": "empty-image", "text": "x", "image": "empty.jpg"},
        {"id": "cut-image", "text": "x", "image": "cut.jpg"},
        {"id": "text-as-jpg", "text": "x", "image": "text.jpg"},
        {"id": "bomb", "text": "x", "image": "bomb.png"},
        {"id": "empty-audio", "text": "x", "audio": "empty.wav"},
        {"id": "cut-wav", "text": "x", "audio": "cut.wav"},
        {"id": "cut-flac", "text": "x", "audio": "cut.flac"},
        {"id": "noise", "text": "x", "audio": "noise.wav"},
        {"id": "short", "text": "x", "audio": "short.wav"},
        {"id": "long", "text": "x", "audio": "long.wav"},
        {"id": "empty-text", "text": "", "image": "a.png"},
        {"id": "blank-text", "text": " \n\t ", "image": "a.png"},
        b'{"id": "bad-utf8", "text": "caf\xe9", "image": "a.png"}',
        {"id": "long-text", "text": "word " * 30, "image": "a.png"},
        "",
        "[1, 2]",
    ]
    return write_manifest(media / "manifest.jsonl", lines)


SETTINGS = ["max_image_pixels=1000000", "max_audio_seconds=2", "min_audio_seconds=0.1", "max_text_chars=100",
            "max_image_side=256", "shard_size=2"]  # fmt: skip
EXPECTED_REJECTS = {
    7: ("line", "not valid JSON"),
    8: ("id", "missing or empty"),
    9: ("id", "duplicate id, first used on manifest line 1"),
    10: ("line", "needs at least two"),
    11: ("image", "file not found"),
    12: ("audio", "is a folder"),
    13: ("image", "empty file (0 bytes)"),
    14: ("image", "not a decodable image"),
    15: ("image", "not a decodable image"),
    16: ("image", "over max_image_pixels=1000000"),
    17: ("audio", "empty file (0 bytes)"),
    18: ("audio", "truncated"),
    19: ("audio", "not decodable audio"),
    20: ("audio", "not decodable audio"),
    21: ("audio", "outside min_audio_seconds=0.1"),
    22: ("audio", "outside min_audio_seconds=0.1 .. max_audio_seconds=2"),
    23: ("text", "empty or whitespace only"),
    24: ("text", "empty or whitespace only"),
    25: ("text", "not valid UTF-8"),
    26: ("text", "over max_text_chars=100"),
    27: ("line", "not valid JSON"),
    28: ("line", "expected a JSON object"),
}


def test_every_bad_input_is_rejected_with_its_reason(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert main(["data", "build", str(corpus), "--out", str(out), *SETTINGS]) == 0
    rejects = {r["line"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == set(EXPECTED_REJECTS)
    for line, (field, reason) in EXPECTED_REJECTS.items():
        assert rejects[line]["field"] == field, rejects[line]
        assert reason in rejects[line]["reason"], rejects[line]
    assert rejects[9]["id"] == "good-1"
    index = load_index(out)
    assert index["samples"] == 6
    assert index["rejected"] == len(EXPECTED_REJECTS)
    assert index["samples"] + index["rejected"] == 28  # nothing silently dropped
    assert index["combinations"] == {"text+speech": 1, "text+vision": 3, "text+vision+speech": 1, "vision+speech": 1}
    assert index["languages"] == {"en": 1, "fr": 1, "zh": 1}
    assert index["images"] == 5
    assert check_shards(out, index, checksums=True) == []


def test_samples_are_normalised_and_repaired(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    settings = BuildSettings(max_image_pixels=1_000_000, max_audio_seconds=2, max_image_side=256, max_text_chars=100)
    build(corpus, out, settings)
    samples = {json.loads(files["json"])["id"]: files for files in shard_members(out).values()}
    assert set(samples) == {"good-1", "good-2", "good-3", "repair-stereo", "repair-alpha", "repair-large"}
    assert samples["good-1"]["txt"].decode() == "a red circle"
    assert samples["good-3"]["txt"].decode() == "\u00e9t\u00e9"  # NFC
    assert json.loads(samples["good-3"]["json"])["extra"] == {"source": "unit-test"}
    waveform, rate = soundfile.read(io.BytesIO(samples["repair-stereo"]["flac"]))
    assert rate == 16000
    assert waveform.ndim == 1
    assert abs(len(waveform) - 8000) <= 1  # 0.5 s resampled from 44.1 kHz
    assert Image.open(io.BytesIO(samples["repair-alpha"]["png"])).mode == "RGB"
    assert Image.open(io.BytesIO(samples["repair-large"]["png"])).size == (256, 128)
    assert "jpg" in samples["good-2"]
    meta = json.loads(samples["good-1"]["json"])
    assert meta["modalities"] == ["text", "vision", "speech"]
    assert meta["audio_seconds"] == pytest.approx(0.5)


def test_over_long_text_can_be_truncated_instead(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    build(corpus, out, BuildSettings(max_text_chars=12, text_overflow="truncate"))
    texts = {json.loads(f["json"])["id"]: f.get("txt", b"").decode() for f in shard_members(out).values()}
    assert texts["long-text"] == "word word wo"
    assert all(len(text) <= 12 for text in texts.values())


def test_parts_build_apart_and_merge_into_one_index(corpus: Path, tmp_path: Path) -> None:
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    build(corpus, whole, BuildSettings(shard_size=2))
    first = build(corpus, parted, BuildSettings(shard_size=2), part=(0, 3))
    assert not first.index_written
    assert not (parted / "index.json").exists()
    build(corpus, parted, BuildSettings(shard_size=2), part=(2, 3))
    assert build(corpus, parted, BuildSettings(shard_size=2), part=(1, 3)).index_written
    a, b = load_index(whole), load_index(parted)
    for key in ("samples", "combinations", "rejected", "audio_hours", "images", "text_characters", "languages"):
        assert a[key] == b[key], key
    assert sorted(f["txt"] for f in shard_members(whole).values() if "txt" in f) == sorted(
        f["txt"] for f in shard_members(parted).values() if "txt" in f
    )
    assert (whole / "rejects.jsonl").read_text() == (parted / "rejects.jsonl").read_text()


def test_interrupted_build_resumes_without_loss_or_duplicates(corpus: Path, tmp_path: Path) -> None:
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    settings = BuildSettings(shard_size=2)
    build(corpus, reference, settings)
    build(corpus, interrupted, settings)
    # Simulate a kill after the second shard: drop what came later, leave a half-written shard behind.
    progress_file = interrupted / ".build" / "part-0000-of-0001.jsonl"
    records = progress_file.read_text().splitlines()
    progress_file.write_text("\n".join(records[:2]) + "\n" + records[2][:15])
    for name in ("index.json", "rejects.jsonl", "0000-00002.tar"):
        (interrupted / name).unlink()
    (interrupted / "0000-00002.tar.tmp999").write_bytes(b"partial")
    assert main(["data", "build", str(corpus), "--out", str(interrupted), "shard_size=2"]) == 0
    assert shard_members(interrupted) == shard_members(reference)
    assert (interrupted / "index.json").read_text() == (reference / "index.json").read_text()
    assert (interrupted / "rejects.jsonl").read_text() == (reference / "rejects.jsonl").read_text()
    assert not list(interrupted.glob("*.tmp*"))


def test_workers_give_the_same_shards(corpus: Path, tmp_path: Path) -> None:
    build(corpus, tmp_path / "one", BuildSettings(shard_size=3))
    build(corpus, tmp_path / "two", BuildSettings(shard_size=3), workers=2)
    assert shard_members(tmp_path / "one") == shard_members(tmp_path / "two")


def test_unreadable_manifest_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main(["data", "build", str(empty), "--out", str(tmp_path / "out")]) == EXIT_USAGE
    assert "has no samples" in capsys.readouterr().err
    result = run_cli("data", "build", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_USAGE
    assert "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_settings_and_changed_settings_exit_2(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["data", "build", str(corpus), "--out", str(out), "max_audio_second=3"]) == EXIT_USAGE
    assert "Did you mean `max_audio_seconds`" in capsys.readouterr().err
    assert main(["data", "build", str(corpus), "--out", str(out), "shard_size=2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["data", "build", str(corpus), "--out", str(out), "shard_size=3"]) == EXIT_USAGE
    assert "different settings" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched


def test_inspect_summarises_and_flags_a_mismatch(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    build(corpus, out, BuildSettings(shard_size=2))
    assert main(["data", "inspect", str(out), "--checksums"]) == 0
    report = capsys.readouterr().out
    assert "samples: 9" in report  # default limits accept the bomb-sized, long and long-text samples
    assert "text+vision" in report
    assert "the index matches the shards" in report
    (out / "0000-00001.tar").unlink()
    with (out / "0000-00000.tar").open("ab") as stream:
        stream.write(b"\0" * 512)
    assert main(["data", "inspect", str(out)]) == EXIT_USAGE
    report = capsys.readouterr().out
    assert "0000-00001.tar: listed in the index but missing" in report
    assert "0000-00000.tar: " in report
    assert main(["data", "inspect", str(tmp_path)]) == EXIT_USAGE
    assert "has no index.json" in capsys.readouterr().err
