"""`zidong tokenizer train`: SentencePiece and its HF fast twin agree on ids and decoded text; bad input exits 2."""

from __future__ import annotations

import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
from transformers import AutoTokenizer

from tests.data.corpus import make_corpus
from tests.helpers import serve_folder
from zidong.cli import EXIT_USAGE, main
from zidong.data.tokenizer import read_sentences
from zidong.errors import UserError

ENGLISH = [
    "the",
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "two",
    "three",
    "small",
    "large",
    "model",
    "speech",
    "vision",
    "text",
    "over",
    "under",
]
CHINESE = list(
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
)
RARE = ["𠀀", "𠀁", "𪚥", "龘", "㈱", "Ω", "ß", "é", "ñ", "Ж", "ا", "श", "🙂", "🚀", "👩‍🔬", "🇨🇳", "™", "½", "\u00a0"]
UNSEEN = ["한국어", "ภาษาไทย", "🦄", "㊙", "𝔘𝔫𝔦", "ꙮ", "ǅ", "⁂"]  # never in the training text: byte fallback
PUNCTUATION = [",", ".", "!", "?", "，", "。", "！", "？", "、", "“", "”", "(", ")", "-", "'"]


def random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.35:
            pieces.append(rng.choice(ENGLISH))
        elif kind < 0.7:
            pieces.append("".join(rng.choices(CHINESE, k=rng.randint(1, 6))))
        elif kind < 0.82:
            pieces.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        elif kind < 0.92:
            pieces.append(rng.choice(RARE))
        else:
            pieces.append(rng.choice(PUNCTUATION))
    separator = rng.choice([" ", "", " "])
    return separator.join(pieces)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(random_text(rng) for _ in range(3000)) + "\n", encoding="utf-8")
    assert (
        main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "700", "--out", str(folder / "tok")]) == 0
    )
    return folder / "tok"


def test_hf_tokenizer_matches_sentencepiece_on_mixed_text(trained: Path) -> None:
    processor = sentencepiece.SentencePieceProcessor(model_file=str(trained / "spm.model"))
    fast = AutoTokenizer.from_pretrained(trained)
    rng = random.Random(1)  # other strings than the training text
    strings = [random_text(rng) + (f" {rng.choice(UNSEEN)}" if i % 3 == 0 else "") for i in range(320)]
    strings += ["  two spaces", "trailing ", "😀", "𠀀𠀁", "2026年11月25日"]
    byte_fallbacks = 0
    for text in strings:
        expected = processor.encode(text)
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == expected, text
        assert fast.decode(ids) == processor.decode(expected) == text
        byte_fallbacks += any(processor.id_to_piece(i).startswith("<0x") for i in ids)
    assert byte_fallbacks > 100  # the unseen characters really went through byte fallback


def test_special_tokens_and_template(trained: Path) -> None:
    fast = AutoTokenizer.from_pretrained(trained)
    assert [fast.pad_token_id, fast.unk_token_id, fast.bos_token_id, fast.eos_token_id] == [0, 1, 2, 3]
    assert fast.convert_tokens_to_ids(["<mask>", "<text>", "<vision>", "<speech>"]) == [4, 5, 6, 7]
    assert fast.mask_token == "<mask>"
    ids = fast("两个 red")["input_ids"]
    assert ids[0] == fast.bos_token_id
    assert ids[-1] == fast.eos_token_id
    assert len(fast) == 700


def test_reads_shard_folders(tmp_path: Path) -> None:
    from zidong.data.demo import make_demo

    make_demo(tmp_path / "demo", samples=40, seed=1)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(tmp_path / "demo" / "train"), "--vocab-size", "320",
                 "--out", str(out)]) == 0  # fmt: skip
    fast = AutoTokenizer.from_pretrained(out)
    assert fast.decode(fast.encode("两个小的红色圆形", add_special_tokens=False)) == "两个小的红色圆形"


def test_reads_a_shard_folder_at_a_url_like_the_local_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = make_corpus(tmp_path / "corpus", 24)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with serve_folder(shards.parent) as (url, requested):
        remote = list(read_sentences([f"{url}/{shards.name}"]))
    assert remote == list(read_sentences([shards]))
    assert len(remote) == sum(1 for line in (tmp_path / "corpus" / "manifest.jsonl").open() if '"text"' in line)
    assert any(path.endswith(".tar") for path in requested)


