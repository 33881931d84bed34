"""What every measurement shares: the result record, medians, CPU time, peak allocation, the demo corpus."""

from __future__ import annotations

import operator
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

COMPARISONS = {"<=": operator.le, ">=": operator.ge}


@dataclass
class Result:
    """One row of the table: `value` against `target` (`"<= 0.80"`, `">= 5"`), with what produced it."""

    number: int
    name: str
    value: float
    target: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        comparison, threshold = self.target.split()
        return COMPARISONS[comparison](self.value, float(threshold))

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "name": self.name, "value": self.value, "target": self.target, "met": self.met}


@dataclass(frozen=True)
class Settings:
    """How long each measurement runs: the full run, or `quick` (minutes in all; checks that everything runs)."""

    quick: bool
    work: Path  # scratch space: runs, corpus copies
    corpus: Path  # a demo corpus folder (train/, eval/, tokenizer/)
    recipe: Path  # the tiny pretraining recipe the training measurements start from (repository's recipes/)
    main_job_runs: tuple[Path, ...] = ()  # finished main-job run folders measurement 12 reads instead of training

    @property
    def warmup_steps(self) -> int:
        return 2 if self.quick else 5

    @property
    def timed_steps(self) -> int:
        return 3 if self.quick else 20


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timings(
    step: Callable[[], Any], warmup: int, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> list[float]:
    """Seconds by `clock` (wall time by default) of each of `repeats` calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        started = clock()
        step()
        times.append(clock() - started)
    return times


def cpu_seconds(work: Callable[[], Any], repeats: int) -> float:
    """Median CPU time (every thread of this process) of `repeats` calls, after one untimed call."""
    return median(timings(work, 1, repeats, clock=time.process_time))


def peak_allocated_bytes(work: Callable[[], Any]) -> int:
    """The most bytes `work` held allocated at once beyond what was allocated before it (CPU tensors included).

    torch keeps no allocator statistics for CPU memory, so this replays the profiler's allocation and free events
    in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as profiler:
        work()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    held = peak = 0
    for _, change in events:
        held += change
        peak = max(peak, held)
    return peak


def ensure_demo_corpus(folder: Path, samples: int) -> Path:
    """The demo corpus in `folder`, built there first if it is not (about 30 s for the default 2400 samples)."""
    from zidong.data.demo import ensure_demo

    ensure_demo(folder, samples=samples)
    return folder


def synthetic_batch(
    config, size: int, text_tokens: int, speech_seconds: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A batch of `size` full triplets of fixed lengths: random token ids, images and waveforms."""
    vision = config.vision_config
    vocab = config.text_config.vocab_size
    return {
        "input_ids": torch.randint(5, vocab, (size, text_tokens), generator=generator),
        "text_attention_mask": torch.ones(size, text_tokens, dtype=torch.long),
        "pixel_values": torch.randn(size, 3, vision.image_size, vision.image_size, generator=generator),
        "input_values": 0.1 * torch.randn(size, int(speech_seconds * config.sampling_rate), generator=generator),
        "speech_attention_mask": torch.ones(size, int(speech_seconds * config.sampling_rate), dtype=torch.long),
        **{f"{m}_present": torch.ones(size, dtype=torch.bool) for m in ("text", "vision", "speech")},
    }
