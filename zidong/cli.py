"""The `zidong` command line: one entry point for data, tokenizer, pretraining, evaluation, export and fine-tuning.

    zidong --help                      every subcommand
    zidong SUBCOMMAND --help           its arguments

Parsing and validation happen here, before any model or data is built: a wrong argument, path or recipe key exits with
code 2 and a one-paragraph message, never a traceback. What each subcommand then does is in zidong/commands.py,
which imports its modules only when that subcommand runs. Runs the same under `python -m zidong`,
`accelerate launch -m zidong` and `torchrun -m zidong`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from zidong import __version__, commands
from zidong.errors import EXIT_USAGE, UserError

DOCS_HINT = "Recipes live in recipes/, guides in docs/ (start with docs/cli.md and docs/recipes.md)."
FINETUNE_TASKS = ("retrieval", "classify")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")  # zidong.export.folders.DTYPES


# ------------------------------------------------------------------------------------ argument types


class _SourceKinds:
    """`--source-kind`'s choices: the registry of source kinds (zidong/data/sources/), read only when argparse
    checks a value or lists them, so that the other commands start without importing it."""

    def __contains__(self, kind: object) -> bool:
        from zidong.data.sources import SOURCE_KINDS

        return kind in SOURCE_KINDS

    def __iter__(self) -> Iterator[str]:
        from zidong.data.sources import SOURCE_KINDS

        return iter(list(SOURCE_KINDS))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _sample_count(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of samples such as 13e9, got {text!r}") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _part(text: str) -> tuple[int, int]:
    """`i/N`: slice i (counting from 0) of N, as a cluster job array hands out."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected i/N with 0 <= i < N (e.g. 0/8), got {text!r}")
    return int(index), int(count)


def _existing(kind: str) -> Callable[[str], Path]:
    """An argument type accepting an existing path of `kind`: "file", "folder", or "file or folder"."""

    def check(text: str) -> Path:
        path = Path(text)
        if not path.exists():
            raise argparse.ArgumentTypeError(f"no such {kind}: {text}")
        if kind == "file" and not path.is_file():
            raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file")
        if kind == "folder" and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file, expected a folder")
        return path

    return check


_existing_file = _existing("file")
_existing_dir = _existing("folder")
_existing_path = _existing("file or folder")


def _source_path(text: str) -> Path | str:
    """An existing path, or a brace pattern of tar files (`shards/{00000..00099}.tar`) or a URL (checked when
    opened)."""
    from zidong.data.remote import is_url

    return text if "{" in text or is_url(text) else _existing_path(text)


