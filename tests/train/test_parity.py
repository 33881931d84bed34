"""N processes train exactly like one: DDP, DeepSpeed ZeRO-2/3, FSDP2 and HSDP (resharded on resume), 4 processes,
a fine-tuning task, accumulation (with the contrastive loss's full-batch negatives too).

Every run goes through the real trainer (tests/train/parity.py says how the global batches are shared out and
which objectives take part). 2 x batch B must equal 1 x batch 2B step by step (losses, learning rates, gradient
norms) and in the final weights, to a relative 1e-5 in float32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.data.corpus import TEXT_COMBINATIONS, caption_of, make_corpus
from tests.helpers import REPO_ROOT, kill_tree, resumed_step, run_cli
from tests.train import parity
from zidong.data.tokenizer import train_tokenizer

STEPS = 10
GLOBAL_BATCH = 8
PRETRAIN = ["pretrain"]
CLASSIFY = ["finetune", "classify"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 samples of triplets and pairs (10 steps of 8 cross an epoch boundary), 9 held-out triplets (an odd
    count: the processes' evaluation blocks differ in size), a tokenizer, a label file."""
    root = tmp_path_factory.mktemp("parity-corpus")
    rng = np.random.default_rng(0)
    (root / "text.txt").write_text("\n".join(caption_of("s", n, rng) for n in range(3000)) + "\n")
    (root / "labels.yaml").write_text("field: labels.parity\nclasses: {even: [even], odd: [odd]}\n")
    return {
        "train": make_corpus(root / "train", 40, combinations=TEXT_COMBINATIONS),
        "eval": make_corpus(root / "eval", 9, seed=1, combinations=(("text", "vision", "speech"),)),
        "tokenizer": train_tokenizer([root / "text.txt"], 400, root / "tokenizer"),
        "labels": root / "labels.yaml",
    }


def pretrain_recipe(
    folder: Path, corpus: dict[str, Path], processes: int, evaluate: bool = False, parallel: dict | None = None, **train
) -> Path:
    recipe = {
        "output_dir": str(folder / "run"),
        "seed": 5,
        "model": {
            "preset": "tiny",
            "tokenizer": str(corpus["tokenizer"]),
            "config": {"logit_scale_max": parity.TEMPERATURE_CAP},  # reached at step 4: the clamp takes part
        },
        "data": {
            "train": [{"path": str(corpus["train"])}],
            "eval": str(corpus["eval"]) if evaluate else None,
            "num_workers": 0,
        },
        "train": {
            "max_steps": STEPS,
            "batch_size": GLOBAL_BATCH // processes,
            "learning_rate": 1e-3,
            "warmup_steps": 3,
            "log_every": 1,
            **train,
        },
        "checkpoint": {"every_steps": 4, "keep_last": 1},
        "loss": {"contrastive": {"weight": 1.0}, **{name: {"weight": 0.0} for name in parity.LEFT_OUT}},
        "parallel": parallel or {},
    }
    return parity.write_recipe(folder / "recipe.yaml", recipe)


