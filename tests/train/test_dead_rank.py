"""One process of four hung or killed (kill -9) mid-run: the job ends in bounded time with a non-zero exit, no
half-written checkpoint is taken for the latest, and the relaunch resumes to bitwise the uninterrupted weights.

The victim is rank 2 itself (not the launcher). It is stopped (SIGSTOP), so the other three go on into the next
collective (or into the checkpoint's barriers) and wait there for it. A hung process stays stopped: the others end
when `parallel.collective_timeout_s` runs out. A killed one is then killed: the launcher ends the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, kill_tree, resumed_step, torchrun
from tests.pretrain_run import TORCHRUN_ENV, final_weights, wait_for, write_recipe

PROCESSES = 4
VICTIM = 2
STEPS = 4
# 4 processes x 4 samples: an epoch of 48 samples is 3 steps; 4 steps, a checkpoint every 2
CHANGES = {"train": {"max_steps": STEPS, "batch_size": 4}, "data": {"num_workers": 0, "eval": None, "ledger": False}}
TORCHRUN_GRACE_S = 30  # torchrun sends SIGTERM to the ranks still running, and SIGKILL this much later


def pretrain(recipe: Path) -> list[str]:
    return [*torchrun(PROCESSES), "-m", "zidong", "pretrain", str(recipe)]


def start(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen(
        pretrain(recipe), cwd=REPO_ROOT, env=TORCHRUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of training process `rank`: the launcher's child whose environment says RANK=rank."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environment = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environment:
            return int(stat.parent.name)
    raise AssertionError(f"no process of rank {rank} under the launcher {launcher}")


def ended_within(job: subprocess.Popen, seconds: float) -> tuple[int, float, str]:
    """(exit code, seconds it took, output) of `job`, which must end within `seconds`."""
    started = time.monotonic()
    try:
        output, _ = job.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        kill_tree(job.pid)
        raise AssertionError(f"the job still ran {seconds} s after one of its processes died or hung") from None
    return job.returncode, time.monotonic() - started, output


def assert_complete_checkpoints(run: Path) -> int:
    """Every `step-N` folder holds every file a resume reads; returns the latest step."""
    folders = sorted((run / "checkpoints").glob("step-????????"))
    assert folders, "no complete checkpoint"
    for folder in folders:
        names = {path.name for path in folder.iterdir()}
        expected = {"trainer.json", "model.safetensors", "data-layout.json"}
        expected |= {f"data-rank{rank}.json" for rank in range(PROCESSES)}
        assert expected <= names, f"{folder.name} lacks {sorted(expected - names)}"
    return int(folders[-1].name.removeprefix("step-"))


@pytest.fixture(scope="module")
def straight(pretrain_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("straight-4")
    done = subprocess.run(
        pretrain(write_recipe(folder, pretrain_corpus, **CHANGES)), cwd=REPO_ROOT, env=TORCHRUN_ENV, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "run"


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hung-in-a-collective", "killed-during-a-checkpoint"])
def test_a_dead_or_hung_process_ends_the_run_and_the_relaunch_resumes_exactly(
    pretrain_corpus: dict[str, Path], straight: Path, tmp_path: Path, fault: str
) -> None:
    """Hung: rank 2 is stopped for good after the step-2 checkpoint; the other three wait for it in step 3's
    gradient reduce until `parallel.collective_timeout_s` runs out. Killed: rank 2 is stopped while the step-4
    checkpoint is being written (the others wait at its barrier), then killed; the launcher ends the job."""
    timeout = 10
    recipe = write_recipe(tmp_path, pretrain_corpus, **CHANGES, parallel={"collective_timeout_s": timeout})
    checkpoints = tmp_path / "run" / "checkpoints"
    job = start(recipe)
    if fault == "hung-in-a-collective":
        wait_for(checkpoints / "step-00000002", job)
    else:  # the checkpoint's folder lives a fraction of a second: look often
        wait_for(checkpoints / "step-00000004.tmp", job, every=0.002)
    victim = rank_pid(job.pid, VICTIM)
    os.kill(victim, signal.SIGSTOP)  # alive, holding its sockets open, never answering
    try:
        if fault == "killed-during-a-checkpoint":
            time.sleep(2.0)
            os.kill(victim, signal.SIGKILL)
            code, seconds, output = ended_within(job, 60)
            assert seconds < 30  # measured: 2 to 3 s (the launcher sees the death and ends the other ranks)
            assert (checkpoints / "step-00000004.tmp").is_dir()  # begun, never completed, not taken for the latest
        else:
            code, seconds, output = ended_within(job, timeout + TORCHRUN_GRACE_S + 60)
            assert f"Timed out waiting {timeout * 1000}ms" in output, output[-3000:]
            assert seconds >= timeout  # ended by the timeout, not by anything else; measured: about 45 s
    finally:
        kill_tree(job.pid)
    assert code != 0, output[-3000:]
    assert assert_complete_checkpoints(tmp_path / "run") == 2
    relaunched = subprocess.run(
        pretrain(recipe), cwd=REPO_ROOT, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=900
    )
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert resumed_step(relaunched.stderr) == 2
    expected, got = final_weights(straight, STEPS), final_weights(tmp_path / "run", STEPS)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after a process was {fault}"
