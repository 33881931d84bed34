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

from tests.helpers import REPO_ROOT, free_port, resumed_step
from tests.pretrain_run import wait_for, write_recipe

SCRIPT = REPO_ROOT / "scripts" / "slurm" / "pretrain.sbatch"


def _shims(folder: Path) -> Path:
    folder.mkdir()
    (folder / "srun").write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            # run the command once per node of the allocation, all on this machine, as srun
            # --ntasks-per-node=1 does; srun's own options are dropped
            while [[ $1 == --* ]]; do shift; done
            tasks=()
            for ((node = 0; node < ${SLURM_NNODES:-1}; node++)); do
              SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
              tasks+=($!)
            done
            status=0
            for task in "${tasks[@]}"; do wait "$task" || status=$?; done
            exit $status
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


def test_usr1_on_two_nodes_checkpoints_every_process_then_the_requeued_job_resumes(
    pretrain_corpus: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Two "nodes" of one process each (the srun shim starts the node command twice, as SLURM would on two
    hosts): USR1 reaches both nodes' training processes, each writes its part of one checkpoint, the script
    requeues, and the requeued job (the same script run again) resumes from that checkpoint to the end."""
    steps = 10
    recipe = write_recipe(tmp_path, pretrain_corpus, train={"max_steps": steps}, data={"num_workers": 0, "eval": None})
    shims = _shims(tmp_path / "bin")
    env = {
        **os.environ,
        "PATH": f"{shims}:{Path(os.sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "GPUS_PER_NODE": "1",
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
    assert "stopped by SIGUSR1" in output, output[-4000:]  # rank 0 got it itself, not only from the other node
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    last = tmp_path / "run" / "checkpoints" / saved[-1]
    assert not last.name.endswith(".tmp")
    step = json.loads((last / "trainer.json").read_text())["step"]
    assert 2 <= step < steps  # stopped early, with a checkpoint of where it was
    assert {"data-rank0.json", "data-rank1.json"} <= {p.name for p in last.iterdir()}
    requeued = subprocess.run(
        ["bash", str(SCRIPT), str(recipe), "checkpoint.every_steps=2"], cwd=REPO_ROOT, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert requeued.returncode == 0, requeued.stderr[-4000:]
    assert resumed_step(requeued.stderr) == step
    assert (tmp_path / "run" / "checkpoints" / f"step-{steps:08d}").is_dir()


def test_without_a_recipe_it_says_how_to_call_it(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "no such recipe" in result.stderr