def probe_recipe(folder: Path, corpus: dict[str, Path], source: Path, processes: int, **train) -> Path:
    """A linear probe of the text tower (frozen), classifying even/odd sample numbers. Every sample has text and
    a label: the classifier's loss is a mean over each micro-batch's labelled rows, which equals the global mean
    only when every micro-batch has as many of them (docs/training.md)."""
    recipe = {
        "output_dir": str(folder / "run"),
        "seed": 5,
        "finetune": {"source": str(source), "modalities": ["text"], "labels": str(corpus["labels"])},
        "model": {"text": {"frozen_steps": -1}},
        "data": {"train": [{"path": str(corpus["train"])}], "num_workers": 0},
        "train": {
            "max_steps": STEPS,
            "batch_size": GLOBAL_BATCH // processes,
            "learning_rate": 1e-2,
            "warmup_steps": 3,
            "log_every": 1,
            **train,
        },
        "checkpoint": {"every_steps": STEPS // 2, "keep_last": 2},
    }
    return parity.write_recipe(folder / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def one_process(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process taking the whole global batch."""
    folder = tmp_path_factory.mktemp("one-process")
    parity.launch("single", 1, PRETRAIN, pretrain_recipe(folder, corpus, 1))
    return folder / "run"


@pytest.mark.slow
def test_two_process_ddp_trains_like_one_process(corpus: dict[str, Path], one_process: Path, tmp_path: Path) -> None:
    parity.launch("torchrun", 2, PRETRAIN, pretrain_recipe(tmp_path, corpus, 2))
    parity.assert_same_training(one_process, tmp_path / "run", keys=("loss", "grad_norm", *parity.CONTRASTIVE_PAIRS))


@pytest.mark.slow
def test_four_process_ddp_trains_like_one_process(corpus: dict[str, Path], one_process: Path, tmp_path: Path) -> None:
    parity.launch("torchrun", 4, PRETRAIN, pretrain_recipe(tmp_path, corpus, 4))
    parity.assert_same_training(one_process, tmp_path / "run")


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


FSDP = {"strategy": "fsdp"}


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
def test_fsdp_with_compiled_checkpointed_layers_trains_like_one_eager_process(
    corpus: dict[str, Path], one_process: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_LOGS", "recompiles")  # torch's own account of every recompilation
    recipe = pretrain_recipe(tmp_path, corpus, 2, parallel=FSDP, compile=True, activation_checkpointing=True)
    result = parity.launch("torchrun", 2, PRETRAIN, recipe)
    assert "compiled: 6 transformer layers, each on its own" in result.stderr
    assert "Wav2Vec2BertEncoderLayer layers stay eager on cpu" in result.stderr
    # measured: 1 per process (a layer called once with a mask of None); the shared-wrapper cache gave 8 and a crash
    assert result.stderr.count("Recompiling function") <= 2 * 2
    parity.assert_same_training(one_process, tmp_path / "run", keys=("loss", "grad_norm", *parity.CONTRASTIVE_PAIRS))


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


@pytest.fixture(scope="module")
def one_process_probe(corpus: dict[str, Path], one_process: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("probe-one-process")
    parity.launch("single", 1, CLASSIFY, probe_recipe(folder, corpus, one_process, 1))
    return folder / "run"


@pytest.mark.slow
def test_a_linear_probe_trains_only_its_head_and_like_one_process(
    corpus: dict[str, Path], one_process: Path, one_process_probe: Path, tmp_path: Path
) -> None:
    result = parity.launch("torchrun", 2, CLASSIFY, probe_recipe(tmp_path, corpus, one_process, 2))
    assert "frozen for the whole run: text" in result.stderr
    parity.assert_same_training(one_process_probe, tmp_path / "run", keys=("loss", "classify", "grad_norm"))
    source = parity.final_weights(one_process)
    probe = load_file(tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    assert {name for name in probe if not name.startswith("zidong.")} == {"classifier.weight", "classifier.bias"}
    for name, tensor in source.items():  # the frozen text tower, and everything else of the joint model
        assert torch.equal(probe[f"zidong.{name}"], tensor), f"{name} moved during a linear probe"
    halfway = load_file(tmp_path / "run" / "checkpoints" / f"step-{STEPS // 2:08d}" / "model.safetensors")
    assert not torch.equal(probe["classifier.weight"], halfway["classifier.weight"])  # the head does train


def lora_recipe(folder: Path, corpus: dict[str, Path], source: Path, processes: int, **train) -> Path:
    """The probe's task with LoRA (rank 4) on the text tower instead of freezing it: the adapters and the head
    train, nothing else."""
    recipe = yaml.safe_load(probe_recipe(folder, corpus, source, processes, **train).read_text())
    del recipe["model"]
    recipe["finetune"]["lora"] = {"rank": 4, "alpha": 8}
    return parity.write_recipe(folder / "recipe.yaml", recipe)


@pytest.fixture(scope="module")
def one_process_lora(corpus: dict[str, Path], one_process: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lora-one-process")
    result = parity.launch("single", 1, CLASSIFY, lora_recipe(folder, corpus, one_process, 1))
    assert "LoRA (peft) on the text tower(s): text: query, value;" in result.stderr
    return folder / "run"


@pytest.mark.slow
def test_lora_trains_only_its_adapters_and_the_head(one_process: Path, one_process_lora: Path) -> None:
    source = parity.final_weights(one_process)
    tuned = load_file(one_process_lora / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    adapters = {name for name in tuned if ".lora_" in name}
    assert len(adapters) == 2 * 2 * 2  # A and B, of query and value, in the tiny text tower's 2 layers
    assert all(name.startswith("zidong.text_model.") for name in adapters)
    for name in adapters:
        if ".lora_B." in name:  # starts at zero (the adapter adds nothing at first): it trained if it left zero
            assert tuned[name].abs().max() > 0, f"{name} did not train"
    base = {name.replace(".base_layer.", "."): tensor for name, tensor in tuned.items() if name not in adapters}
    assert base.keys() - {"classifier.weight", "classifier.bias"} == {f"zidong.{name}" for name in source}
    for name, tensor in source.items():
        assert torch.equal(base[f"zidong.{name}"], tensor), f"{name} moved under LoRA"


def test_lora_on_layers_a_tower_lacks_exits_2(corpus: dict[str, Path], one_process: Path, tmp_path: Path) -> None:
    recipe = lora_recipe(tmp_path, corpus, one_process, 1)
    result = run_cli("finetune", "classify", str(recipe), "finetune.lora.target_modules.text=[query, nope]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "finetune.lora.target_modules: LoRA target modules nope are not linear layers of the text tower" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_lora_under_ddp_trains_like_one_process(
    corpus: dict[str, Path], one_process: Path, one_process_lora: Path, tmp_path: Path
) -> None:
    parity.launch("torchrun", 2, CLASSIFY, lora_recipe(tmp_path, corpus, one_process, 2))
    parity.assert_same_training(one_process_lora, tmp_path / "run", keys=("loss", "classify", "grad_norm"))


@pytest.mark.slow
def test_lora_under_fsdp_trains_like_one_process_across_a_kill_and_resume(
    corpus: dict[str, Path], one_process: Path, one_process_lora: Path, tmp_path: Path
) -> None:
    recipe = lora_recipe(tmp_path, corpus, one_process, 2)
    extra = ["parallel.strategy=fsdp"]
    job = parity.start("torchrun", 2, CLASSIFY, recipe, extra=extra)
    parity.wait_for(tmp_path / "run" / "checkpoints" / f"step-{STEPS // 2:08d}", job)
    kill_tree(job.pid)
    job.wait()
    resumed = parity.launch("torchrun", 2, CLASSIFY, recipe, extra=extra)
    assert resumed_step(resumed.stderr) < STEPS  # killed mid-run, not after the end
    assert "FSDP2 (fsdp)" in resumed.stderr
    parity.assert_same_training(one_process_lora, tmp_path / "run", keys=("loss", "classify", "grad_norm"))


@pytest.mark.slow
def test_accumulation_trains_like_more_processes(
    corpus: dict[str, Path], one_process: Path, one_process_probe: Path, tmp_path: Path
) -> None:
    # 1 process x batch 4 x grad_accum 2 = the same 8 samples per optimizer step as 2 x 4 (and 1 x 8)
    recipe = probe_recipe(tmp_path, corpus, one_process, 2, grad_accum=2)
    parity.launch("single", 1, CLASSIFY, recipe)
    parity.assert_same_training(one_process_probe, tmp_path / "run", keys=("loss", "classify", "grad_norm"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "processes", "parallel"),
    [("single", 1, None), ("torchrun", 2, None), ("torchrun", 2, FSDP)],
    ids=["1x4x2", "ddp-2x2x2", "fsdp-2x2x2-killed-and-resumed"],
)
def test_full_batch_negatives_under_accumulation_train_like_one_batch(
    corpus: dict[str, Path], one_process: Path, tmp_path: Path, launcher: str, processes: int, parallel: dict | None
) -> None:
    # micro-batches of 2, accumulated to the reference's 8 samples a step: the contrastive loss (every pair) scores
    # each micro-batch against all 8, as one process x batch 8 does (train.full_batch_negatives); the FSDP2 run
    # is killed after its step-4 checkpoint and resumed (the cache's dropout seeds come from the saved generator)
    accumulation = GLOBAL_BATCH // (2 * processes)
    train = {"batch_size": 2, "grad_accum": accumulation, "full_batch_negatives": True}
    recipe = pretrain_recipe(tmp_path, corpus, processes, parallel=parallel, **train)
    if parallel:
        job = parity.start(launcher, processes, PRETRAIN, recipe)
        parity.wait_for(tmp_path / "run" / "checkpoints" / "step-00000004", job)
        kill_tree(job.pid)
        job.wait()
        assert resumed_step(parity.launch(launcher, processes, PRETRAIN, recipe).stderr) < STEPS
    else:
        parity.launch(launcher, processes, PRETRAIN, recipe)
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
