"""`import zidong` is light, `import zidong.models` registers the Auto classes; the data and config commands never
load torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

HEAVY = ("torch", "torchaudio", "transformers", "accelerate", "deepspeed")


def python(code: str) -> str:
    """Run `code` in a fresh interpreter (outside the repository folder) and return its last output line."""
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_import_zidong_loads_no_heavy_package() -> None:
    assert python(f"import sys, zidong; print([m for m in {HEAVY!r} if m in sys.modules])") == "[]"


@pytest.mark.parametrize(
    "code",
    [
        "import zidong.models\nfrom transformers import AutoConfig",
        "from transformers import AutoConfig\nimport zidong.models",
        "import zidong\nfrom transformers import AutoConfig\nzidong.ZidongModel",  # a model name's first use
    ],
    ids=["models first", "auto first", "first use of a model name"],
)
def test_the_model_package_registers_the_auto_classes_in_any_order(code: str) -> None:
    check = (
        "\nfrom transformers import AutoModel, AutoProcessor, AutoModelForSequenceClassification"
        "\nconfig = AutoConfig.for_model('zidong')"
        "\nprint(type(config).__name__, AutoModel._model_mapping[type(config)].__name__,"
        " AutoModelForSequenceClassification._model_mapping[type(config)].__name__)"
    )
    assert python(code + check) == "ZidongConfig ZidongModel ZidongForClassification"


def test_import_zidong_alone_changes_nothing_in_transformers() -> None:
    # no import hook: a program that never touches the model gets transformers exactly as it is
    code = (
        "import sys, zidong\nfrom transformers.models.auto.configuration_auto import CONFIG_MAPPING"
        "\nprint('zidong' in CONFIG_MAPPING, [f for f in sys.meta_path if 'zidong' in type(f).__module__])"
    )
    assert python(code) == "False []"


def test_model_names_load_on_first_use() -> None:
    code = "import zidong\nprint(zidong.ZidongModel.__name__, zidong.ZidongModel._auto_class, 'ZidongModel' in dir(zidong))"
    assert python(code) == "ZidongModel AutoModel True"
    with pytest.raises(AssertionError, match="has no attribute 'Nope'"):
        python("import zidong\nzidong.Nope")


def test_help_data_inspect_and_a_bad_recipe_load_no_heavy_package(demo_corpus: Path) -> None:
    tiny = REPO_ROOT / "recipes" / "pretrain" / "tiny.yaml"
    commands = [
        ["--help"],
        ["data", "inspect", str(demo_corpus / "train")],
        ["pretrain", str(tiny), "not.a.key=1"],
        ["pretrain", str(tiny), "--print-config"],
        ["finetune", "classify", str(REPO_ROOT / "recipes" / "finetune" / "probe-color-speech.yaml"), "nope=1"],
    ]
    for words in commands:
        code = (
            "import contextlib, io, sys\nfrom zidong.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    try:\n        main({words!r})\n    except SystemExit:\n        pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])"
        )
        assert python(code) == "[]", words
