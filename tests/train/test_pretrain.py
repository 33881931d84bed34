"""`zidong pretrain`: exact resume after kill -9 (with a sample ledger), SIGTERM checkpoints, NaN guard, DDP."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    REPO_ROOT,
    accelerate_launch,
    free_port,
    kill_tree,
    resumed_step,
    run_cli,
    serve_folder,
    torchrun,
)
from tests.pretrain_run import STEPS, TORCHRUN_ENV, final_weights, wait_for, write_recipe


def launch(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zidong", "pretrain", str(recipe)],
        cwd=REPO_ROOT,
        env={**os.environ, "ZIDONG_PROGRESS": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def ledger_by_step(run: Path) -> dict[int, list]:
    """The samples of each step; a step run again after a resume counts with its last record."""
    steps: dict[int, list] = {}
    for line in (run / "ledger-rank0.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["samples"]
    return steps


@pytest.fixture(scope="module")
def uninterrupted(pretrain_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("straight")
    result = run_cli("pretrain", str(write_recipe(folder, pretrain_corpus)), env={"ZIDONG_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr
    assert "held-out retrieval after 6 steps" in result.stderr
    return folder / "run"


def test_kill_9_then_relaunch_gives_the_uninterrupted_weights(
    pretrain_corpus: dict[str, Path], uninterrupted: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, pretrain_corpus)
    run = tmp_path / "run"
    process = launch(recipe)
    wait_for(run / "checkpoints" / "step-00000002", process)
    process.kill()  # SIGKILL: no chance to save anything
    process.wait()
    relaunched = launch(recipe)
    output, _ = relaunched.communicate(timeout=900)
    assert relaunched.returncode == 0, output
    assert "resumed from" in output
    expected, got = final_weights(uninterrupted), final_weights(run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after kill -9 and resume"
    # one epoch of 48 samples = 6 steps of 8: every sample exactly once, in the same batches as straight through
    ledger = ledger_by_step(run)
    assert sorted(ledger) == list(range(1, STEPS + 1))
    seen = [tuple(ref) for step in ledger.values() for ref in step]
    assert len(seen) == len(set(seen)) == 48
    assert ledger == ledger_by_step(uninterrupted)


def test_sigterm_saves_a_checkpoint_and_exits_0(pretrain_corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, pretrain_corpus, train={"max_steps": 200}, checkpoint={"every_steps": 100})
    run = tmp_path / "run"
    process = launch(recipe)
    wait_for(run / "ledger-rank0.jsonl", process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopped by SIGTERM" in output
    saved = sorted((run / "checkpoints").iterdir())
    assert len(saved) == 1
    step = json.loads((saved[0] / "trainer.json").read_text())["step"]
    assert 1 <= step < 100
    assert saved[0].name == f"step-{step:08d}"


def test_resume_never_refuses_a_run_with_checkpoints(pretrain_corpus: dict[str, Path], uninterrupted: Path) -> None:
    recipe = uninterrupted.parent / "recipe.yaml"
    result = run_cli("pretrain", str(recipe), "resume=never")
    assert result.returncode == 2
    assert "already holds checkpoints and resume=never" in result.stderr
    result = run_cli("pretrain", str(recipe), f"resume={uninterrupted}")
    assert result.returncode == 2
    assert "not a checkpoint folder" in result.stderr


def test_training_data_at_an_unreachable_url_exits_2_before_any_checkpoint(
    pretrain_corpus: dict[str, Path], tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}/train"
    recipe = write_recipe(tmp_path, pretrain_corpus, data={"train": [{"path": url}]})
    result = run_cli("pretrain", str(recipe), env={"ZIDONG_PROGRESS": "0"})
    assert result.returncode == 2, result.stderr
    assert f"cannot read {url}/index.json: not found, not permitted, or the server cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_tokenizer_folder_exits_2(pretrain_corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, pretrain_corpus)
    result = run_cli("pretrain", str(recipe), f"model.tokenizer={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert f"model.tokenizer={tmp_path / 'nowhere'}: no such folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_demo_folder_of_another_version_exits_2_and_is_left_alone(
    pretrain_corpus: dict[str, Path], tmp_path: Path
) -> None:
    older = tmp_path / "older"
    older.mkdir()
    stamp = older / "demo.json"
    stamp.write_text('{"seed": 0, "samples": 2400}\n')  # a corpus from before the labels' version 2
    result = run_cli("pretrain", str(write_recipe(tmp_path, pretrain_corpus)), f"data.demo={older}")
    assert result.returncode == 2
    assert f"{older} holds a demo corpus made with" in result.stderr
    assert "delete that one to build it anew" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in older.iterdir()] == ["demo.json"]
    assert stamp.read_text() == '{"seed": 0, "samples": 2400}\n'
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_frozen_towers_stay_put_and_a_timed_freeze_ends(pretrain_corpus: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        pretrain_corpus,
        model={"vision": {"frozen_steps": -1}, "speech": {"frozen_steps": 2}},
        train={"max_steps": 4, "warmup_steps": 0},
        checkpoint={"every_steps": 1, "keep_last": 4},
        data={"num_workers": 0, "eval": None},
        loss={"matching": {"weight": 0.5, "warmup_steps": 3}},
    )
    result = run_cli("pretrain", str(recipe), env={"ZIDONG_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr
    assert "frozen for the whole run: vision" in result.stderr
    weights = [load_file(tmp_path / "run" / "checkpoints" / f"step-{s:08d}" / "model.safetensors") for s in (1, 2, 4)]

    def same(prefix: str, first: int, second: int) -> bool:
        names = [name for name in weights[0] if name.startswith(prefix)]
        return all(torch.equal(weights[first][n], weights[second][n]) for n in names)

    assert same("vision_model.", 0, 2)  # frozen for good
    assert same("speech_model.", 0, 1)  # frozen for steps 1-2 ...
    assert not same("speech_model.", 1, 2)  # ... and trained after
    assert not same("text_model.", 0, 1)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("learning_rate_speech") for r in records] == [0.0, 0.0, None, None]
    assert all(r["mfu"] > 0 and r["model_tflops_per_s"] > 0 for r in records)
    assert list((tmp_path / "run" / "tensorboard" / "run").glob("events.out.tfevents.*"))  # the default tracker
    for r in records:  # matching ramps over 3 steps; masked_vision/speech keep their default weight 1
        ramp = 0.5 * min(1.0, r["step"] / 3)
        expected = r["contrastive"] + ramp * r["matching"] + 0.5 * r["masked_text"] + r["masked_vision"]
        assert r["loss"] == pytest.approx(expected + r["masked_speech"], abs=1e-3)


def test_heads_of_objectives_that_are_off_stay_put_and_cannot_be_switched_on_by_a_resume(
    pretrain_corpus: dict[str, Path], tmp_path: Path
) -> None:
    off = {name: {"weight": 0.0} for name in ("matching", "masked_text", "masked_vision", "masked_speech")}
    recipe = write_recipe(
        tmp_path,
        pretrain_corpus,
        train={"max_steps": 2, "warmup_steps": 0, "weight_decay": 0.5},
        checkpoint={"every_steps": 1, "keep_last": 4},
        data={"num_workers": 0, "eval": None},
        loss=off,
    )
    result = run_cli("pretrain", str(recipe), env={"ZIDONG_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr
    heads = ["fusion", "matching_head", "speech_head", "text_head", "vision_head"]
    assert f"not trained (their objectives are off): {', '.join(heads)}" in result.stderr
    step = [tmp_path / "run" / "checkpoints" / f"step-{s:08d}" for s in (1, 2)]
    first, second = (load_file(folder / "model.safetensors") for folder in step)
    for name in first:  # weight decay moved every head that was stepped, gradient or not
        if name.split(".")[0] in heads:
            assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["text_projection.weight"], second["text_projection.weight"])
    assert json.loads((step[1] / "trainer.json").read_text())["idle_heads"] == heads
    # the same recipe resumes; switching matching on would need optimizer state the checkpoint never made
    result = run_cli("pretrain", str(recipe), "train.max_steps=3", env={"ZIDONG_PROGRESS": "0"})
    assert result.returncode == 0, result.stderr
    saved = (step[1] / "model.safetensors").read_bytes()
    refused = run_cli(
        "pretrain", str(recipe), "train.max_steps=4", "loss.matching.weight=0.5", env={"ZIDONG_PROGRESS": "0"}
    )
    assert refused.returncode == 2, refused.stderr
    assert "was trained with fusion, matching_head frozen" in refused.stderr
    assert "finetune.source=" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "run" / "checkpoints" / "step-00000004").exists()
    assert (step[1] / "model.safetensors").read_bytes() == saved


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_that_is_not_installed_exits_2(pretrain_corpus: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli("pretrain", str(write_recipe(tmp_path, pretrain_corpus)), "train.trackers=[tensorboard, wandb]")
    assert result.returncode == 2
    assert "train.trackers lists wandb, but the wandb package is not installed" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


ACCELERATE_FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP, fsdp_state_dict_type: SHARDED_STATE_DICT}
machine_rank: 0
num_machines: 1
num_processes: 2
mixed_precision: "no"
use_cpu: false
"""


