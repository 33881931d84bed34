"""N processes train exactly like one: DDP, DeepSpeed ZeRO-2/3, FSDP2 and HSDP (resharded on resume), 4 processes.

Every run goes through the real trainer (tests/train/parity.py says how the global batches are shared out and
which objectives take part). 2 x batch B must equal 1 x batch 2B step by step (losses, learning rates, gradient
norms) and in the final weights, to a relative 1e-5 in float32. The set-up is tests/train/parity_runs.py and
conftest.py; what training does on top (compile, accumulation, fine-tunes, LoRA) is in test_parity_training.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import REPO_ROOT, kill_tree, resumed_step
from tests.train import parity
from tests.train.parity_runs import FSDP, GLOBAL_BATCH, PRETRAIN, STEPS, pretrain_recipe


@pytest.mark.slow
def test_two_process_ddp_trains_like_one_process(corpus: dict[str, Path], one_process: Path, tmp_path: Path) -> None:
    parity.launch("torchrun", 2, PRETRAIN, pretrain_recipe(tmp_path, corpus, 2))
    parity.assert_same_training(one_process, tmp_path / "run", keys=("loss", "grad_norm", *parity.CONTRASTIVE_PAIRS))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_like_one_process_across_a_kill_and_resume(
    corpus: dict[str, Path], one_process: Path, tmp_path: Path, stage: str
) -> None:
    recipe = pretrain_recipe(tmp_path, corpus, 2, evaluate=True)  # evaluation in lockstep at the end
    job = parity.start(stage, 2, PRETRAIN, recipe)
    parity.wait_for(tmp_path / "run" / "checkpoints" / "step-00000004", job)
    kill_tree(job.pid)  # the launcher and both ranks at once
    job.wait()
    resumed = parity.launch(stage, 2, PRETRAIN, recipe)
    assert resumed_step(resumed.stderr) < STEPS  # killed mid-run, not after the end
    shards = {p.name for p in (tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}" / "pytorch_model").iterdir()}
    # ZeRO-3 partitions the weights too: one model-state file per rank
    assert ("zero_pp_rank_1_mp_rank_00_model_states.pt" in shards) == (stage == "zero3")
    parity.assert_same_training(one_process, tmp_path / "run")
    assert "held-out retrieval after 10 steps" in resumed.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples"]) for r in records if r["kind"] == "eval"] == [(STEPS, 9.0)]


@pytest.mark.slow
def test_fsdp_trains_like_one_process_across_a_kill_and_resume(
    corpus: dict[str, Path], one_process: Path, tmp_path: Path
) -> None:
    recipe = pretrain_recipe(tmp_path, corpus, 2, evaluate=True, parallel=FSDP)  # evaluation in lockstep at the end
    job = parity.start("torchrun", 2, PRETRAIN, recipe)
    parity.wait_for(tmp_path / "run" / "checkpoints" / "step-00000004", job)
    kill_tree(job.pid)
    job.wait()
    resumed = parity.launch("torchrun", 2, PRETRAIN, recipe)
    assert resumed_step(resumed.stderr) < STEPS  # killed mid-run, not after the end
    assert "FSDP2 (fsdp) on a cpu mesh of shard 2: 8 layer units" in resumed.stderr
    shards = tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}" / "sharded_model"
    assert {p.name for p in shards.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # each rank wrote its own
    parity.assert_same_training(one_process, tmp_path / "run", keys=("loss", "grad_norm", *parity.CONTRASTIVE_PAIRS))
    assert "held-out retrieval after 10 steps" in resumed.stderr


@pytest.mark.slow
def test_fsdp_on_four_processes_trains_and_exports_like_one_process(
    corpus: dict[str, Path], one_process: Path, tmp_path: Path
) -> None:
    result = parity.launch("torchrun", 4, PRETRAIN, pretrain_recipe(tmp_path, corpus, 4, parallel=FSDP))
    assert "strategy: FSDP2 (fsdp) over 4, 1 replica group(s)" in result.stderr
    parity.assert_same_training(one_process, tmp_path / "run", keys=("loss", "grad_norm", *parity.CONTRASTIVE_PAIRS))
    exported = {}
    for name, run in (("fsdp", tmp_path / "run"), ("single", one_process)):
        result = subprocess.run(
            [sys.executable, "-m", "zidong", "export", str(run), "--out", str(tmp_path / name), "--towers"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        exported[name] = {
            path.relative_to(tmp_path / name): load_file(path) for path in (tmp_path / name).rglob("*.safetensors")
        }
    assert exported["fsdp"].keys() == exported["single"].keys()
    for path, tensors in exported["single"].items():
        assert tensors.keys() == exported["fsdp"][path].keys()
        for key, tensor in tensors.items():
            error = float((exported["fsdp"][path][key] - tensor).norm())
            assert error <= parity.RELATIVE_TOLERANCE * float(tensor.norm()) + 1e-7 * tensor.numel() ** 0.5, key


@pytest.mark.slow
def test_two_nodes_of_two_processes_train_like_one_process(
    corpus: dict[str, Path], one_process: Path, tmp_path: Path
) -> None:
    """Two torchrun launches as two nodes (c10d rendezvous on localhost), HSDP with its default shard group: one
    node (LOCAL_WORLD_SIZE). The replicate dimension of the mesh crosses the nodes, the shard dimension stays
    within each. (It replaces a one-launch HSDP test of the same 2 x 2 mesh with parallel.shard_size=2.)"""
    recipe = pretrain_recipe(tmp_path, corpus, 4, parallel={"strategy": "hsdp"})
    outputs = parity.launch_nodes(2, 2, PRETRAIN, recipe)
    assert "on a cpu mesh of replicate 2 x shard 2" in "".join(outputs)
    parity.assert_same_training(one_process, tmp_path / "run", keys=("loss", "grad_norm", *parity.CONTRASTIVE_PAIRS))


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4)], ids=["2-then-1", "1-then-2", "2-then-4"])
def test_fsdp_resumes_on_another_process_count_like_one_process(
    corpus: dict[str, Path], one_process: Path, tmp_path: Path, before: int, after: int
) -> None:
    """Killed after the step-4 checkpoint on `before` processes, continued on `after`: model and optimizer shards
    are resharded as they load (and the data stream re-split)."""
    recipe = pretrain_recipe(tmp_path, corpus, before, parallel=FSDP)
    job = parity.start("single" if before == 1 else "torchrun", before, PRETRAIN, recipe)
    parity.wait_for(tmp_path / "run" / "checkpoints" / "step-00000004", job)
    kill_tree(job.pid)
    job.wait()
    overrides = [f"train.batch_size={GLOBAL_BATCH // after}"]
    resumed = parity.launch("single" if after == 1 else "torchrun", after, PRETRAIN, recipe, extra=overrides)
    assert 4 <= resumed_step(resumed.stderr) < STEPS
    parity.assert_same_training(one_process, tmp_path / "run", keys=("loss", "grad_norm", *parity.CONTRASTIVE_PAIRS))


def test_the_harness_catches_a_schedule_that_runs_twice_as_fast(one_process: Path, tmp_path: Path) -> None:
    """The comparison itself must fail on the bug it exists for (learning rates of a 2x schedule)."""
    import shutil

    shutil.copytree(one_process, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for record, later in zip(records, records[1:] + records[-1:], strict=True):
        record["learning_rate"] = later["learning_rate"]
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(AssertionError, match="learning rates differ"):
        parity.assert_same_training(one_process, tmp_path / "run")


def test_the_launch_environment_reaches_the_processes() -> None:
    code = "import tests.train.parity as p, zidong.train.run as t; print(t.train_loader.__name__)"
    env = {**os.environ, parity.ENVIRONMENT: "1", "PYTHONPATH": f"{parity.SITE}{os.pathsep}{REPO_ROOT}"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "rows_of_global_batches", result.stderr
