"""N processes against one process: the real trainer, fed the same global batches, must train the same.

A parity run launches the real `zidong pretrain` / `zidong finetune` (one process, torchrun with DDP or FSDP2 as the
recipe's `parallel` section says, or Accelerate + DeepSpeed) with `tests/train/parity_site` on PYTHONPATH. Its `sitecustomize` calls `install()` in every process:

- The set-up's `train_loader` (zidong/train/run.py) is replaced by one that reads the stream of a *single*
  process whose batch is the global batch (per-process batch x processes), and hands each process its own rows
  (`split_rows`). One process therefore sees exactly the samples, crops and audio windows that N processes see
  together.
- The loss gains `-logit_scale`, so that the temperature rises to its cap (`TEMPERATURE_CAP`, set by the
  pretraining recipes) within a few steps and the clamp after each optimizer step takes part in every comparison.
- The tiny preset loses the randomness each process draws from its own generator over its own rows: dropout in
  the text tower, LayerDrop in the speech tower, SpecAugment. One process drawing masks for 2B rows cannot draw
  what two processes draw for B rows each, so these are off in parity runs (the towers' own code draws them).

Objectives in the parity runs: `contrastive` (every pair, negatives gathered from every process) and a
classifier's cross-entropy. Left out, with the reason: `matching` mines its hard negatives among the rows of the
process's own batch, so N processes see other negatives than one by design; `masked_*` draw their masked
positions from the process's random generator and average over the process's own masked tokens.

Adding a case: call `launch(...)` with another launcher or recipe change and compare with `assert_same_training`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.helpers import REPO_ROOT, accelerate_launch, free_port, torchrun
from zidong.models.zidong.objectives_zidong import REGISTRY

SITE = Path(__file__).resolve().parent / "parity_site"
ENVIRONMENT = "ZIDONG_PARITY"
RELATIVE_TOLERANCE = 1e-5
# objectives off in parity runs (above): those that draw random numbers per process's batch
LEFT_OUT = tuple(name for objective in REGISTRY if objective.draws_per_process for name in objective.weights)
TEMPERATURE_CAP = 2.6612  # `model.config.logit_scale_max` of the pretraining parity runs: the preset's start + 0.002
CONTRASTIVE_PAIRS = ("contrastive_text_vision", "contrastive_text_speech", "contrastive_vision_speech")
# (prefix, extra arguments) of each launcher for N processes; under torchrun the recipe's `parallel` section picks
# DDP or FSDP2
LAUNCHERS = {
    "single": lambda n: [],
    "torchrun": lambda n: torchrun(n)[1:],
    "zero2": lambda n: _accelerate("deepspeed_zero2", n),
    "zero3": lambda n: _accelerate("deepspeed_zero3", n),
}


def _accelerate(config: str, processes: int) -> list[str]:
    return accelerate_launch(REPO_ROOT / f"recipes/accelerate/{config}.yaml", processes)[1:]


def install() -> None:
    """Patch the trainer of this process for a parity run (called by parity_site/sitecustomize.py)."""
    from zidong.models.zidong.configuration_zidong import PRESETS
    from zidong.train import run

    tiny = PRESETS["tiny"]
    tiny["text_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tiny["speech_config"].update(layerdrop=0.0, conformer_conv_dropout=0.0)
    tiny.update(spec_augment_freq_mask=0, spec_augment_time_mask=0)
    run.train_loader = _global_batch_loader(run.train_loader)
    _push_the_temperature_up()


def _push_the_temperature_up() -> None:
    """Add `-logit_scale` to the loss: left alone, the temperature falls on these tiny runs and its cap (reached
    only late in a real run) would never act. Pushed up, it reaches `TEMPERATURE_CAP` within a few steps, and
    every sharding must then clamp it after each step exactly as one process does (the fp32 master copy under
    DeepSpeed, each process's shard under FSDP2)."""
    from zidong.models.zidong.modeling_zidong import ZidongModel

    forward = ZidongModel.forward

    def pushed(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if output.loss is not None:
            output.loss = output.loss - self.logit_scale.sum()
        return output

    ZidongModel.forward = pushed


def _global_batch_loader(train_loader):
    def rows_of_global_batches(recipe, processor, rank=0, world_size=1, saved=None, **options):
        settings = recipe.train
        shares = world_size * settings.grad_accum  # micro-batches per optimizer step, over all processes
        train = dataclasses.replace(settings, batch_size=settings.batch_size * shares)
        loader = train_loader(dataclasses.replace(recipe, train=train), processor, 0, 1, saved, **options)
        return _RowsOf(
            loader, settings.batch_size, [rank * settings.grad_accum + i for i in range(settings.grad_accum)]
        )

    return rows_of_global_batches


class _RowsOf:
    """This process's micro-batches of every global batch (the loader interface the trainer uses): micro-batch
    i of process r is share r x grad_accum + i, so 1 process x 2 micro-batches reads what 2 processes read."""

    def __init__(self, loader, batch_size: int, shares: list[int]) -> None:
        self.loader, self.batch_size, self.shares = loader, batch_size, shares
        self.batch: dict[str, torch.Tensor] = {}
        self.refs: list = []
        self.last_refs: list = []
        self.served = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        from zidong.data.transforms import split_rows

        if self.served % len(self.shares) == 0:
            self.batch, self.refs = next(self.loader), self.loader.last_refs
        start = self.shares[self.served % len(self.shares)] * self.batch_size
        self.served += 1
        self.last_refs = self.refs[start : start + self.batch_size]
        return split_rows(self.batch, start, start + self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def close(self) -> None:
        self.loader.close()


def _command(
    launcher: str, processes: int, command: list[str], recipe: Path, extra: list[str] | None = None
) -> tuple[list[str], dict[str, str]]:
    env = {
        **os.environ,
        ENVIRONMENT: "1",
        "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "ZIDONG_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
    }
    if launcher == "torchrun":
        env["ACCELERATE_USE_CPU"] = "1"
    arguments = [sys.executable, *LAUNCHERS[launcher](processes), "-m", "zidong", *command, str(recipe), *(extra or [])]
    return arguments, env


def launch(
    launcher: str,
    processes: int,
    command: list[str],
    recipe: Path,
    extra: list[str] | None = None,
    timeout: float = 1200,
) -> subprocess.CompletedProcess:
    """Run `python [launcher] -m zidong COMMAND RECIPE [EXTRA overrides]` as a parity run; fails the test on a
    non-zero exit."""
    arguments, env = _command(launcher, processes, command, recipe, extra)
    result = subprocess.run(arguments, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{launcher} x {processes} failed:\n{result.stderr[-4000:]}"
    return result


def launch_nodes(nodes: int, per_node: int, command: list[str], recipe: Path, timeout: float = 1200) -> list[str]:
    """A parity run on `nodes` "nodes" of this machine: one torchrun per node, `per_node` processes each, meeting
    through a c10d rendezvous on localhost as the SLURM script's nodes do; returns each node's output (node 0
    first). Fails the test when a node exits non-zero."""
    rendezvous = [
        "--nnodes", str(nodes), "--nproc_per_node", str(per_node), "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "parity",
    ]  # fmt: skip
    arguments, env = _command("single", nodes * per_node, command, recipe)
    env["ACCELERATE_USE_CPU"] = "1"
    logs = [recipe.parent / f"node{node}.log" for node in range(nodes)]
    jobs = []
    for node, log in enumerate(logs):
        torchrun = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--node_rank", str(node)]
        with log.open("w") as stream:
            jobs.append(
                subprocess.Popen(
                    [*torchrun, *arguments[1:]], cwd=REPO_ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT
                )
            )
    try:
        codes = [job.wait(timeout=timeout) for job in jobs]
    finally:
        for job in jobs:
            job.kill()
    outputs = [log.read_text() for log in logs]
    for node, (code, output) in enumerate(zip(codes, outputs, strict=True)):
        assert code == 0, f"node {node} of {nodes} failed:\n{output[-4000:]}"
    return outputs


def start(
    launcher: str, processes: int, command: list[str], recipe: Path, extra: list[str] | None = None
) -> subprocess.Popen:
    """`launch` in the background, in a session of its own (so a test can kill the launcher and every rank);
    its output goes to `launch.log` beside the recipe (a pipe nobody reads could fill and stall it)."""
    arguments, env = _command(launcher, processes, command, recipe, extra)
    with (recipe.parent / "launch.log").open("w") as log:
        return subprocess.Popen(
            arguments, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until `path` exists while `process` (from `start`) runs."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        log = Path(process.args[-1]).parent / "launch.log"
        assert process.poll() is None, f"the run ended before {path} appeared:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_records(run: Path) -> dict[int, dict[str, Any]]:
    """The training record of each step of `metrics.jsonl` (a step logged again after a resume: the last one)."""
    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            records[record["step"]] = record
    return records


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of the run's latest checkpoint, whatever layout its launcher wrote."""
    from zidong.export.trained import load_trained

    model, *_ = load_trained(run)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_training(expected: Path, got: Path, keys: tuple[str, ...] = ("loss", "grad_norm")) -> None:
    """Same steps and learning rates (exactly), the same `keys` (relative 1e-5) at every step, and the same final
    weights: per tensor, |got - expected| <= 1e-5 |expected| + 1e-7 sqrt(size) in the L2 norm.

    Weights are compared normwise, with an allowance of 1e-7 per element (root mean square), because AdamW
    divides by sqrt(v) + 1e-6: where a gradient is far below 1e-6, a rounding difference in it (N processes sum in
    another order) moves that element by up to lr x (difference / 1e-6). Attention key biases show it best:
    their gradient is zero in exact arithmetic (softmax ignores a shift common to all keys), so what they hold is
    rounding noise on both sides. Measured (10 steps, lr 1e-3): the worst other tensor differs by 1.6e-5 of its
    norm, 3e-8 per element."""
    reference, records = train_records(expected), train_records(got)
    assert sorted(records) == sorted(reference), "the runs logged different steps"
    for step, record in reference.items():
        rates = {k: v for k, v in record.items() if k.startswith("learning_rate")}
        assert {k: records[step][k] for k in rates} == rates, f"step {step}: learning rates differ"
        for key in keys:
            assert (key in records[step]) == (key in record), f"step {step}: only one run logged {key}"
            if key in record:
                assert records[step][key] == _approx(record[key]), f"step {step}: {key} differs"
    reference_weights, weights = final_weights(expected), final_weights(got)
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        error = float((weights[name] - tensor).norm())
        allowed = RELATIVE_TOLERANCE * float(tensor.norm()) + 1e-7 * tensor.numel() ** 0.5
        assert error <= allowed, f"{name}: normwise error {error:.3g} (allowed {allowed:.3g})"


def _approx(value: float):
    return pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=1e-7)
