"""zidong's benchmarks: every measurement side by side in one run, a table of ratios, a JSON report.

    .venv/bin/python -m benchmarks                      # everything (about 45 minutes on 2 CPU cores)
    .venv/bin/python -m benchmarks --only 1,4 --out runs/bench/steps.json
    .venv/bin/python -m benchmarks --quick              # about 1.5 minutes: checks that everything runs

The measurements, their baselines and targets are described in docs/PERFORMANCE.md. Ratios are taken within
this run (medians after warm-up), so they compare like with like on whatever machine runs them; absolute
times are in each row's details. Exit code 0 whether or not targets are met (the table says which); 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from zidong.utils.log import PROGRESS_ENV, get_logger

logger = get_logger("benchmarks")
TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "tiny.yaml"


def parse_only(text: str) -> tuple[int, ...]:
    from benchmarks.runner import MEASUREMENTS

    try:
        numbers = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        numbers = ()
    if not numbers or not set(numbers) <= set(MEASUREMENTS):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated measurement numbers from {MEASUREMENTS[0]} to {MEASUREMENTS[-1]}, got {text!r}"
        )
    return numbers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, tiny sizes: checks that everything runs")
    parser.add_argument("--only", type=parse_only, help="comma-separated measurement numbers, e.g. 1,4 (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench.json"), help="the JSON report")
    parser.add_argument(
        "--data",
        type=Path,
        help="a demo corpus folder (built there if missing; default data/demo, or a small one in scratch with --quick)",
    )
    parser.add_argument(
        "--main-job",
        type=Path,
        nargs="+",
        default=(),
        metavar="RUN",
        help="finished main-job run folders (runs/tiny, ...) that measurement 12 scores instead of training two",
    )
    args = parser.parse_args(argv)
    if args.main_job:
        from benchmarks.learning import final_evaluation

        for run in args.main_job:
            try:
                final_evaluation(run)
            except ValueError as err:
                parser.error(f"--main-job {err}")
    if args.out.exists() and args.out.is_dir():
        parser.error(f"--out {args.out} is a folder; give a file path such as {args.out / 'bench.json'}")

    import os

    os.environ.setdefault(PROGRESS_ENV, "0")
    from benchmarks.common import Settings
    from benchmarks.runner import MEASUREMENTS, ensure_demo_corpus, report, run, table, write_report

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zidong-bench-") as scratch:
        work = Path(scratch)
        if args.data is not None:
            corpus = ensure_demo_corpus(args.data, samples=2400)
        elif args.quick:
            corpus = ensure_demo_corpus(work / "demo", samples=240)
        else:
            corpus = ensure_demo_corpus(Path("data/demo"), samples=2400)
        settings = Settings(
            quick=args.quick, work=work, corpus=corpus, recipe=TINY_RECIPE, main_job_runs=tuple(args.main_job)
        )
        results = run(settings, args.only or MEASUREMENTS)
    print(table(results))
    write_report(args.out, report(results, settings, time.perf_counter() - started))
    print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