def test_an_accelerate_fsdp_config_exits_2_naming_the_recipe_key(
    pretrain_corpus: dict[str, Path], tmp_path: Path
) -> None:
    # Accelerate would set up FSDP only on GPUs, and on CPU silently prepare DDP instead: zidong refuses the
    # launcher's FSDP wherever it runs, and says how to ask for FSDP2
    config = tmp_path / "fsdp.yaml"
    config.write_text(ACCELERATE_FSDP_CONFIG)
    command = [*accelerate_launch(config, 2), "-m", "zidong", "pretrain", str(write_recipe(tmp_path, pretrain_corpus))]
    env = {**os.environ, "ZIDONG_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode != 0
    assert "exitcode  : 2" in result.stderr  # each rank's own exit code, as torchrun reports it
    assert "zidong shards with FSDP2 itself" in result.stderr
    assert "set parallel.strategy=fsdp in the recipe" in result.stderr
    assert "Traceback" not in result.stderr.split("zidong: error:")[0][-2000:]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_resumes_only_under_the_strategy_that_wrote_it(
    pretrain_corpus: dict[str, Path], tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, pretrain_corpus, train={"max_steps": 2}, data={"num_workers": 0, "eval": None})
    env = {"ZIDONG_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    first = run_cli("pretrain", str(recipe), "parallel.strategy=fsdp", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "FSDP2 (fsdp) on a cpu mesh of shard 1" in first.stderr  # one process: a mesh of 1, the same code
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    before = {path: path.read_bytes() for path in checkpoint.rglob("*") if path.is_file()}
    again = run_cli("pretrain", str(recipe), "train.max_steps=4", env=env)
    assert again.returncode == 2
    assert f"{checkpoint} was written with FSDP2 and this run does not shard the model" in again.stderr
    assert "Traceback" not in again.stderr
    assert {path: path.read_bytes() for path in checkpoint.rglob("*") if path.is_file()} == before


def test_non_finite_steps_are_skipped_then_stop_the_run(pretrain_corpus: dict[str, Path], tmp_path: Path) -> None:
    # the model's loss becomes NaN from step 3 on (a sitecustomize patch in the launched process)
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import zidong.models.zidong.modeling_zidong as m\n"
        "original = m.ZidongModel.forward\n"
        "calls = [0]\n"
        "def forward(self, *args, **kwargs):\n"
        "    output = original(self, *args, **kwargs)\n"
        "    calls[0] += 1\n"
        "    if output.loss is not None and calls[0] > 2:\n"
        "        output.loss = output.loss * float('nan')\n"
        "    return output\n"
        "m.ZidongModel.forward = forward\n"
    )
    recipe = write_recipe(
        tmp_path, pretrain_corpus, train={"max_steps": 20, "max_bad_steps": 3}, checkpoint={"every_steps": 1}
    )
    result = run_cli("pretrain", str(recipe), "data.num_workers=0", env={"PYTHONPATH": f"{patch}:{REPO_ROOT}"})
    assert result.returncode == 2, result.stderr
    assert "3 steps in a row had a non-finite loss or gradient (step 5)" in result.stderr
    saved = [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())]
    assert saved == ["step-00000001", "step-00000002"]  # nothing from the non-finite steps
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_steps"] for m in metrics if m["kind"] == "train"] == [0, 0, 1, 2]