# ------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zidong",
        description="Pretrain, evaluate, export and fine-tune a tri-modal (text, speech, vision) encoder stack.",
        epilog=DOCS_HINT,
    )
    parser.add_argument("--version", action="version", version=f"zidong {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = subcommands.add_parser("data", help="build, inspect and generate tri-modal shard folders")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    demo = data_commands.add_parser("demo", help="write the built-in tiny tri-modal demo corpus as shards")
    demo.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write the shards into")
    demo.add_argument("--samples", type=_positive_int, metavar="N", help="number of samples (default: built-in)")
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="random seed; same seed, same corpus")
    demo.set_defaults(handler=commands.data_demo)

    build = data_commands.add_parser(
        "build", help="validate a JSONL manifest, a CSV/TSV table or a Hugging Face dataset; write shards"
    )
    build.add_argument(
        "manifest",
        type=_source_path,
        metavar="SOURCE",
        help="a .jsonl manifest, a .csv/.tsv table, a dataset folder (save_to_disk, imagefolder, audiofolder, parquet "
        "files), a .parquet/.arrow/.json file, or WebDataset tars: a folder, a .tar, a brace pattern; each also at a "
        "URL (https://, s3://, ...; docs/data.md)",
    )
    build.add_argument(
        "--columns",
        action="append",
        default=[],
        metavar="FIELD=COLUMN,...",
        help="which column holds id, text, image, audio, lang (default: the usual names, e.g. caption, jpg, flac)",
    )
    build.add_argument("--split", metavar="NAME", help="the split of a dataset that has several")
    build.add_argument(
        "--source-kind", choices=_SourceKinds(), metavar="KIND", help="instead of detecting it: %(choices)s"
    )
    build.add_argument(
        "--streaming",
        action="store_true",
        help="read a Hugging Face dataset as a stream, storing none of it (hf://datasets/ORG/NAME always is)",
    )
    build.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write the shards into")
    _add_storage_option(build)
    build.add_argument("--shard-size", type=_positive_int, metavar="N", help="samples per shard")
    build.add_argument("--workers", type=_positive_int, metavar="N", help="decoding processes")
    build.add_argument("--part", type=_part, metavar="i/N", help="build only slice i of N (job arrays)")
    build.add_argument(
        "overrides", nargs="*", metavar="key=value", help="build settings, e.g. max_audio_seconds=20 (docs/data.md)"
    )
    build.set_defaults(handler=commands.data_build, takes_overrides=True)

    inspect = data_commands.add_parser("inspect", help="summarise a shard folder and check it against its index")
    inspect.add_argument("folder", type=_existing_dir, metavar="DIR")
    inspect.add_argument("--checksums", action="store_true", help="also verify every shard's sha256")
    inspect.set_defaults(handler=commands.data_inspect)

    tokenizer = subcommands.add_parser("tokenizer", help="train a SentencePiece tokenizer (Chinese and English)")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND", required=True)
    train_tokenizer = tokenizer_commands.add_parser("train", help="train a unigram tokenizer on text files")
    train_tokenizer.add_argument(
        "--input",
        required=True,
        nargs="+",
        type=_source_path,
        metavar="PATH",
        help="text files, shard folders, or any `data build` source (JSONL, CSV/TSV, Hugging Face dataset, tars)",
    )
    train_tokenizer.add_argument(
        "--columns", action="append", default=[], metavar="text=COLUMN", help="the text column of table/dataset inputs"
    )
    train_tokenizer.add_argument("--split", metavar="NAME", help="the split of a dataset input that has several")
    train_tokenizer.add_argument(
        "--vocab-size",
        required=True,
        type=_positive_int,
        metavar="N",
        help="the most pieces; a text too small for N gets the most it supports (see --exact-vocab-size)",
    )
    train_tokenizer.add_argument(
        "--exact-vocab-size", action="store_true", help="exactly N pieces, or exit 2 if the text cannot support N"
    )
    train_tokenizer.add_argument("--out", required=True, type=Path, metavar="DIR")
    _add_storage_option(train_tokenizer)
    train_tokenizer.set_defaults(handler=commands.tokenizer_train)

    pretrain = subcommands.add_parser(
        "pretrain",
        help="run a pretraining recipe (also under accelerate/torchrun)",
        epilog="Overrides use the recipe's dotted keys, e.g. train.max_steps=100 "
        "model.vision.pretrained=/path/to/vit. See docs/recipes.md.",
    )
    pretrain.add_argument("recipe", metavar="RECIPE.yaml")
    pretrain.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    pretrain.add_argument(
        "--dry-run", action="store_true", help="build the model on the meta device and print sizes, FLOPs and memory"
    )
    pretrain.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    pretrain.add_argument(
        "--gpus", type=_positive_int, default=8, metavar="N", help="GPU count for the --dry-run memory and cluster plan"
    )
    pretrain.add_argument(
        "--gpu-kind", choices=("a100", "h100", "h200"), default="h100", help="GPU kind for the --dry-run cluster plan"
    )
    pretrain.add_argument(
        "--mfu", type=_fraction, default=0.35, metavar="F", help="model FLOPs utilisation the plan assumes (0.35)"
    )
    pretrain.add_argument(
        "--samples", type=_sample_count, metavar="N", help="sample budget for the plan's days (default: the recipe's)"
    )
    pretrain.set_defaults(handler=commands.pretrain, takes_overrides=True)

    evaluate = subcommands.add_parser(
        "eval", help="zero-shot retrieval and classification on held-out shards or a dataset in another format"
    )
    evaluate.add_argument("model", type=_existing_path, metavar="MODEL_OR_CHECKPOINT")
    evaluate.add_argument(
        "--data",
        required=True,
        type=_source_path,
        metavar="SOURCE",
        help="a shard folder, or any `data build` source (Hugging Face dataset, CSV/TSV, JSONL, WebDataset tars)",
    )
    evaluate.add_argument("--labels", type=_existing_file, metavar="FILE", help="label prompts for classification")
    evaluate.add_argument(
        "--label-column", metavar="COLUMN", help="classify by this column's values (instead of --labels)"
    )
    evaluate.add_argument(
        "--prompt",
        action="append",
        metavar="TEMPLATE",
        help="with --label-column: a prompt with {} for the class name, e.g. 'a photo of a {}' (repeatable; "
        "default '{}')",
    )
    evaluate.add_argument("--columns", action="append", default=[], metavar="FIELD=COLUMN,...", help="as in data build")
    evaluate.add_argument("--split", metavar="NAME", help="the split of a dataset that has several")
    evaluate.add_argument(
        "--streaming",
        action="store_true",
        help="read a Hugging Face dataset as a stream, storing none of it (hf://datasets/ORG/NAME always is)",
    )
    evaluate.add_argument("--out", type=Path, metavar="metrics.json", help="also write the metrics as JSON")
    evaluate.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="samples per forward")
    _add_storage_option(evaluate)
    evaluate.set_defaults(handler=commands.evaluate)

    export = subcommands.add_parser("export", help="write a checkpoint as Hugging Face folders")
    export.add_argument("checkpoint", type=_existing_path, metavar="CHECKPOINT")
    export.add_argument("--out", required=True, type=Path, metavar="DIR")
    export.add_argument("--towers", action="store_true", help="also write one plain transformers folder per tower")
    export.add_argument(
        "--merge-lora",
        action="store_true",
        help="merge a LoRA fine-tune's adapters into the weights (default: keep them, and write each as a peft folder)",
    )
    export.add_argument("--push-to-hub", metavar="REPO", help="upload the export to this hub repository")
    export.add_argument("--license", default="apache-2.0", help="license named in the model card (default apache-2.0)")
    export.add_argument(
        "--dtype",
        choices=EXPORT_DTYPES,
        default="float32",
        help="the weights' dtype (default float32, what training keeps under any autocast precision)",
    )
    export.set_defaults(handler=commands.export)

    finetune = subcommands.add_parser("finetune", help="fine-tune a pretrained model for a downstream task")
    finetune.add_argument("task", choices=FINETUNE_TASKS, metavar="TASK", help=" | ".join(FINETUNE_TASKS))
    finetune.add_argument("recipe", type=_existing_file, metavar="RECIPE.yaml")
    finetune.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    finetune.set_defaults(handler=commands.finetune, takes_overrides=True)

    report = subcommands.add_parser("report", help="plot loss and retrieval curves of a run as PNG files")
    report.add_argument("run_dir", type=_existing_dir, metavar="RUN_DIR")
    report.set_defaults(handler=commands.report)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting `key=value` overrides stand anywhere after the recipe, even after a flag."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "takes_overrides", False) or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="PROTOCOL.KEY=VALUE",
        help="an fsspec setting for data at URLs, e.g. s3.endpoint_url=http://localhost:9000; $NAME reads an "
        "environment variable (repeatable; docs/data.md)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 success, 2 user error."""
    args = _parse(build_parser(), argv)
    try:
        if getattr(args, "storage_option", None):
            from zidong.data.remote import configure_storage, parse_storage_options

            configure_storage(parse_storage_options(args.storage_option))
        return args.handler(args)
    except UserError as err:
        print(f"zidong: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def run() -> None:
    """Console-script entry point."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        sys.stderr.close()  # output piped into e.g. `head`: stop quietly
        code = 0
    sys.exit(code)
