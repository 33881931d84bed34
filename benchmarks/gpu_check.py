"""The GPU check: one command that exercises, on one CUDA GPU, every path CPU tests cannot, and measures it.

    .venv/bin/python -m benchmarks.gpu_check                       # everything, about 8 minutes on one H100/H200
    .venv/bin/python -m benchmarks.gpu_check --only steps,trainers --out runs/gpu-check
    .venv/bin/python -m benchmarks.gpu_check --dry-run             # on any machine: the plan, and its inputs checked

Rows (pass/fail against a target; docs/PERFORMANCE.md, "The GPU check"):
  steps      bf16 MFU of the `base` step against the bf16 matmul peak measured here (>= 0.35); the same step with
             compiled towers (time ratio <= 0.85) and with activation checkpointing (<= 1.5)
  syncs      host synchronisations of one training step, by CUDA's sync debug mode (<= 1: the loss read)
  frontend   the batched filterbank on the GPU against per-utterance kaldi.fbank on one CPU thread (>= 5x), parity
  trainers   the real trainer on the `base` recipe and the demo corpus under DeepSpeed ZeRO-2, ZeRO-3, FSDP2 and HSDP
             (one process each, so a mesh of 1; bf16, FSDP2 gathering its layers in bf16): 2 steps, a checkpoint, a
             relaunch that resumes and trains 2 more; the ZeRO-2
             run's peak memory against `--dry-run`'s model-state estimate (within 20 %; batch 2, so activations
             are small)
  fp16       the trainer with train.mixed_precision=fp16 (loss scaling) for 6 steps: finite losses
Writes OUT/gpu_check.json and prints a table. Needs no network. Exit 0 whether or not targets are met (the table
says which), 2 on bad arguments or without a CUDA device (unless --dry-run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("steps", "syncs", "frontend", "trainers", "fp16")
# name: (Accelerate config or None for a plain launch, recipe overrides)
LAUNCHES: dict[str, tuple[Path | None, dict[str, str]]] = {
    "DeepSpeed ZeRO-2": (ROOT / "recipes/accelerate/deepspeed_zero2.yaml", {}),
    "DeepSpeed ZeRO-3": (ROOT / "recipes/accelerate/deepspeed_zero3.yaml", {}),
    "FSDP2": (None, {"parallel.strategy": "fsdp", "parallel.param_dtype": "bf16"}),
    "HSDP": (None, {"parallel.strategy": "hsdp", "parallel.shard_size": "1"}),
}
BASE_RECIPE = ROOT / "recipes/pretrain/base.yaml"
MEMORY_TOLERANCE = 0.2


def parse_only(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(names) - set(CHECKS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected comma-separated checks from {', '.join(CHECKS)}, got {text!r}")
    return names


def recipe_overrides(corpus: Path, output_dir: Path, steps: int, **extra: str) -> list[str]:
    """The base recipe on the demo corpus, small: `steps` steps of batch 2, a checkpoint every 2 steps."""
    overrides = {
        "output_dir": str(output_dir),
        "model.tokenizer": str(corpus / "tokenizer"),
        "data.train": f"[{{path: {corpus / 'train'}}}]",
        "data.eval": str(corpus / "eval"),
        "data.num_workers": "4",
        "train.max_steps": str(steps),
        "train.batch_size": "2",
        "train.warmup_steps": "1",
        "train.log_every": "1",
        "train.trackers": "[]",
        "checkpoint.every_steps": "2",
        "eval.every_steps": "0",
        **extra,
    }
    return [f"{key}={value}" for key, value in overrides.items()]


def launch_command(config: Path | None, overrides: list[str]) -> list[str]:
    start = [sys.executable, "-m", "zidong"]
    if config is not None:
        start = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "--num_processes",
            "1",
        ]
        start += ["-m", "zidong"]
    return [*start, "pretrain", str(BASE_RECIPE), *overrides]


def dry_run_state_gib(overrides: list[str], stage: int) -> float:
    """The model state per GPU that `zidong pretrain --dry-run --gpus 1` prints for a ZeRO stage."""
    from zidong.config import load_config
    from zidong.train.dry_run import dry_run_report
    from zidong.train.recipe import PretrainRecipe

    report = dry_run_report(load_config(PretrainRecipe, BASE_RECIPE, overrides), 1)
    match = re.search(rf"ZeRO-{stage}:\s+([\d.]+) GiB", report)
    if match is None:
        raise RuntimeError(f"no ZeRO-{stage} estimate in the dry-run report:\n{report}")
    return float(match.group(1))


def row(number: int, name: str, value: float, target: str, details: dict) -> dict:
    from benchmarks.common import Result

    return Result(number, name, value, target, details).to_dict() | {"details": details}


def run_launch(command: list[str], log: Path) -> tuple[int, str]:
    env = {**os.environ, "ZIDONG_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log.write_text(result.stdout + result.stderr)
    return result.returncode, result.stderr


def train_records(run: Path) -> list[dict]:
    """The run's `train` records (none when it wrote no metrics)."""
    metrics = run / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return [r for r in records if r["kind"] == "train"]


