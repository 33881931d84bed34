"""The built-in demo corpus: deterministic per seed, the set mix of triplets and pairs, two languages, real speech."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import soundfile

from tests.data.fixtures import shard_members
from zidong.cli import EXIT_USAGE, main
from zidong.data.demo import Group, caption, ensure_demo, scene_labels
from zidong.data.inspect import check_shards
from zidong.data.shards import load_index
from zidong.errors import UserError


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    assert main(["data", "demo", "--out", str(out), "--samples", "60", "--seed", "3"]) == 0
    return out


def test_demo_is_deterministic_per_seed(demo: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    assert main(["data", "demo", "--out", str(again), "--samples", "60", "--seed", "3"]) == 0
    assert main(["data", "demo", "--out", str(other), "--samples", "60", "--seed", "4"]) == 0
    for split in ("train", "eval"):
        assert (demo / split / "index.json").read_text().replace(str(demo), "") == (
            again / split / "index.json"
        ).read_text().replace(str(again), "")
        assert [p.read_bytes() for p in sorted((demo / split).glob("*.tar"))] == [
            p.read_bytes() for p in sorted((again / split).glob("*.tar"))
        ]
    assert shard_members(demo / "train") != shard_members(other / "train")


def test_demo_mixes_triplets_and_pairs_in_two_languages(demo: Path) -> None:
    train, held_out = load_index(demo / "train"), load_index(demo / "eval")
    assert train["samples"] == 54
    assert held_out["samples"] == 6
    assert held_out["combinations"] == {"text+vision+speech": 6}
    assert set(train["combinations"]) == {"text+vision+speech", "text+vision", "text+speech", "vision+speech"}
    assert train["combinations"]["text+vision+speech"] > train["samples"] / 2
    assert set(train["languages"]) == {"en", "zh"}
    assert train["rejected"] == 0
    assert check_shards(demo / "train", train, checksums=True) == []
    assert not (demo / "raw").exists()


def test_demo_speech_is_real_16k_audio_of_the_caption(demo: Path) -> None:
    samples = list(shard_members(demo / "eval").values())
    for files in samples:
        waveform, rate = soundfile.read(io.BytesIO(files["flac"]))
        meta = json.loads(files["json"])
        assert rate == 16000
        assert 0.5 < len(waveform) / rate < 8
        assert abs(waveform).max() > 0.05  # not silence
        words = files["txt"].decode()
        assert (meta["lang"] == "zh") == any("\u4e00" <= ch <= "\u9fff" for ch in words)


def test_captions_in_both_languages() -> None:
    groups = [Group("red", "circle", "small", 2), Group("blue", "triangle", "large", 1)]
    assert caption(groups, "en") == "two small red circles and one large blue triangle"
    assert caption(groups, "zh") == "两个小的红色圆形和一个大的蓝色三角形"


def test_shape_and_colour_labels_only_where_the_whole_scene_has_one() -> None:
    red_circle, blue_circle = Group("red", "circle", "small", 2), Group("blue", "circle", "large", 1)
    red_square, blue_square = Group("red", "square", "large", 3), Group("blue", "square", "small", 1)
    assert scene_labels([red_circle]) == {"groups": 1, "shape": "circle", "color": "red"}
    assert scene_labels([red_circle, blue_circle]) == {"groups": 2, "shape": "circle"}
    assert scene_labels([red_circle, red_square]) == {"groups": 2, "color": "red"}
    assert scene_labels([red_circle, blue_square]) == {"groups": 2}


def test_demo_labels_agree_with_the_english_captions(demo: Path) -> None:
    checked = 0
    for split in ("train", "eval"):
        for files in shard_members(demo / split).values():
            meta = json.loads(files["json"])
            if meta["lang"] != "en" or "txt" not in files:
                continue
            groups = [part.split() for part in files["txt"].decode().split(" and ")]  # "two small red circles"
            shapes = {words[3].removesuffix("s") for words in groups}
            colours = {words[2] for words in groups}
            labels = meta["extra"]["labels"]
            assert labels["groups"] == len(groups)
            assert labels.get("shape") == (shapes.pop() if len(shapes) == 1 else None), files["txt"]
            assert labels.get("color") == (colours.pop() if len(colours) == 1 else None), files["txt"]
            checked += 1
    assert checked > 10


def test_a_complete_corpus_is_kept_and_an_older_one_is_refused(demo: Path, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*")}
    assert ensure_demo(demo, samples=60, seed=3) is False
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*")} == before
    older = tmp_path / "older"
    older.mkdir()
    (older / "demo.json").write_text('{"seed": 0, "samples": 60}\n')  # written before labels had a version
    with pytest.raises(UserError, match="delete that one to build it anew"):
        ensure_demo(older, samples=60)
    assert sorted(p.name for p in older.iterdir()) == ["demo.json"]


def test_a_folder_of_other_files_is_refused_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    (mine / "train" / "index.json").write_text("{}")  # say, a user's own shards
    assert main(["data", "demo", "--out", str(mine), "--samples", "20"]) == EXIT_USAGE
    assert "holds files but no demo.json" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a demo corpus"):
        ensure_demo(mine, samples=20)
    assert [p.relative_to(mine).as_posix() for p in sorted(mine.rglob("*"))] == ["train", "train/index.json"]
    assert (mine / "train" / "index.json").read_text() == "{}"


def test_an_unreadable_demo_record_exits_2_and_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "demo.json").write_text('{"seed": 0, "sam')  # cut off mid-write
    assert main(["data", "demo", "--out", str(broken), "--samples", "20"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"{broken / 'demo.json'} is not a demo record" in err
    assert "Traceback" not in err
    with pytest.raises(UserError, match="delete the folder to build it anew"):
        ensure_demo(broken, samples=20)
    assert [p.name for p in broken.iterdir()] == ["demo.json"]
    assert (broken / "demo.json").read_text() == '{"seed": 0, "sam'


def test_demo_refuses_a_folder_of_another_seed(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "demo", "--out", str(demo), "--samples", "60", "--seed", "9"]) == EXIT_USAGE
    assert "demo corpus made with" in capsys.readouterr().err


def test_demo_needs_two_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--samples", "1"]) == EXIT_USAGE
    assert "--samples must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
