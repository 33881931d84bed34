"""scripts/slurm/pretrain.sbatch without a cluster: `srun` and `scontrol` are replaced by shims that run the
node command locally, so the script's own logic (torchrun with a c10d rendezvous, overrides passed through,
USR1 forwarded to the training processes, requeue after a clean checkpoint) runs for real on 2 CPU processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

from tests.helpers import REPO_ROOT, free_port
from tests.train.test_pretrain import corpus, wait_for, write_recipe  # noqa: F401  (corpus is a fixture)

SCRIPT = REPO_ROOT / "scripts" / "slurm" / "pretrain.sbatch"


def _shims(folder: Path) -> Path:
    folder.mkdir()
    (folder / "srun").write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            # run the command on this machine: drop srun's own options
            while [[ $1 == --* ]]; do shift; done
            exec "$@"
            """
        )
    )
    (folder / "scontrol").write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            if [[ $1 == show ]]; then echo localhost; else echo "$*" >> "$SHIM_LOG"; fi
            """
        )
    )
    for shim in folder.iterdir():
        shim.chmod(0o755)
    return folder


def test_usr1_checkpoints_every_process_then_requeues(corpus: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    recipe = write_recipe(tmp_path, corpus, train={"max_steps": 40}, data={"num_workers": 0, "eval": None})
    shims = _shims(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{shims}:{Path(os.sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "localhost",
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "ZIDONG_PROGRESS": "0",
        "SHIM_LOG": str(tmp_path / "scontrol.log"),
        "TMPDIR": str(tmp_path),
    }
    job = subprocess.Popen(
        ["bash", str(SCRIPT), str(recipe), "checkpoint.every_steps=2"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(tmp_path / "run" / "checkpoints" / "step-00000002", job)  # the override reached the processes
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-4000:]
    assert "stopped by SIGUSR1" in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    last = tmp_path / "run" / "checkpoints" / saved[-1]
    assert not last.name.endswith(".tmp")
    step = json.loads((last / "trainer.json").read_text())["step"]
    assert 2 < step < 40 or (step == 2 and len(saved) == 1)  # stopped early, with a checkpoint of where it was
    assert {"data-rank0.json", "data-rank1.json"} <= {p.name for p in last.iterdir()}


def test_without_a_recipe_it_says_how_to_call_it(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "no such recipe" in result.stderr