def trainer_paths(work: Path, corpus: Path) -> list[dict]:
    rows, number = [], 6
    for name, (config, extra) in LAUNCHES.items():
        run = work / re.sub(r"\W+", "-", name.lower())
        outcome: dict = {"config": str(config.relative_to(ROOT)) if config else None, "output_dir": str(run)}
        first, _ = run_launch(
            launch_command(config, recipe_overrides(corpus, run, 2, **extra)), work / f"{run.name}-1.log"
        )
        second, log = run_launch(
            launch_command(config, recipe_overrides(corpus, run, 4, **extra)), work / f"{run.name}-2.log"
        )
        outcome["sharding_line"] = _line(log, "sharding:")
        resumed = re.search(r"resumed from \S+ \(step (\d+)\)", log)
        records = train_records(run)
        losses = [r["loss"] for r in records]
        outcome |= {"exit_codes": [first, second], "resumed_at": resumed and int(resumed.group(1)), "losses": losses}
        passed = first == second == 0 and resumed is not None and len(losses) >= 4
        passed = passed and all(math.isfinite(loss) for loss in losses)
        rows.append(
            row(number, f"{name}: 2 steps, checkpoint, resume, 2 more (1 GPU, bf16)", float(passed), ">= 1", outcome)
        )
        number += 1
        if name == "DeepSpeed ZeRO-2" and passed:
            peak = max(r.get("peak_memory_gb", 0.0) for r in records)
            estimate = dry_run_state_gib(recipe_overrides(corpus, run, 4), 2)
            details = {"peak_memory_gib": peak, "dry_run_model_state_gib": estimate, "batch_size": 2}
            rows.append(
                row(
                    6 + len(LAUNCHES),
                    "peak memory / --dry-run model state, ZeRO-2 (1 GPU) - 1",
                    abs(peak / estimate - 1),
                    f"<= {MEMORY_TOLERANCE}",
                    details,
                )
            )
    return rows


def fp16_run(work: Path, corpus: Path) -> list[dict]:
    run = work / "fp16"
    overrides = recipe_overrides(corpus, run, 6, **{"train.mixed_precision": "fp16"})
    code, log = run_launch(launch_command(None, overrides), work / "fp16.log")
    records = train_records(run)
    losses = [r["loss"] for r in records]
    skipped = max((r.get("skipped_steps", 0) for r in records), default=0)
    passed = code == 0 and len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    details = {
        "exit_code": code,
        "losses": losses,
        "skipped_steps": skipped,
        "precision_line": _line(log, "precision:"),
    }
    return [row(7 + len(LAUNCHES), "fp16 with loss scaling: 6 finite steps (1 GPU)", float(passed), ">= 1", details)]


def _line(text: str, needle: str) -> str:
    return next((line for line in text.splitlines() if needle in line), "")


def plan(work: Path, corpus: Path, only: tuple[str, ...]) -> str:
    """What a run would do, with its inputs checked here (recipes, configs, the dry-run estimate)."""
    import benchmarks.gpu  # noqa: F401  (the in-process checks import)

    lines = [f"GPU check plan (work folder {work}, demo corpus {corpus}):"]
    for check in only:
        lines.append(f"- {check}")
        if check == "trainers":
            for name, (config, extra) in LAUNCHES.items():
                if config is not None and not config.is_file():
                    raise FileNotFoundError(config)
                run = work / re.sub(r"\W+", "-", name.lower())
                overrides = recipe_overrides(corpus, run, 2, **extra)
                lines.append(f"    {name}: " + " ".join(launch_command(config, overrides)))
                lines.append("      then the same with train.max_steps=4 (must resume at step 2)")
            estimate = dry_run_state_gib(recipe_overrides(corpus, work / "zero2", 4), 2)
            lines.append(f"    memory: ZeRO-2 peak against the dry-run model state of {estimate:.2f} GiB (within 20 %)")
        if check == "fp16":
            overrides = recipe_overrides(corpus, work / "fp16", 6, **{"train.mixed_precision": "fp16"})
            lines.append("    " + " ".join(launch_command(None, overrides)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=parse_only, default=CHECKS, help=f"comma-separated, from {','.join(CHECKS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="folder for the JSON, logs and runs")
    parser.add_argument("--data", type=Path, help="a demo corpus folder (built there if missing; default OUT/demo)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check its inputs; run nothing")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    corpus = args.data or args.out / "demo"
    sys.path.insert(0, str(ROOT))
    if args.dry_run:
        print(plan(args.out, corpus, args.only))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("python -m benchmarks.gpu_check: no CUDA device here; --dry-run shows the plan", file=sys.stderr)
        return 2
    from benchmarks import gpu
    from benchmarks.common import ensure_demo_corpus

    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    checks: dict[str, Callable[[], list[dict]]] = {
        "steps": lambda: [r.to_dict() | {"details": r.details} for r in gpu.base_step_variants(device)],
        "syncs": lambda: [r.to_dict() | {"details": r.details} for r in gpu.host_syncs(device)],
        "frontend": lambda: [
            r.to_dict() | {"details": r.details} for r in gpu.front_end(gpu.speech_batches_for_check(), device)
        ],
        "trainers": lambda: trainer_paths(args.out, ensure_demo_corpus(corpus, 2400)),
        "fp16": lambda: fp16_run(args.out, ensure_demo_corpus(corpus, 2400)),
    }
    report: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "rows": [], "errors": {}}
    for name in args.only:
        started = time.perf_counter()
        try:
            report["rows"] += checks[name]()
        except Exception:  # one failing check must not hide the others' figures
            report["errors"][name] = traceback.format_exc()
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"GPU check on {report['device']} (torch {report['torch']}):")
    for entry in sorted(report["rows"], key=lambda r: r["number"]):
        met = "yes" if entry["met"] else "NO"
        print(f"{entry['number']:<3}{entry['name']:<84}{entry['value']:>9.3f}  {entry['target']:<8}  {met}")
    for name, error in report["errors"].items():
        print(f"check {name} failed:\n{error.strip().splitlines()[-1]}")
    print(f"report: {args.out / 'gpu_check.json'}; logs and runs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
