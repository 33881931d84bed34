"""`zidong report RUN_DIR`: PNG plots of a run's curves from `RUN_DIR/metrics.jsonl`.

Writes into `RUN_DIR/report/`:
- `loss.png`: the weighted loss and every objective against the step;
- `retrieval.png`: held-out R@1 (solid) and R@10 (dashed) of every direction against the step, with chance;
- `throughput.png`: samples/s, data-wait fraction and MFU against the step.
A plot whose numbers the run does not have (no `data.eval`: no retrieval) is left out and said so.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from zidong.errors import UserError
from zidong.objectives import OBJECTIVE_NAMES
from zidong.train.metrics import METRICS_FILE

LOSS_KEYS = ("loss", *OBJECTIVE_NAMES)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run; UserError when there are none or a line is broken."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}: give the output_dir of a `zidong pretrain` run")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not a JSON line ({err.msg}); was the file edited by hand?") from None
        if not isinstance(record, dict) or "kind" not in record or "step" not in record:
            raise UserError(f"{path}:{number}: a metrics record needs `kind` and `step`")
        records.append(record)
    train = [r for r in records if r["kind"] == "train"]
    evaluation = [r for r in records if r["kind"] == "eval"]
    if not train and not evaluation:
        raise UserError(f"{path} holds no records yet: the run has not logged a step (see train.log_every)")
    return train, evaluation


def write_report(run_dir: Path) -> list[Path]:
    """Write the plots; returns their paths."""
    train, evaluation = read_metrics(run_dir)
    folder = run_dir / "report"
    folder.mkdir(exist_ok=True)
    written = []
    if train:
        written.append(_plot(folder / "loss.png", "loss", train, [k for k in LOSS_KEYS if k in train[-1]], log=True))
        throughput = [k for k in ("samples_per_s", "data_wait_fraction", "mfu") if k in train[-1]]
        written.append(_plot(folder / "throughput.png", "throughput", train, throughput, panels=True))
    if evaluation:
        written.append(_retrieval_plot(folder / "retrieval.png", evaluation))
    return written


def _plot(path: Path, title: str, records: list[dict], keys: list[str], log: bool = False, panels: bool = False):
    figure, axes = plt.subplots(len(keys) if panels else 1, 1, figsize=(8, 3 * len(keys) if panels else 5))
    axes = list(axes) if panels else [axes] * len(keys)
    for axis, key in zip(axes, keys, strict=True):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        axis.plot([s for s, _ in points], [v for _, v in points], label=key, linewidth=2 if key == "loss" else 1)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if panels:
            axis.set_ylabel(key)
    if log:
        axes[0].set_yscale("log")
    if not panels:
        axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _retrieval_plot(path: Path, records: list[dict]) -> Path:
    directions = sorted({key.split("/")[0] for r in records for key in r if key.endswith("/R@1")})
    figure, axis = plt.subplots(figsize=(8, 5))
    steps = [r["step"] for r in records]
    for index, direction in enumerate(directions):
        color = f"C{index % 10}"
        for k, style in ((1, "-"), (10, "--")):
            values = [r.get(f"{direction}/R@{k}", float("nan")) for r in records]
            axis.plot(steps, values, style, color=color, label=f"{direction} R@{k}" if k == 1 else None)
    samples = records[-1].get("samples")
    if samples:
        axis.axhline(1 / samples, color="grey", linewidth=0.8, label=f"chance R@1 ({1 / samples:.3f})")
    axis.set_xlabel("step")
    axis.set_ylabel("recall (solid R@1, dashed R@10)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.suptitle("held-out retrieval")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
