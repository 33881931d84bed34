"""Runs the measurements in order, prints the table of ratios and writes the JSON report."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.accumulation import full_batch_negatives
from benchmarks.common import Result, Settings, ensure_demo_corpus
from benchmarks.compile import compiled_against_eager
from benchmarks.distributed import distributed
from benchmarks.frontend import frontend
from benchmarks.growth import growth
from benchmarks.learning import learning
from benchmarks.peer import peer
from benchmarks.sources import sources
from benchmarks.training import TrainingBench, base_mfu, loader_headroom, padding, step_time

MEASUREMENTS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
logger = logging.getLogger("benchmarks")


def run(settings: Settings, only: tuple[int, ...] = MEASUREMENTS) -> list[Result]:
    """The selected measurements (numbers 1-12 of docs/PERFORMANCE.md), cheapest shared work first."""
    bench = TrainingBench(settings)
    steps = {
        3: lambda: padding(bench),
        4: lambda: loader_headroom(bench),
        8: lambda: sources(bench),
        5: lambda: frontend(bench.loader_pass(bucketed=True).speech_batches),
        1: lambda: [step_time(bench)],
        2: lambda: [
            base_mfu(settings, torch.device(kind)) for kind in ("cpu", "cuda")[: 1 + torch.cuda.is_available()]
        ],
        9: lambda: compiled_against_eager(bench),
        6: lambda: full_batch_negatives(settings),
        10: lambda: growth(settings),
        11: lambda: peer(settings),
        12: lambda: learning(settings),
    }
    results: list[Result] = []
    for number, measure in steps.items():
        if number in only:
            logger.info("measurement %d ...", number)
            started = time.perf_counter()
            rows = measure()
            logger.info("measurement %d done in %.0f s", number, time.perf_counter() - started)
            results.extend(rows)
    if {6, 7} & set(only):
        logger.info("measurements 6 and 7 (2 processes) ...")
        results.extend(row for row in distributed(settings.work, settings.quick) if row.number in only)
    return sorted(results, key=lambda row: row.number)


def table(results: list[Result]) -> str:
    lines = [f"{'#':<3}{'measurement':<76}{'value':>9}  {'target':<8}  met"]
    for row in results:
        lines.append(f"{row.number:<3}{row.name:<76}{row.value:>9.3f}  {row.target:<8}  {'yes' if row.met else 'NO'}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        platform.processor(),
    ) if Path("/proc/cpuinfo").exists() else platform.processor()  # fmt: skip
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def report(results: list[Result], settings: Settings, seconds: float) -> dict[str, Any]:
    return {
        "machine": machine(),
        "quick": settings.quick,
        "seconds": seconds,
        "results": [{**row.to_dict(), "details": row.details} for row in results],
    }


def write_report(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, default=float) + "\n")


__all__ = ["MEASUREMENTS", "ensure_demo_corpus", "report", "run", "table", "write_report"]
