"""Measurement 9: `train.compile` against eager, the real trainer on the tiny recipe with every objective.

Both runs train the same steps from the same seed on the demo corpus; the compiled one compiles each transformer
layer on its own (zidong.train.parallelize.compile_layers). The step-time ratio is taken over the steps after
warm-up; the compile time is what the compiled run's warm-up steps cost beyond the eager run's, which is when
dynamo traces and inductor builds the kernels (later recompilations, counted by dynamo, fall into the median).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Result, median
from benchmarks.training import TrainingBench
from zidong.train.metrics import METRICS_FILE
from zidong.train.trainer import pretrain


def trained_steps(bench: TrainingBench, output: Path, *overrides: str) -> list[dict[str, Any]]:
    """The per-step train records of a run of the tiny recipe (warm-up and timed steps, one checkpoint at the end)."""
    steps = bench.settings.warmup_steps + bench.settings.timed_steps
    recipe = bench.recipe(
        f"output_dir={output}", f"train.max_steps={steps}", f"checkpoint.every_steps={steps}", *overrides
    )
    pretrain(recipe)
    records = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
    return [record for record in records if record.get("kind") == "train"]


def compiled_against_eager(bench: TrainingBench) -> list[Result]:
    from torch._dynamo.utils import counters

    work = bench.settings.work
    warmup = bench.settings.warmup_steps
    eager = trained_steps(bench, work / "eager-run")
    torch._dynamo.reset()
    counters.clear()
    compiled = trained_steps(bench, work / "compiled-run", "train.compile=true")
    graphs = int(counters["stats"]["unique_graphs"])
    seconds = {name: [r["seconds_per_step"] for r in run] for name, run in (("eager", eager), ("compiled", compiled))}
    ratio = median(seconds["compiled"][warmup:]) / median(seconds["eager"][warmup:])
    compile_seconds = sum(seconds["compiled"][:warmup]) - sum(seconds["eager"][:warmup])
    details = {
        "eager_seconds_per_step": median(seconds["eager"][warmup:]),
        "compiled_seconds_per_step": median(seconds["compiled"][warmup:]),
        "first_step_seconds": {"eager": seconds["eager"][0], "compiled": seconds["compiled"][0]},
        "compiled_graphs": graphs,
        "steps": f"{warmup} warm-up + {len(eager) - warmup} timed",
        "recipe": "recipes/pretrain/tiny.yaml, every objective",
        "threads": torch.get_num_threads(),
    }
    return [
        Result(9, "step time, train.compile ÷ eager (tiny recipe, after warm-up)", ratio, "<= 1.00", details),
        Result(9, "compile time, seconds (compiled warm-up steps beyond eager's)", compile_seconds, "<= 60", {}),
    ]
