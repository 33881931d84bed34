"""The evaluation suites labs already run, driving a zidong model from their side with their own packages and
functions: CLIP_benchmark (its command line, on the demo eval split in its WebDataset layout, against `zidong
eval` on the same samples), X-ARES (its encoder checker) and the HEAR 2021 API's rules. sentence-transformers is
in tests/export/test_export.py (it reads the `--towers` text folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from tests.helpers import REPO_ROOT
from zidong.data.transforms import SamplePipeline
from zidong.evaluation.retrieval import HeldOut, embed_folder
from zidong.evaluation.zero_shot import evaluate
from zidong.export.trained import load_trained

SHAPES = REPO_ROOT / "recipes" / "labels" / "demo-shape.yaml"


def clip_benchmark(*args: str, cwd: Path) -> dict[str, float]:
    """`python -m zidong.evaluation.suites.clip ARGS` (CLIP_benchmark's own command line); its metrics."""
    result = subprocess.run(
        [sys.executable, "-m", "zidong.evaluation.suites.clip", *args, "--output", "result.json"],
        cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((cwd / "result.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def clip_datasets(demo_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from zidong.evaluation.suites.clip import write_webdataset

    out = tmp_path_factory.mktemp("clip-benchmark") / "demo"
    retrieval, shapes = write_webdataset(demo_corpus / "eval", out, SHAPES)
    return {"retrieval": retrieval, "shapes": shapes}


@pytest.mark.slow
def test_clip_benchmark_scores_the_demo_eval_split_as_zidong_eval_does(
    trained_run: Path, demo_corpus: Path, clip_datasets: dict[str, Path], tmp_path: Path
) -> None:
    common = ["eval", "--model_type", "zidong", "--model", str(trained_run), "--pretrained", "none", "--no_amp"]
    common += ["--num_workers", "0", "--batch_size", "64"]
    retrieval = clip_benchmark(
        *common, "--dataset", "wds/demo", "--dataset_root", str(clip_datasets["retrieval"]),
        "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10", cwd=tmp_path,
    )  # fmt: skip
    shapes = clip_datasets["shapes"]
    classified = clip_benchmark(
        *common, "--dataset", f"wds/{shapes.name}", "--dataset_root", str(shapes), "--task", "zeroshot_classification",
        "--custom_template_file", str(shapes / "templates.json"), cwd=tmp_path,
    )  # fmt: skip
    ours = evaluate(trained_run, demo_corpus / "eval", SHAPES)
    assert ours["text->vision/count"] == ours["samples"]  # every held-out sample has both: the same samples
    for k in (
        1,
        5,
        10,
    ):  # text -> image: images never tie, so the rankings agree (to float32 rounding: a miss is 1/240)
        assert retrieval[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"text->vision/R@{k}"], abs=1e-6)
    # image -> text: samples that share a caption have equal text embeddings, and such ties CLIP_benchmark breaks
    # by index where zidong counts the expectation over their order; they differ at most by the share of queries
    # whose own caption ties with another sample's across position k
    model, processor, _, _ = load_trained(trained_run)
    pipeline = SamplePipeline(processor, train=False)
    embeds, _ = embed_folder(model, HeldOut(demo_corpus / "eval", pipeline, 64, Accelerator()))
    scores = embeds["vision"] @ embeds["text"].T
    own = scores.diagonal()[:, None]
    above, tied = (scores > own).sum(1), (scores == own).sum(1) - 1
    for k in (1, 5, 10):
        straddling = float(((above < k) & (above + tied >= k)).double().mean())
        difference = abs(retrieval[f"text_retrieval_recall@{k}"] - ours[f"vision->text/R@{k}"])
        assert difference <= straddling + 1e-6, (k, difference, straddling)
    assert classified["acc1"] == pytest.approx(ours["classify/vision/accuracy"], abs=1e-6)


def test_the_webdataset_is_in_clip_benchmarks_layout(clip_datasets: dict[str, Path]) -> None:
    from clip_benchmark.datasets.builder import build_dataset

    retrieval = build_dataset(
        "wds/demo", root=str(clip_datasets["retrieval"]), transform=None, task="zeroshot_retrieval"
    )
    image, captions = next(iter(retrieval))
    assert image.mode == "RGB"
    assert len(captions) == 1
    assert captions[0].strip()
    shapes = build_dataset(
        "wds/demo-shape", root=str(clip_datasets["shapes"]), transform=None, task="zeroshot_classification"
    )
    assert shapes.classes == ["circle", "square", "triangle"]
    assert {label for _, label in shapes} <= {0, 1, 2}


@pytest.fixture(scope="module")
def speech_audio() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(3, 40_000, generator=generator) * 2 - 1) * 0.3


def test_the_speech_tower_passes_x_ares_encoder_checker(trained_run: Path, speech_audio: torch.Tensor) -> None:
    from xares.audio_encoder_checker import check_audio_encoder

    from zidong.evaluation.suites.xares import ZidongEncoder

    encoder = ZidongEncoder(str(trained_run))
    assert check_audio_encoder(encoder)
    assert (encoder.sampling_rate, encoder.hop_size_in_ms, encoder.output_dim) == (16_000, 20.0, 128)
    frames = encoder(speech_audio)
    model, *_ = load_trained(trained_run)
    with torch.no_grad():
        states = model.encode_speech(speech_audio).token_states
    torch.testing.assert_close(frames, states, rtol=0, atol=1e-6)
    seconds = speech_audio.shape[1] / 16_000
    assert 0 <= seconds - frames.shape[1] * encoder.hop_size_in_ms / 1000 <= 1.001 * encoder.hop_size_in_ms / 1000


def test_x_ares_builds_the_encoder_from_the_environment(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xares.utils import attr_from_py_path

    from zidong.errors import UserError

    monkeypatch.delenv("ZIDONG_MODEL", raising=False)
    found = attr_from_py_path("zidong/evaluation/suites/xares.py", endswith="Encoder")  # as `xares.run` finds it
    with pytest.raises(UserError, match="set ZIDONG_MODEL"):
        found()
    monkeypatch.setenv("ZIDONG_MODEL", str(trained_run))
    assert found().output_dim == 128


def test_the_hear_api_follows_its_rules(trained_run: Path, speech_audio: torch.Tensor) -> None:
    """The HEAR 2021 common API: `load_model` gives a module with integer `sample_rate`, `scene_embedding_size`
    and `timestamp_embedding_size`; for (n_sounds, n_samples) float32 audio, `get_timestamp_embeddings` returns
    float32 (n_sounds, n_timestamps, timestamp_embedding_size) and timestamps in ms (n_sounds, n_timestamps),
    increasing and evenly spaced, at most 50 ms apart, inside the audio; `get_scene_embeddings` returns float32
    (n_sounds, scene_embedding_size); a sound's embeddings do not depend on the others in its batch."""
    from zidong.evaluation.suites import hear

    model = hear.load_model(str(trained_run))
    assert isinstance(model, torch.nn.Module)
    for name in ("sample_rate", "scene_embedding_size", "timestamp_embedding_size"):
        assert isinstance(getattr(model, name), int), name
    assert model.sample_rate == 16_000
    for audio in (speech_audio, speech_audio[:, :16_000]):
        embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
        assert embeddings.dtype == timestamps.dtype == torch.float32
        assert embeddings.shape == (3, timestamps.shape[1], model.timestamp_embedding_size)
        assert timestamps.shape == (3, embeddings.shape[1])
        steps = timestamps.diff(dim=1)
        assert torch.allclose(steps, steps[0, 0])
        assert 0 < float(steps[0, 0]) <= 50
        assert float(timestamps.min()) >= 0
        assert float(timestamps.max()) <= audio.shape[1] / 16
        scene = hear.get_scene_embeddings(audio, model)
        assert scene.dtype == torch.float32
        assert scene.shape == (3, model.scene_embedding_size)
        torch.testing.assert_close(scene, embeddings.mean(dim=1), rtol=0, atol=1e-5)
        alone, _ = hear.get_timestamp_embeddings(audio[1:2], model)
        torch.testing.assert_close(alone, embeddings[1:2], rtol=0, atol=1e-4)
