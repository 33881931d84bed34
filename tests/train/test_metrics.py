"""Model-FLOP accounting (MFU), the metrics sinks and `zidong report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli
from tests.pretrain_run import recipe_with
from tests.tiny_model import make_inputs, tiny_config
from zidong.models.zidong import ZidongForClassification, ZidongModel
from zidong.train.finetune import ClassifyTask
from zidong.train.flops import CPU_MATMUL_SECONDS, StepFlops, cpu_matmul_size, measured_peak_flops
from zidong.train.optim import objective_weights


def test_step_flops_follow_the_six_n_t_rule_on_real_tokens() -> None:
    model = ZidongModel(tiny_config())
    flops = StepFlops(model)
    present = {"text": [True, True, False], "vision": [True, False, False], "speech": [False, True, True]}
    batch = make_inputs(present)  # text rows: 10 and 16 real tokens; speech (samples 1, 2): 9000 and 16000 samples
    text, vision, speech = (flops.towers[m][0] for m in ("text", "vision", "speech"))
    patches = (64 // model.config.vision_config.patch_size) ** 2 + 1
    tokens = {"text": 10 + 16, "vision": patches, "speech": 9000 // 320 + 16000 // 320}
    towers = 6 * (text * tokens["text"] + vision * tokens["vision"] + speech * tokens["speech"])
    assert flops.of_batch(batch, {"contrastive": 1.0}) == towers
    # matching reads the two multi-modal samples (0: text+vision, 1: text+speech) twice (positive + negative)
    multi_modal_tokens = (10 + patches) + (16 + 9000 // 320)
    with_matching = towers + 6 * flops.fusion * 2 * multi_modal_tokens
    assert flops.of_batch(batch, {"contrastive": 1.0, "matching": 1.0}) == with_matching
    # masked_text: one more text pass, and the fusion encoder over every sample's tokens
    masked = towers + 6 * text * tokens["text"] + 6 * flops.fusion * sum(tokens.values())
    assert flops.of_batch(batch, {"contrastive": 1.0, "masked_text": 1.0}) == masked
    for parameter in model.vision_model.parameters():
        parameter.requires_grad_(False)
    frozen = StepFlops(model).of_batch(batch, {"contrastive": 1.0})
    assert frozen == towers - 4 * vision * tokens["vision"]  # no backward through a frozen tower


def test_a_linear_probe_counts_one_forward_of_its_tower_only() -> None:
    # the recipe's loss section (every objective at weight 1 by default) does not apply to a classifier
    model = ZidongForClassification(tiny_config(classification_modality="speech", id2label={0: "a", 1: "b"}))
    for parameter in model.zidong.speech_model.parameters():
        parameter.requires_grad_(False)
    weights = objective_weights(recipe_with(), 1, ClassifyTask.objectives)
    assert weights == {}
    flops = StepFlops(model.zidong)
    batch = make_inputs({"text": [False, False], "vision": [False, False], "speech": [True, True]})
    steps = 9000 // 320 + 16000 // 320
    assert flops.of_batch(batch, weights) == 2 * flops.towers["speech"][0] * steps


def test_embedding_tables_are_not_counted() -> None:
    model = ZidongModel(tiny_config())
    embeddings = sum(m.weight.numel() for m in model.text_model.modules() if isinstance(m, torch.nn.Embedding))
    assert StepFlops(model).towers["text"][0] == sum(p.numel() for p in model.text_model.parameters()) - embeddings


def test_measured_peak_agrees_with_a_matmul_timed_and_counted_here() -> None:
    """The rate against one measured independently: torch's FlopCounterMode counts the matmul's FLOPs, the
    median of five wall-clock timings here divides them. Two timings on one machine agree within 3x (they
    measured within 10 %); a wrong FLOP count (n^3 instead of 2 n^3) or a rate per repeat would not."""
    import statistics
    import time

    from torch.utils.flop_counter import FlopCounterMode

    size = 256
    first, second = torch.randn(size, size), torch.randn(size, size)
    with FlopCounterMode(display=False) as counter:
        torch.mm(first, second)
    assert counter.get_total_flops() == 2 * size**3
    times = []
    for _ in range(6):
        started = time.perf_counter()
        torch.mm(first, second)
        times.append(time.perf_counter() - started)
    independent = counter.get_total_flops() / statistics.median(times[1:])
    peak = measured_peak_flops(torch.device("cpu"), torch.float32, size=size, repeats=5)
    assert independent / 3 < peak < independent * 3, (peak, independent)


def test_cpu_peak_matmuls_are_sized_to_take_about_half_a_second() -> None:
    assert cpu_matmul_size(1e15) == 2048  # a fast CPU: the largest
    assert cpu_matmul_size(1e6) == 256  # the smallest
    emulated_bf16 = 0.85e9  # FLOP/s measured on this project's CI-like CPU, which has no bf16 instructions
    side = cpu_matmul_size(emulated_bf16)
    assert side % 64 == 0
    assert 2 * side**3 / emulated_bf16 <= CPU_MATMUL_SECONDS < 2 * (side + 64) ** 3 / emulated_bf16
    # and the default measurement runs in either case (bf16 is emulated on many CPUs)
    assert 1e8 < measured_peak_flops(torch.device("cpu"), torch.bfloat16, repeats=1) < 1e14


def _write_metrics(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_report_writes_every_plot(tmp_path: Path) -> None:
    records = [
        {"kind": "train", "step": s, "loss": 5.0 / s, "contrastive": 4.0 / s, "samples_per_s": 40.0, "mfu": 0.2}
        for s in range(1, 11)
    ]
    records += [
        {"kind": "eval", "step": s, "samples": 100.0, "text->vision/R@1": s / 20, "text->vision/R@10": s / 10}
        for s in (5, 10)
    ]
    run = _write_metrics(tmp_path / "run", [json.dumps(r) for r in records])
    result = run_cli("report", str(run))
    assert result.returncode == 0, result.stderr
    names = sorted(Path(line).name for line in result.stdout.split())
    assert names == ["loss.png", "retrieval.png", "throughput.png"]
    for name in names:
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (None, "has no metrics.jsonl"),
        ([], "holds no records yet"),
        (['{"kind": "train", "step": 1, "loss": 1.0}', "{broken"], "metrics.jsonl:2: not a JSON line"),
        (['{"loss": 1.0}'], "metrics.jsonl:1: a metrics record needs `kind` and `step`"),
    ],
    ids=["missing", "empty", "broken line", "no kind"],
)
def test_report_on_a_bad_run_folder_exits_2(tmp_path: Path, lines: list[str] | None, message: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if lines is not None:
        _write_metrics(run, lines)
    result = run_cli("report", str(run))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run / "report").exists() or not any((run / "report").iterdir())
