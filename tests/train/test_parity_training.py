"""What training does on top of the launchers trains exactly like one process too: compiled and checkpointed
layers under FSDP2, gradient accumulation (with the contrastive loss's full-batch negatives), a linear probe and
LoRA fine-tunes (under DDP, and FSDP2 across a kill and resume).

The set-up is tests/train/parity_runs.py and conftest.py, the harness tests/train/parity.py; the launchers and
sharding strategies themselves are compared in tests/train/test_parity.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import kill_tree, resumed_step, run_cli
from tests.train import parity
from tests.train.parity_runs import (
    CLASSIFY,
    FSDP,
    GLOBAL_BATCH,
    PRETRAIN,
    STEPS,
    lora_recipe,
    pretrain_recipe,
    probe_recipe,
)


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
