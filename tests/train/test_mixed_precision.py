"""`train.mixed_precision=bf16` through the real trainer on CPU: the start-up log names the precision, 30 steps of
the tiny preset (every objective) stay finite and near the float32 run, resume is bitwise, export writes float32
(or the dtype asked for); fp16, which Accelerate cannot do on CPU, exits 2 before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import run_cli
from tests.pretrain_run import write_recipe
from tests.tiny_model import sample_inputs
from zidong.export.trained import load_trained

STEPS = 30
# bf16 matmuls are emulated on CPUs without bf16 instructions (CI's, ~40x slower than float32 in a plain matmul):
# a step of batch 8 took about 14 s in a suite run, of batch 4 3.2 s against 0.57 s in float32 (beside other runs)
BATCH = 4
RESUME_FROM = 25  # checkpoints at 25 and 30: the resumed run repeats 5 steps
QUIET = {"ZIDONG_PROGRESS": "0"}
# measured on this corpus at batch 4 (losses 5.9 -> 4.8): bf16 and float32 differ by at most 0.018 in a step
# (0.4 %), the median step by 0.002; stated tolerance 3 % of the float32 loss in every step
RELATIVE_TOLERANCE = 0.03


def train(folder: Path, pretrain_corpus: dict[str, Path], *overrides: str) -> tuple[Path, str]:
    recipe = write_recipe(
        folder,
        pretrain_corpus,
        train={"max_steps": STEPS, "batch_size": BATCH},
        checkpoint={"every_steps": RESUME_FROM, "keep_last": 2},
        data={"num_workers": 0, "ledger": False},
    )
    result = run_cli("pretrain", str(recipe), *overrides, env=QUIET)
    assert result.returncode == 0, result.stderr
    return folder / "run", result.stderr


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def dtypes(folder: Path) -> set[str]:
    """The dtypes of the tensors in an export's weights file, as the safetensors library reads its header."""
    with safe_open(folder / "model.safetensors", "pt") as weights:
        return {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def runs(pretrain_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return {
        precision: train(tmp_path_factory.mktemp(precision), pretrain_corpus, f"train.mixed_precision={precision}")
        for precision in ("no", "bf16")
    }


def test_bf16_trains_finite_near_float32_and_says_so(runs: dict[str, tuple[Path, str]]) -> None:
    (float32_run, float32_log), (bf16_run, bf16_log) = runs["no"], runs["bf16"]
    assert "precision: float32 (train.mixed_precision=no)" in float32_log
    assert "precision: bf16 autocast on cpu" in bf16_log
    reference, reduced = losses(float32_run), losses(bf16_run)
    assert len(reference) == len(reduced) == STEPS
    assert all(math.isfinite(loss) for loss in reduced)
    gaps = [abs(a - b) / a for a, b in zip(reference, reduced, strict=True)]
    assert max(gaps) <= RELATIVE_TOLERANCE, gaps
    assert reduced != reference  # autocast was in effect
    assert sum(reduced[-5:]) < sum(reduced[:5])  # and it learned


def test_bf16_resume_is_bitwise(
    runs: dict[str, tuple[Path, str]],
    pretrain_corpus: dict[str, Path],
    tmp_path: Path,
) -> None:
    straight = runs["bf16"][0]
    checkpoint = straight / "checkpoints" / f"step-{RESUME_FROM:08d}"
    resumed, log = train(tmp_path, pretrain_corpus, "train.mixed_precision=bf16", f"resume={checkpoint}")
    assert "resumed from" in log
    final = Path("checkpoints") / "step-00000030" / "model.safetensors"
    with safe_open(straight / final, "pt") as expected, safe_open(resumed / final, "pt") as got:
        assert set(expected.keys()) == set(got.keys())
        for name in expected.keys():  # noqa: SIM118
            assert torch.equal(expected.get_tensor(name), got.get_tensor(name)), name


def test_a_bf16_run_exports_float32_or_the_dtype_asked_for(runs: dict[str, tuple[Path, str]], tmp_path: Path) -> None:
    run = runs["bf16"][0]
    assert run_cli("export", str(run), "--out", str(tmp_path / "f32")).returncode == 0
    assert dtypes(tmp_path / "f32") == {"F32"}
    result = run_cli("export", str(run), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert dtypes(tmp_path / "bf16") == {"BF16"}
    # both load and embed alike (bf16 weights: agreement to bf16 precision)
    embeds = {}
    for name in ("f32", "bf16"):
        model, processor, _, _ = load_trained(tmp_path / name)
        with torch.no_grad():
            embeds[name] = model(**sample_inputs(processor))
    for modality in ("text", "vision", "speech"):
        full, reduced = (getattr(embeds[n], f"{modality}_embeds") for n in ("f32", "bf16"))
        assert reduced.dtype == torch.bfloat16  # a model's outputs in its own dtype, as transformers models do
        cosine = torch.nn.functional.cosine_similarity(full, reduced.float(), dim=-1)
        assert cosine.min() > 0.98, (modality, cosine)


def test_fp16_on_cpu_exits_2_before_any_work(pretrain_corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, pretrain_corpus)
    result = run_cli("pretrain", str(recipe), "train.mixed_precision=fp16", env=QUIET)
    assert result.returncode == 2
    assert "train.mixed_precision=fp16 needs a GPU" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