def test_reads_a_text_file_at_a_url_like_the_local_one(tmp_path: Path) -> None:
    (tmp_path / "served").mkdir()
    text = _captions(tmp_path / "served" / "captions.txt", 40)
    (text.parent / "blank_lines.txt").write_text("one line\n\n  \nanother line")
    with serve_folder(text.parent) as (url, requested):
        assert list(read_sentences([f"{url}/captions.txt"])) == list(read_sentences([text]))
        assert list(read_sentences([f"{url}/blank_lines.txt"])) == ["one line", "another line"]
        with pytest.raises(UserError, match=r"cannot read .*/missing\.txt: not found"):
            list(read_sentences([f"{url}/missing.txt"]))
    assert requested  # read from the server, not from a source kind


def _captions(path: Path, count: int) -> Path:
    """`count` demo captions, half English and half Chinese: a lab's first small sample of its own text."""
    from zidong.data.demo import caption, random_scene

    rng = np.random.default_rng(0)
    path.write_text("\n".join(caption(random_scene(rng), ("en", "zh")[i % 2]) for i in range(count)) + "\n")
    return path


def _train(text: Path, size: int, out: Path, *flags: str) -> int:
    return main(["tokenizer", "train", "--input", str(text), "--vocab-size", str(size), "--out", str(out), *flags])


def test_vocab_size_is_an_upper_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 400-line text supports a few hundred pieces: asking for 8000 gets the most it supports, and that size
    is exactly what SentencePiece's own bound says (an exact run at it works, one piece more does not)."""
    text = _captions(tmp_path / "captions.txt", 400)
    assert _train(text, 8000, tmp_path / "bound") == 0
    reached = len(AutoTokenizer.from_pretrained(tmp_path / "bound"))
    assert 300 < reached < 8000
    output = capsys.readouterr().out
    assert f"tokenizer.json: {reached} pieces" in output
    assert f"--vocab-size 8000 is an upper bound: this text supports {reached} pieces" in output
    assert _train(text, reached, tmp_path / "exact", "--exact-vocab-size") == 0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "exact")) == reached
    assert _train(text, reached + 1, tmp_path / "over", "--exact-vocab-size") == EXIT_USAGE
    error = capsys.readouterr().err
    assert f"this text supports at most {reached} pieces, not {reached + 1}" in error
    assert "drop --exact-vocab-size" in error
    assert not (tmp_path / "over").exists()


def test_a_size_below_what_the_characters_need_names_the_least(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _captions(tmp_path / "captions.txt", 400)
    assert _train(text, 280, tmp_path / "small") == EXIT_USAGE
    error = capsys.readouterr().err
    least = int(error.split("use --vocab-size ")[1].split()[0])
    assert f"--vocab-size 280 is below the {least} pieces this text needs" in error
    assert "Traceback" not in error
    assert not (tmp_path / "small").exists()
    assert _train(text, least, tmp_path / "least") == 0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "least")) == least


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = tmp_path / "small.txt"
    small.write_text("a b c\nhello world\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    assert (
        main(["tokenizer", "train", "--input", str(latin1), "--vocab-size", "300", "--out", str(tmp_path / "t")])
        == EXIT_USAGE
    )
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert (
        main(["tokenizer", "train", "--input", str(tmp_path), "--vocab-size", "300", "--out", str(tmp_path / "t")])
        == EXIT_USAGE
    )
    assert "`datasets` cannot load this" in capsys.readouterr().err  # a folder of text files, one of them latin-1
    assert (
        main(["tokenizer", "train", "--input", str(small), "--vocab-size", "100", "--out", str(tmp_path / "t")])
        == EXIT_USAGE
    )
    assert "at least" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("metadata", "unreadable metadata"),
        ("caption", "can't decode byte 0xff"),
        ("index", "has no index.json"),
    ],
)
def test_an_unreadable_shard_folder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage: str, message: str
) -> None:
    shards = make_corpus(tmp_path / "corpus", 12, combinations=(("text", "vision"),))
    if breakage == "index":
        (shards / "index.json").unlink()
    else:
        extension = "json" if breakage == "metadata" else "txt"
        path = sorted(shards.glob("*.tar"))[0]
        with tarfile.open(path) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith(f".{extension}"))
        with open(path, "r+b") as handle:
            handle.seek(member.offset_data)
            handle.write(b"\xff" * member.size)
    out = tmp_path / "tokenizer"
    assert main(["tokenizer", "train", "--input", str(shards), "--vocab-size", "60", "--out", str(out)]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error
    assert not out.exists()
