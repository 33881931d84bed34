"""What each `zidong` subcommand does once its arguments are parsed (zidong/cli.py parses them): each imports
its own modules when it runs, so a command pays only for what it uses. Each returns the exit code; a `UserError`
becomes exit code 2 with its message (zidong/cli.py's `main`).
"""

from __future__ import annotations

import argparse
import os
import sys

from zidong.data.remote import configure_storage
from zidong.errors import EXIT_USAGE, UserError


def pretrain(args: argparse.Namespace) -> int:
    from zidong.config import load_config, to_yaml
    from zidong.train.recipe import PretrainRecipe

    recipe = load_config(PretrainRecipe, args.recipe, args.overrides)
    if args.print_config:
        sys.stdout.write(to_yaml(recipe))
        return 0
    configure_storage(recipe.data.storage_options)
    if args.dry_run:
        from zidong.train.dry_run import dry_run_report

        print(dry_run_report(recipe, args.gpus, args.gpu_kind, args.mfu, args.samples))
        return 0
    quiet_deepspeed_on_cpu()
    from zidong.train.distributed import check_launch
    from zidong.train.trainer import pretrain
    from zidong.utils.run_info import record_run

    check_launch(recipe)  # before anything is written
    record_run(recipe.output_dir, recipe)
    pretrain(recipe)
    return 0


def finetune(args: argparse.Namespace) -> int:
    from zidong.config import load_config
    from zidong.train.recipe import FinetuneRecipe
    from zidong.utils.run_info import record_run

    recipe = load_config(FinetuneRecipe, args.recipe, args.overrides)  # a bad recipe exits before torch loads
    configure_storage(recipe.data.storage_options)
    quiet_deepspeed_on_cpu()
    from zidong.train.distributed import check_launch
    from zidong.train.finetune import finetune

    check_launch(recipe)  # before anything is written
    record_run(recipe.output_dir, recipe)
    finetune(args.task, recipe)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    quiet_deepspeed_on_cpu()
    from zidong.evaluation.zero_shot import DataSpec, evaluate

    if args.labels and args.label_column:
        raise UserError("give --labels FILE or --label-column COLUMN, not both")
    if args.prompt and not args.label_column:
        raise UserError("--prompt goes with --label-column (a label file names its own prompts)")
    columns = columns_of(args)
    prompts = tuple(args.prompt or ("{}",))
    spec = DataSpec(args.data, columns, args.split, args.label_column, prompts, streaming=args.streaming)
    evaluate(args.model, spec, args.labels, args.out, args.batch_size)
    return 0


def export(args: argparse.Namespace) -> int:
    quiet_deepspeed_on_cpu()
    from zidong.export.folders import export

    print(
        export(
            args.checkpoint,
            args.out,
            args.towers,
            args.push_to_hub,
            args.license,
            dtype=args.dtype,
            merge_lora=args.merge_lora,
        )
    )
    return 0


def report(args: argparse.Namespace) -> int:
    from zidong.train.report import write_report

    for path in write_report(args.run_dir):
        print(path)
    return 0


def data_build(args: argparse.Namespace) -> int:
    from zidong.config import config_from_overrides
    from zidong.data.normalize import BuildSettings

    overrides = list(args.overrides)
    if args.shard_size:
        overrides.append(f"shard_size={args.shard_size}")
    settings = config_from_overrides(BuildSettings, overrides, "build settings")
    from zidong.data.build import build
    from zidong.data.sources import open_source

    columns = columns_of(args)
    source = open_source(args.manifest, columns, args.split, args.source_kind, streaming=args.streaming)
    result = build(source, args.out, settings, workers=args.workers or 1, part=args.part or (0, 1))
    index, count = result.part
    scope = f"part {index}/{count}: " if count > 1 else ""
    print(f"{scope}{result.samples} samples in {result.shards} shards, {result.rejected} rejected")
    if not result.index_written:
        print(f"{args.out}/index.json is written when every part has finished")
        return 0
    print(f"wrote {args.out}/index.json and {args.out}/rejects.jsonl (see `zidong data inspect {args.out}`)")
    return 0


def data_demo(args: argparse.Namespace) -> int:
    from zidong.data.demo import DEFAULT_SAMPLES, make_demo

    indexes = make_demo(args.out, samples=args.samples or DEFAULT_SAMPLES, seed=args.seed)
    for split, index in indexes.items():
        mix = ", ".join(f"{name} {count}" for name, count in index["combinations"].items())
        print(f"{args.out / split}: {index['samples']} samples ({mix}), {index['audio_hours'] * 60:.1f} min of speech")
    return 0


def tokenizer_train(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from zidong.data.tokenizer import train_tokenizer

    columns = columns_of(args)
    out = train_tokenizer(
        args.input, args.vocab_size, args.out, exact_size=args.exact_vocab_size, columns=columns, split=args.split
    )
    pieces = len(AutoTokenizer.from_pretrained(out))
    print(f"wrote {out}/spm.model and {out}/tokenizer.json: {pieces} pieces (load with AutoTokenizer.from_pretrained)")
    if pieces < args.vocab_size:
        print(
            f"--vocab-size {args.vocab_size} is an upper bound: this text supports {pieces} pieces (add text for more)"
        )
    return 0


def data_inspect(args: argparse.Namespace) -> int:
    from zidong.data.inspect import check_shards, summary
    from zidong.data.shards import load_index

    index = load_index(args.folder)
    problems = check_shards(args.folder, index, checksums=args.checksums)
    sys.stdout.write(summary(args.folder, index, problems))
    return EXIT_USAGE if problems else 0


def columns_of(args: argparse.Namespace) -> dict[str, str]:
    """`--columns text=caption,image=jpg` (repeatable) as a field -> column mapping."""
    from zidong.data.sources import parse_columns

    return parse_columns([pair for given in args.columns for pair in given.split(",") if pair.strip()])


def quiet_deepspeed_on_cpu() -> None:
    """Without a GPU, tell DeepSpeed so (what it would pick anyway), or it prints a warning on stdout whenever
    Accelerate imports it, polluting the output of `zidong eval` and friends. Called by the commands that load
    Accelerate or DeepSpeed only, so the data commands do not pay for importing torch."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
