"""The command-line contract: every subcommand answers --help, user errors exit 2 without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT, run_cli
from zidong import __version__
from zidong.cli import EXIT_USAGE, main

TINY = str(REPO_ROOT / "recipes" / "pretrain" / "tiny.yaml")
SUBCOMMANDS = ["data", "tokenizer", "pretrain", "eval", "export", "finetune", "report"]
ALL_HELP = [
    ["data", "demo"], ["data", "build"], ["data", "inspect"], ["tokenizer", "train"],
    ["pretrain"], ["eval"], ["export"], ["finetune"], ["report"],
]  # fmt: skip


def test_help_lists_every_subcommand() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert f"\n    {name}" in result.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "zidong"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"zidong {__version__}"


@pytest.mark.parametrize("words", ALL_HELP, ids=lambda words: " ".join(words))
def test_every_subcommand_has_help(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*words, "--help"])
    assert exited.value.code == 0
    assert f"usage: zidong {' '.join(words)}" in capsys.readouterr().out


def test_unknown_recipe_key_exits_2_naming_it_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert main(["pretrain", TINY, f"output_dir={run_dir}", "not.a.key=1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown key `not.a.key`" in err
    assert TINY in err
    assert not run_dir.exists()


def test_unknown_key_through_the_real_entry_point() -> None:
    result = run_cli("pretrain", TINY, "train.max_step=3")
    assert result.returncode == EXIT_USAGE
    assert "Did you mean `train.max_steps`?" in result.stderr
    assert "Traceback" not in result.stderr


def test_overrides_may_follow_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", TINY, "train.max_steps=7", "--print-config", "train.batch_size=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 7
    assert printed["train"]["batch_size"] == 3


def test_print_config_shows_resolved_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", TINY, "--print-config", "model.vision.pretrained=/models/vit"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["vision"]["pretrained"] == "/models/vit"
    assert printed["resume"] == "auto"
    assert printed["checkpoint"]["keep_last"] == 2


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["pretrain", "missing.yaml"], "recipe file not found: missing.yaml"),
        (["pretrain", TINY, "oops"], "an override must look like `section.key=value`"),
        (["pretrain", TINY, "train.batch_size=0"], "`train.batch_size`: must be at least 1, got 0"),
        (["pretrain", TINY, "parallel.collective_timeout_s=0"], "`parallel.collective_timeout_s`: must be greater"),
        (["pretrain", TINY, "data.worker_timeout_s=-1"], "`data.worker_timeout_s`: must be greater than 0"),
        (["pretrain", TINY, "resume= "], "`resume`: must be `auto`"),
    ],
)
def test_recipe_errors_exit_2(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_USAGE
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["pretrain"], "the following arguments are required: RECIPE.yaml"),
        (["pretrain", TINY, "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["pretrain", TINY, "--dry-run", "--mfu", "0"], "argument --mfu: must be in (0, 1], got 0.0"),
        (["pretrain", TINY, "--dry-run", "--gpu-kind", "tpu"], "argument --gpu-kind: invalid choice: 'tpu'"),
        (["pretrain", TINY, "--dry-run", "--samples", "lots"], "argument --samples: expected a number of samples"),
        (["data", "build", "missing.jsonl", "--out", "x"], "no such file or folder: missing.jsonl"),
        (["data", "build", TINY, "--out", "x", "--part", "8/8"], "expected i/N with 0 <= i < N"),
        (["data", "demo", "--out", "x", "--samples", "0"], "must be at least 1, got 0"),
        (["data", "demo", "--out", "x", "--samples", "many"], "expected a whole number, got 'many'"),
        (["data", "inspect", TINY], "is a file, expected a folder"),
        (["eval", "nowhere", "--data", "."], "no such file or folder: nowhere"),
        (["export", "nowhere", "--out", "x"], "no such file or folder: nowhere"),
        (["finetune", "segment", TINY], "invalid choice: 'segment'"),
        (["report", "nowhere"], "no such folder: nowhere"),
        (["tokenizer", "train", "--input", "nowhere", "--vocab-size", "8", "--out", "x"], "no such file or folder"),
        (["data", "inspect", ".", "stray=1"], "unrecognized arguments: stray=1"),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    assert expected in capsys.readouterr().err


def test_pretrain_records_the_run_in_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("pretrain", TINY, f"output_dir={out}", "train.max_steps=9")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000009" / "model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 9
    (launch,) = [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]
    assert launch["argv"][1:] == ["pretrain", TINY, f"output_dir={out}", "train.max_steps=9"]
    assert launch["packages"]["torch"].startswith("2.11")


def test_unwritable_output_dir_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("pretrain", TINY, f"output_dir={blocker}/run")
    assert result.returncode == EXIT_USAGE
    assert "cannot write the run record into output_dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("task", "overrides", "message"),
    [
        ("classify", ["finetune.modalities=[vision, speech]"], "classify takes exactly one modality"),
        ("classify", ["finetune.labels=null"], "classify needs a label file"),
        ("retrieval", ["finetune.modalities=[text]"], "retrieval needs two or three modalities"),
        ("retrieval", ["finetune.source=nowhere"], "nowhere: no such folder"),
        ("retrieval", ["finetune.lora.towers=[speech]"], "speech not among finetune.modalities"),
        ("retrieval", ["finetune.lora.rank=0"], "`finetune.lora.rank`: must be at least 1, got 0"),
        ("retrieval", ["finetune.lora.dropout=1"], "must lie in [0, 1)"),
        ("retrieval", ["finetune.lora.towers=[text]", "finetune.lora.target_modules.vision=[query]"], "no adapter on"),
        ("classify", ["finetune.lora.rank=4"], "-1 would freeze the LoRA adapter of the speech tower too"),
    ],
)
def test_bad_finetune_recipes_exit_2(task: str, overrides: list[str], message: str, tmp_path: Path) -> None:
    recipe = f"recipes/finetune/{'probe-color-speech' if task == 'classify' else 'retrieval-text-vision'}.yaml"
    result = run_cli("finetune", task, recipe, f"output_dir={tmp_path / 'run'}", *overrides)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
