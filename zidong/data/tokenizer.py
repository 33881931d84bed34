"""`zidong tokenizer train`: a SentencePiece unigram tokenizer for Chinese and English, with an HF fast twin.

    zidong tokenizer train --input data/demo/train more_text.txt --vocab-size 8000 --out tokenizers/zh-en

Inputs are text files (one sentence per line; at a URL when the name ends in `.txt`), shard folders (their `.txt` members), or any source `zidong data
build` reads (the text field of a JSONL manifest, a CSV/TSV column, a Hugging Face dataset's text column,
WebDataset `.txt` members; `--columns text=COLUMN`, `--split`). The output folder holds
`spm.model` (SentencePiece itself) and `tokenizer.json` + `tokenizer_config.json`, which
`AutoTokenizer.from_pretrained(DIR)` loads. The fast tokenizer is assembled by hand from the trained pieces with
`tokenizers` (Unigram with byte fallback, the dummy-prefix normaliser, matching decoder) rather than with the
built-in converter, and a test checks that it gives the same ids and decoded text as SentencePiece.

Training choices: byte fallback (no unknown characters, emoji and rare CJK included), character coverage
0.9995 (what SentencePiece recommends for Chinese), digits split one by one, no text normalisation inside the
tokenizer (the shard builder already applies NFC and collapses whitespace), and special tokens
`<pad> <unk> <s> </s>` (ids 0-3) then `<mask> <text> <vision> <speech>`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

from zidong.data.build import names_shard_folder
from zidong.data.normalize import clean_text
from zidong.data.remote import is_url, url_lines
from zidong.data.shards import SampleError, ShardFolder
from zidong.data.sources import open_source
from zidong.errors import UserError
from zidong.utils.log import get_logger

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
EXTRA_SPECIAL_TOKENS = ["<mask>", "<text>", "<vision>", "<speech>"]
MAX_SENTENCES = 2_000_000
# inputs read as sources (everything else is a text file, one sentence per line)
SOURCE_SUFFIXES = (".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".json", ".tar")
logger = get_logger(__name__)


def read_sentences(
    inputs: list[Path | str], columns: dict[str, str] | None = None, split: str | None = None
) -> Iterator[str]:
    """Non-empty lines of text files, the captions of zidong shard folders, and the text field of every other
    source `zidong data build` reads (zidong/data/sources/: JSONL manifests, CSV/TSV tables, Hugging Face
    datasets, WebDataset tars; `columns` and `split` as there), NFC-normalised with whitespace collapsed as the
    shard builder does."""
    for location in map(str, inputs):
        if names_shard_folder(location):
            yield from _captions(ShardFolder(location))
            continue
        path = Path(location.split("?")[0] if is_url(location) else location)
        if is_url(location) and path.suffix.lower() == ".txt":  # a text file at a URL: one sentence per line
            yield from (line.rstrip("\n") for line in url_lines(location) if line.strip())
            continue
        if is_url(location) or path.is_dir() or path.suffix.lower() in SOURCE_SUFFIXES or "{" in location:
            mapping = None if path.suffix.lower() == ".jsonl" else columns  # a manifest names its own fields
            for text in open_source(location, mapping, split, single=True).texts():
                if isinstance(text, str) and clean_text(text):
                    yield clean_text(text)
            continue
        try:
            with path.open(encoding="utf-8") as stream:
                for line in stream:
                    if line.strip():
                        yield line.rstrip("\n")
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _captions(folder: ShardFolder) -> Iterator[str]:
    """The caption of every sample of a shard folder that has one, in shard order."""
    try:
        for shard, count in enumerate(folder.counts):
            for position in range(count):
                sample = folder.read(shard, position, only=("txt",))
                if "txt" in sample.files:
                    yield sample.files["txt"].decode("utf-8")
    except (SampleError, UnicodeDecodeError) as err:
        raise UserError(
            f"{folder.folder}: a caption cannot be read ({err}); check the folder with `zidong data inspect "
            f"{folder.folder} --checksums` and rebuild it"
        ) from None
    finally:
        folder.close()


def train_tokenizer(
    inputs: list[Path | str],
    vocab_size: int,
    out: Path,
    model_max_length: int = 512,
    exact_size: bool = False,
    columns: dict[str, str] | None = None,
    split: str | None = None,
) -> Path:
    """Train on `inputs` and write the SentencePiece model and its HF fast twin into `out` (returned).

    `vocab_size` is an upper bound: a text too small for it yields the largest vocabulary it supports.
    With `exact_size`, a text that cannot support `vocab_size` pieces is an error instead. Raises UserError for
    unreadable input, no text, a size below what the text's characters need, or (with `exact_size`) above what
    the text supports.
    """
    import sentencepiece

    sentences = list(read_sentences(inputs, columns, split))
    if not sentences:
        raise UserError(f"no text found in {', '.join(map(str, inputs))}")
    minimum = len(SPECIAL_TOKENS) + len(EXTRA_SPECIAL_TOKENS) + 256 + 1  # specials, the 256 byte pieces, one more
    if vocab_size < minimum:
        raise UserError(
            f"--vocab-size must be at least {minimum} (special tokens and 256 byte pieces), got {vocab_size}"
        )
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="unigram",
            vocab_size=vocab_size,
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            input_sentence_size=MAX_SENTENCES,
            shuffle_input_sentence=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=SPECIAL_TOKENS["pad"],
            unk_piece=SPECIAL_TOKENS["unk"],
            bos_piece=SPECIAL_TOKENS["bos"],
            eos_piece=SPECIAL_TOKENS["eos"],
            user_defined_symbols=EXTRA_SPECIAL_TOKENS,
            hard_vocab_limit=exact_size,
            minloglevel=2,
        )
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1].split("] ", 1)[-1]  # drop the C++ source location
        raise UserError(_size_problem(vocab_size, message)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "spm.model").write_bytes(model.getvalue())
    except OSError as err:
        raise UserError(f"cannot write into {out}: {err.strerror or err}") from None
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    fast = fast_tokenizer_from_sentencepiece(processor, model_max_length)
    fast.save_pretrained(out)
    logger.info("trained a %d-piece tokenizer on %d sentences into %s", len(fast), len(sentences), out)
    return out


def _size_problem(vocab_size: int, message: str) -> str:
    """SentencePiece's complaint about a vocabulary size, said as what to pass instead."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        return (
            f"--vocab-size {vocab_size} is below the {too_small[1]} pieces this text needs (one per character "
            f"covering 99.95% of it, and the special tokens); use --vocab-size {too_small[1]} or more"
        )
    too_large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_large:
        return (
            f"--exact-vocab-size: this text supports at most {too_large[1]} pieces, not {vocab_size} "
            f"(sentencepiece: {message}); use --vocab-size {too_large[1]}, add text, or drop --exact-vocab-size "
            "to take --vocab-size as an upper bound"
        )
    return f"sentencepiece cannot train a {vocab_size}-piece vocabulary on this text: {message}"


def fast_tokenizer_from_sentencepiece(processor, model_max_length: int = 512):
    """The HF fast tokenizer equivalent to a SentencePiece unigram model trained as above."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    backend = Tokenizer(models.Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=True))
    # SentencePiece's dummy prefix and its space marker, applied even to text that starts with a space
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, processor.bos_id()), (eos, processor.eos_id())],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        mask_token="<mask>",
        additional_special_tokens=EXTRA_SPECIAL_TOKENS[1:],
        model_max_length=model_max_length,
        # one segment per sample: no token_type_ids, so `model(**tokenizer(texts, padding=True))` passes only
        # what the text tower reads
        model_input_names=["input_ids", "attention_mask"],
    )
