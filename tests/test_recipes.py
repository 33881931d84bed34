"""Every shipped recipe loads and validates against its schema."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, run_cli
from zidong.config import load_config
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.train.recipe import FinetuneRecipe, PretrainRecipe

PRETRAIN_RECIPES = sorted((REPO_ROOT / "recipes" / "pretrain").glob("*.yaml"))
FINETUNE_RECIPES = sorted((REPO_ROOT / "recipes" / "finetune").glob("*.yaml"))


def test_recipes_are_shipped() -> None:
    assert [path.name for path in PRETRAIN_RECIPES] == ["base.yaml", "large.yaml", "tiny.yaml"]


@pytest.mark.parametrize("path", PRETRAIN_RECIPES, ids=lambda path: path.name)
def test_pretrain_recipe_validates(path: Path) -> None:
    recipe = load_config(PretrainRecipe, path)
    assert recipe.train.max_steps >= 1
    assert recipe.data.train


@pytest.mark.parametrize("path", PRETRAIN_RECIPES, ids=lambda path: path.name)
def test_recipe_header_gives_its_launch_command(path: Path) -> None:
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    relative = path.relative_to(REPO_ROOT).as_posix()
    assert any(f"zidong pretrain {relative}" in line for line in header)


def test_dry_run_sizes_the_large_recipe_without_allocating_it() -> None:
    # VmHWM, not getrusage: ru_maxrss survives exec, so a child of a big pytest process would report the parent's
    script = (
        "import re, sys\n"
        "from zidong.cli import main\n"
        "code = main(['pretrain', 'recipes/pretrain/large.yaml', '--dry-run', '--gpus', '32'])\n"
        "status = open('/proc/self/status').read()\n"
        "print('peak_rss_kb', re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    total = int(re.search(r"^total\s+([\d,]+)", result.stdout, re.MULTILINE).group(1).replace(",", ""))
    assert 0.9e9 < total < 1.3e9  # "about 1B parameters"
    for name in ("text", "vision", "speech", "fusion"):
        assert re.search(rf"^{name}\s+[\d,]+$", result.stdout, re.MULTILINE)
    assert re.search(r"training FLOPs per sample: \d\.\d+e\+1\d", result.stdout)
    assert "ZeRO-3:" in result.stdout
    # FSDP2 over all 32 GPUs, HSDP in 4 nodes of 8: 16 bytes of float32 state per parameter, sharded over the group
    fsdp = re.search(r"FSDP2:\s+[\d.]+ GiB  \(([\d.]+) sharded state \+ ([\d.]+) gathered", result.stdout)
    hsdp = re.search(r"HSDP 4 x 8:\s+[\d.]+ GiB  \(([\d.]+) sharded state \+ ([\d.]+) gathered", result.stdout)
    assert float(fsdp.group(1)) == pytest.approx(total * 16 / 32 / 2**30, abs=0.006)
    assert float(hsdp.group(1)) == pytest.approx(total * 16 / 8 / 2**30, abs=0.006)
    assert fsdp.group(2) == hsdp.group(2)
    assert "cluster plan: 32 x H100 SXM" in result.stdout
    ddp = re.search(r"^  DDP\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d,]+)", result.stdout, re.MULTILINE)
    flops = float(re.search(r"training FLOPs per sample: (\S+)", result.stdout).group(1))
    assert float(ddp.group(3)) == pytest.approx(flops * 128 / (989e12 * 0.35), rel=1e-3)  # batch 64 x accum 2
    peak_gib = int(re.search(r"peak_rss_kb (\d+)", result.stdout).group(1)) / 2**20
    assert peak_gib < 2.0  # the fp32 weights alone would take 4.3 GiB


def test_dry_run_counts_as_trained_only_what_the_objectives_train() -> None:
    from zidong.train.builders import model_config
    from zidong.train.dry_run import dry_run_report

    def counts(*overrides: str) -> tuple[dict[str, int], PretrainRecipe]:
        recipe = load_config(
            PretrainRecipe, REPO_ROOT / "recipes/pretrain/tiny.yaml", ["model.tokenizer=null", *overrides]
        )
        report = dry_run_report(recipe, gpus=8)
        rows = re.findall(r"^(\w[\w ]*?)\s+([\d,]+)(?:\s|$)", report, re.MULTILINE)
        return {name: int(count.replace(",", "")) for name, count in rows}, recipe

    every = ("loss.matching.weight=0.5", "loss.masked_text.weight=0.5")
    with_all, _ = counts(*every, "loss.masked_vision.weight=0.5", "loss.masked_speech.weight=0.5")
    assert with_all["trained"] == with_all["total"]
    contrastive, recipe = counts()  # the tiny recipe: contrastive only
    with torch.device("meta"):
        model = ZidongModel(model_config(recipe))
    heads = sum(p.numel() for name in ("matching_head", "text_head", "vision_head", "speech_head")
                for p in getattr(model, name).parameters())  # fmt: skip
    assert contrastive["total"] - contrastive["trained"] == contrastive["fusion"] + heads


@pytest.mark.parametrize("path", FINETUNE_RECIPES, ids=lambda path: path.name)
def test_finetune_recipe_validates_and_gives_its_launch_command(path: Path) -> None:
    recipe = load_config(FinetuneRecipe, path)
    task = "classify" if recipe.finetune.labels else "retrieval"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"zidong finetune {task} {path.relative_to(REPO_ROOT).as_posix()}" in line for line in header)
    assert len(FINETUNE_RECIPES) == 4


CONVNEXT = "{model_type: convnext, image_size: 64, hidden_sizes: [32, 64, 128], depths: [2, 2, 2], num_stages: 3}"


def test_a_tower_config_in_the_recipe_builds_that_architecture() -> None:
    from zidong.train.builders import model_config

    recipe = load_config(PretrainRecipe, PRETRAIN_RECIPES[2], [f"model.vision.config={CONVNEXT}"])
    vision = model_config(recipe).vision_config
    assert (vision.model_type, vision.hidden_sizes, vision.depths) == ("convnext", [32, 64, 128], [2, 2, 2])
    deeper = load_config(PretrainRecipe, PRETRAIN_RECIPES[2], ["model.vision.config.num_hidden_layers=4"])
    vision = model_config(deeper).vision_config
    assert (vision.model_type, vision.num_hidden_layers, vision.hidden_size) == ("vit", 4, 128)  # the rest: tiny's
    stacked = ["model.config.speech_frame_stack=4", "model.speech.config.feature_projection_input_dim=320"]
    config = model_config(load_config(PretrainRecipe, PRETRAIN_RECIPES[2], stacked))
    assert (config.speech_frame_stack, config.speech_config.feature_projection_input_dim) == (4, 320)
    dry_run = run_cli("pretrain", "recipes/pretrain/tiny.yaml", "--dry-run", f"model.vision.config={CONVNEXT}")
    assert dry_run.returncode == 0, dry_run.stderr
    assert re.search(r"^vision\s+413,280$", dry_run.stdout, re.MULTILINE)  # ConvNextModel of these sizes
    assert "vision 37, speech 375 (vision: a convolutional tower's forward FLOPs / (2 x parameters))" in dry_run.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.vision.config.model_type=convnxt"],
            "model.speech.config): ZidongConfig.vision_config.model_type 'convnxt' is not a transformers "
            "architecture; did you mean convnext",
        ),
        (
            [f"model.vision.config={CONVNEXT}", "model.vision.config.depths=[2, 2]"],
            "model.vision.config: a convnext tower cannot be built from it (IndexError",
        ),
        (
            ["model.text.config.hidden_size=101"],
            "model.text.config: a bert tower cannot be built from it (ValueError: The hidden size (101) is not a "
            "multiple of the number of attention heads (2))",
        ),
        (
            [f"model.vision.config={CONVNEXT}", "loss.masked_vision.weight=0.5"],
            "loss.masked_vision.weight=0.5: masked vision modelling needs a vision transformer",
        ),
        (
            ["model.speech.pretrained=recipes", "model.speech.config.hidden_size=64"],
            "model.speech: give `pretrained` or `config`, not both",
        ),
        (
            ["model.config.projection_dimm=64"],
            "model.config.projection_dimm: not a field of the model config; the fields a recipe may set: "
            "contrastive_loss, fusion_dropout,",
        ),
        (
            ["model.config.projection_dim=abc"],
            "model.config.projection_dim: expected a number (default 256), got 'abc'",
        ),
        (["model.config.mask_token_id=4"], "model.config.mask_token_id: not a field of the model config"),
        (
            ["model.config.speech_frame_stack=2"],  # the tiny recipe stacks 4 frames into 320 inputs
            "(check model.config, model.speech.config): speech_config.feature_projection_input_dim is 320 but the "
            "front end produces num_mel_bins x speech_frame_stack = 80 x 2 = 160",
        ),
    ],
)
def test_a_tower_config_that_cannot_be_built_exits_2_naming_the_key(
    overrides: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    from zidong.cli import main

    # any exception other than the user error would escape `main` (and print a traceback from the console script)
    assert main(["pretrain", str(PRETRAIN_RECIPES[2]), "--dry-run", *overrides]) == 2
    assert message in capsys.readouterr().err
