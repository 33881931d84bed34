"""`python -m benchmarks`: the quick mode runs every measurement and writes a complete report; bad arguments exit 2.

Benchmarks are not timed tests: this checks that each measurement runs and that the equalities it states hold
(equal contrastive losses and gradients, front-end parity), not how fast anything is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m benchmarks ARGS` from `cwd` (the repository root on the path, as running it from there gives)."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.mark.slow
def test_quick_bench_runs_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "report" / "bench.json"
    done = bench("--quick", "--out", str(out), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert sorted({row["number"] for row in rows}) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert len(rows) >= 36  # 37 where CUDA adds the GPU MFU row
    for row in rows:
        assert math.isfinite(row["value"]), row
        assert row["value"] > 0 or row["number"] == 12, row  # 12's first rows are differences
        assert row["met"] in (True, False)
        assert row["name"] in done.stdout
    by_name = {row["name"]: row for row in rows}
    memory = next(row for row in rows if row["name"].startswith("contrastive loss peak memory"))["details"]
    assert memory["loss_difference"] < 1e-5
    assert memory["max_gradient_difference"] < 1e-6
    assert memory["naive_peak_mib"] > memory["zidong_peak_mib"] > 0
    cached = next(row for row in rows if row["name"].startswith("full-batch negatives: peak memory"))["details"]
    assert cached["loss_difference"] < 1e-5
    assert cached["relative_gradient_difference"] < 1e-5
    assert cached["batch_peak_mib"] > cached["cached_peak_mib"] > 0
    frontend = next(row for row in rows if row["number"] == 5)["details"]
    assert frontend["utterances"] > 0
    assert frontend["max_abs_difference_float64"] < 1e-6
    step = next(name for name in by_name if name.startswith("step time, zidong"))
    assert by_name[step]["details"]["naive_seconds_per_step"] > 0
    built, remote = (row["details"] for row in rows if row["number"] == 8)
    assert set(built["samples_per_s"]) == {"jsonl", "tsv", "parquet", "webdataset"}
    assert remote["shards"] > 0
    assert remote["local_seconds_per_step"] > 0
    compiled = next(row for row in rows if row["number"] == 9)["details"]
    assert compiled["compiled_graphs"] >= 1  # dynamo really traced the layers
    assert compiled["eager_seconds_per_step"] > 0
    growth = {row["name"].split(":")[0]: row["details"] for row in rows if row["number"] == 10 and row["details"]}
    assert set(growth) == {"data plan", "shard index", "stream state", "shard cache", "build", "checkpoint"}
    assert growth["data plan"]["memory_slope_vs_slots"] < 0.5  # a slot's plan does not grow with the slots
    assert [row["files_read"] for row in growth["stream state"]["by_ranks"]] == [2, 2, 2]
    assert growth["build"]["merge"]["shards"] == 20_000
    fixed_cost, peer = (row["details"] for row in rows if row["number"] == 11)
    assert set(fixed_cost["host_work_ms"]) >= {"flop_count", "clip_gradients", "optimizer_step"}
    assert fixed_cost["trainable_tensors"] > 0
    # equal work: open_clip's model built with the same tower sizes does the same FLOPs per sample, within 1 %
    assert peer["open_clip_gflop_per_sample"] == pytest.approx(peer["zidong_gflop_per_sample"], rel=0.01)
    assert peer["open_clip_seconds_per_step"] > 0
    learned = next(row for row in rows if row["number"] == 12)["details"]
    assert learned["training_pairs"] > learned["held_out_samples"] > 0
    assert learned["peer_pairs_per_step"] == round(32 * learned["text_vision_share_of_training_samples"])
    (zidong_run,) = learned["zidong_runs"]
    assert zidong_run["steps"] == learned["steps"] > 0
    assert zidong_run["git"]["commit"]
    for side in (zidong_run, *learned["peer_runs"]):
        assert 0 <= side["metrics"]["text->vision/dup_R@1"] <= 1
        assert side["metrics"]["text->vision/count"] == learned["held_out_samples"]  # both score every pair
    assert report["machine"]["cores"] >= 1
    assert report["quick"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--only", "13"), "measurement numbers from 1 to 12"),
        (("--only", "one"), "measurement numbers from 1 to 12"),
        (("--main-job", "."), "--main-job .: not a run folder"),
        (("--out", "."), "is a folder"),
    ],
)
def test_bad_arguments_exit_2_without_a_traceback(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    done = bench(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_unfinished_main_job_run_exits_2_naming_its_metrics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 10, "loss": 2.0}) + "\n")
    (run / "launches.jsonl").write_text(json.dumps({"time": "2026-12-08T05:41:20+00:00"}) + "\n")
    (run / "config.yaml").write_text("output_dir: run\n")
    done = bench("--only", "12", "--main-job", str(run), "--out", str(tmp_path / "out.json"), cwd=tmp_path)
    assert done.returncode == 2
    assert f"{run / 'metrics.jsonl'} holds no held-out evaluation" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.json").exists()
