"""A training step reads the device once (its losses and gradient norm, for the skip decision), whatever the
batches hold and whichever objectives are weighted: presence and token counts come from the collated batch on the
host (tests/train/host_reads.py says what counts as a read). The same code made 90 reads per step before."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.state import AcceleratorState

from tests.helpers import free_port
from tests.pretrain_run import write_recipe
from tests.tiny_model import ALL_OBJECTIVES, in_lockstep, make_inputs, tiny_config
from tests.train.host_reads import HostReads
from zidong.config import load_config
from zidong.models.zidong.modeling_zidong import ZidongModel
from zidong.train import trainer
from zidong.train.recipe import PretrainRecipe
from zidong.train.run import setup
from zidong.train.task import PretrainTask

OBJECTIVES = ("contrastive", "matching", "masked_text", "masked_vision", "masked_speech")
STEPS = 4


def reads_per_step(folder: Path, pretrain_corpus: dict[str, Path], weights: dict[str, float]) -> list[HostReads]:
    loss = {name: {"weight": weights.get(name, 0.0)} for name in OBJECTIVES}
    recipe = write_recipe(folder, pretrain_corpus, loss=loss, data={"num_workers": 0, "ledger": False, "eval": None})
    run = setup(load_config(PretrainRecipe, recipe, ["train.trackers=[]"]), PretrainTask())
    try:
        steps = []
        for _ in range(STEPS):
            with HostReads() as reads:
                trainer.optimizer_step(run, stop_requested=False)
            steps.append(reads)
        return steps
    finally:
        run.loader.close()
        run.accelerator.end_training()
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize(
    "weights", [{"contrastive": 1.0}, dict.fromkeys(OBJECTIVES, 0.5)], ids=["contrastive", "every-objective"]
)
def test_a_training_step_reads_the_device_once(
    pretrain_corpus: dict[str, Path],
    tmp_path: Path,
    weights: dict[str, float],
) -> None:
    for reads in reads_per_step(tmp_path, pretrain_corpus, weights):  # batches mixed differently in every step
        assert reads.total == 1, dict(reads.sites)
        assert all(site.startswith("train/trainer.py:") for site in reads.sites)  # `read_once`


MIXES = {
    "text only": {"text": [1, 1, 1, 1], "vision": [0, 0, 0, 0], "speech": [0, 0, 0, 0]},
    "pairs": {"text": [1, 1, 0, 1], "vision": [1, 0, 1, 0], "speech": [0, 1, 1, 0]},
    "triplets": {"text": [1, 1, 1, 1], "vision": [1, 1, 1, 1], "speech": [1, 1, 1, 1]},
    "no text": {"text": [0, 0, 0, 0], "vision": [1, 1, 0, 1], "speech": [1, 0, 1, 1]},
}


@pytest.mark.parametrize("lockstep", [False, True], ids=["ddp", "lockstep"])
def test_the_model_reads_nothing_whatever_the_batch_holds(lockstep: bool) -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config()).train()
    for name, mix in MIXES.items():
        inputs = make_inputs({m: [bool(p) for p in rows] for m, rows in mix.items()})
        inputs = {k: v.numpy() if k.endswith("_present") else v for k, v in inputs.items()}  # as the trainer does
        with HostReads() as reads, in_lockstep(model, lockstep):
            output = model(**inputs, return_loss=True, loss_weights=ALL_OBJECTIVES)
            output.loss.backward()
        assert reads.total == 0, (name, dict(reads.sites))
        assert torch.isfinite(output.loss)


PROCESSES, GRAD_ACCUM, DISTRIBUTED_STEPS = 2, 3, 2


def distributed_step_worker(rank: int, port: int, recipe: str, out: str) -> None:
    """One process of a two-process DDP run (what torchrun would set up): count, per optimizer step, the reads
    of device values and the collectives zidong's code makes (DDP's own gradient all-reduce is not counted)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(PROCESSES),
        LOCAL_WORLD_SIZE=str(PROCESSES),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ACCELERATE_USE_CPU="1",
    )
    torch.set_num_threads(1)
    run = setup(load_config(PretrainRecipe, recipe, ["train.trackers=[]"]), PretrainTask())
    calls: Counter[str] = Counter()
    originals = {name: getattr(dist, name) for name in ("all_gather_into_tensor", "all_gather", "all_reduce")}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return call

    steps = []
    try:
        for name in originals:
            setattr(dist, name, counted(name))
        for _ in range(DISTRIBUTED_STEPS):
            calls.clear()
            with HostReads() as reads:
                trainer.optimizer_step(run, stop_requested=False)
            steps.append({"reads": dict(reads.sites), "collectives": dict(calls)})
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        run.loader.close()
        run.accelerator.end_training()
    Path(out, f"{rank}.json").write_text(json.dumps(steps))


def test_a_distributed_step_exchanges_presence_once(pretrain_corpus: dict[str, Path], tmp_path: Path) -> None:
    """Two processes, three micro-batches per step: the presence masks of the whole step travel in one collective
    and one read (they took two of each per micro-batch before), so a step reads the device three times in all:
    the presence exchange, `read_once` (losses and gradient norm) and `agree` (every process's skip and stop)."""
    recipe = write_recipe(
        tmp_path,
        pretrain_corpus,
        loss={"contrastive": {"weight": 1.0}},
        data={"num_workers": 0, "ledger": False, "eval": None},
        train={"grad_accum": GRAD_ACCUM},
    )
    mp.start_processes(
        distributed_step_worker,
        args=(free_port(), str(recipe), str(tmp_path)),
        nprocs=PROCESSES,
        start_method="spawn",
    )
    for rank in range(PROCESSES):
        steps = json.loads((tmp_path / f"{rank}.json").read_text())
        assert len(steps) == DISTRIBUTED_STEPS
        for step in steps:
            files = Counter(site.split(":")[0] for site in step["reads"] for _ in range(step["reads"][site]))
            assert files == {
                "train/collectives.py": 1,  # the presence exchange
                "train/trainer.py": 1,  # read_once
                "train/distributed.py": 1,  # agree
            }, step
            assert step["collectives"]["all_gather_into_tensor"] == 1, step  # the presence exchange, once per step
            # every modality's embeddings gathered once per micro-batch (their backward: one all_reduce on gloo)
            assert step["collectives"]["all_gather"] == 3 * GRAD_ACCUM, step