class CachePeak:
    """The largest number of bytes a shard cache folder held (finished shards and downloads in progress), sampled
    every few milliseconds while the `with` block runs."""

    def __init__(self, folder: Path):
        self.folder, self.bytes, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> CachePeak:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            held = 0
            for path in self.folder.glob("*") if self.folder.is_dir() else []:
                with contextlib.suppress(FileNotFoundError):
                    held += path.stat().st_size if path.suffix in (".tar", ".part") else 0
            self.bytes = max(self.bytes, held)


def ddp_pretrain(recipe: Path, processes: int = 2) -> list[str]:
    return [*torchrun(processes), "-m", "zidong", "pretrain", str(recipe)]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_another_process_count_continues_the_epoch_exactly(
    pretrain_corpus: dict[str, Path], tmp_path: Path, before: int, after: int
) -> None:
    # 48 samples, 8 per process and step: the two runs read 16 x before + 16 x after = 48 samples, one epoch.
    # No length bucketing: it mixes an epoch's last samples into one pool with the next epoch's first.
    changes = {"train": {"max_steps": 2}, "data": {"num_workers": 1, "eval": None, "bucket_pool": 0}}
    recipe = write_recipe(tmp_path, pretrain_corpus, **changes)
    for processes, steps in ((before, 2), (after, 4)):
        result = subprocess.run(
            [*ddp_pretrain(recipe, processes), f"train.max_steps={steps}", f"data.num_workers={processes}"],
            cwd=REPO_ROOT, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    # Two ranks share one stderr pipe, so a line can carry the tail of another rank's: match the message itself.
    decisions = re.findall(r"the checkpoint's data stream was read by .*?re-split exactly", result.stderr)
    assert len(decisions) == after  # every rank says it ...
    assert len(set(decisions)) == 1  # ... and they took the same decision
    assert f"read by {before} process(es) x {before} worker(s), this run has {after} x {after}" in decisions[0]
    seen = [
        tuple(ref)
        for rank in range(max(before, after))
        for line in (tmp_path / "run" / f"ledger-rank{rank}.jsonl").read_text().splitlines()
        for ref in json.loads(line)["samples"]
    ]
    assert len(seen) == len(set(seen)) == 48  # nothing seen twice, nothing lost


def test_two_process_ddp_kill_9_then_relaunch_over_http_matches_the_local_straight_run(
    pretrain_corpus: dict[str, Path], tmp_path: Path
) -> None:
    # 2 ranks x 8 samples: one epoch of 48 samples is 3 steps; 6 steps cross an epoch boundary.
    # The straight run reads the local folder; the killed one reads the same shards over loopback HTTP, through a
    # cache too small for all three shards at once (so shards are evicted and fetched again mid-run).
    changes = {"train": {"max_steps": 6}, "data": {"num_workers": 1, "eval": None}}
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
    straight = write_recipe(tmp_path / "straight", pretrain_corpus, **changes)
    result = subprocess.run(
        ddp_pretrain(straight), cwd=REPO_ROOT, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sizes = sorted(
        entry["bytes"] for entry in json.loads((pretrain_corpus["train"] / "index.json").read_text())["shards"]
    )
    bound = sizes[-1] + sizes[-2] + 1
    cache = tmp_path / "cache"
    with serve_folder(pretrain_corpus["train"].parent) as (url, requested), CachePeak(cache) as peak:
        remote = {
            "train": [{"path": f"{url}/{pretrain_corpus['train'].name}"}],
            "cache_dir": str(cache),
            "cache_gb": bound / 1e9,
        }
        recipe = write_recipe(
            tmp_path / "killed", pretrain_corpus, **{**changes, "data": {**changes["data"], **remote}}
        )
        run = tmp_path / "killed" / "run"
        job = subprocess.Popen(
            ddp_pretrain(recipe), cwd=REPO_ROOT, env=TORCHRUN_ENV, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        wait_for(run / "checkpoints" / "step-00000002", job)
        kill_tree(job.pid)  # the launcher and both ranks at once, as a lost node would
        job.wait()
        relaunched = subprocess.run(
            ddp_pretrain(recipe), cwd=REPO_ROOT, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=1200
        )
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert resumed_step(relaunched.stderr) < 6  # killed mid-run, not after the end
    assert 0 < peak.bytes <= bound, f"the cache held {peak.bytes} bytes, data.cache_gb allows {bound}"
    fetched = [path for path in requested if path.endswith(".tar")]
    assert len(set(fetched)) == 3
    assert len(fetched) > 3  # the relaunch needs every shard again, and the cache kept only two: evicted, fetched
    expected, got = final_weights(tmp_path / "straight" / "run"), final_weights(run)
    # stated tolerance 1e-6; measured: bitwise equal (gloo sums the two ranks' gradients in a fixed order)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    for rank in range(2):
        ledger = tmp_path / "killed" / "run" / f"ledger-rank{rank}.jsonl"
        by_step = {json.loads(line)["step"]: json.loads(line)["samples"] for line in ledger.read_text().splitlines()}
        straight_ledger = (tmp_path / "straight" / "run" / f"ledger-rank{rank}.jsonl").read_text().splitlines()
        assert by_step == {json.loads(line)["step"]: json.loads(line)["samples"] for line in straight_ledger}
    epoch = [
        tuple(ref)
        for rank in range(2)
        for line in (run / f"ledger-rank{rank}.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= 3
        for ref in json.loads(line)["samples"]
    ]
    assert len(set(epoch)) == 48  # every sample of the first epoch exactly once across both ranks
