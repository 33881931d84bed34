"""`zidong eval`: retrieval and classification metrics on constructed embeddings, the CLI on a trained
checkpoint, and exit 2 for bad label files, data folders and models."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

from tests.data.fixtures import write_audio, write_image
from tests.helpers import run_cli, serve_folder
from zidong.cli import EXIT_USAGE, main
from zidong.evaluation.retrieval import recall_at_k
from zidong.evaluation.zero_shot import classify
from zidong.models.zidong.configuration_zidong import MODALITIES

SAMPLES = 400


def _random_embeddings(seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(SAMPLES, 64, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_perfect_embeddings_give_recall_1_and_median_rank_1() -> None:
    shared = _random_embeddings(0)
    embeds = dict.fromkeys(MODALITIES, shared)
    presence = {m: torch.ones(SAMPLES, dtype=torch.bool) for m in MODALITIES}
    metrics = recall_at_k(embeds, presence)
    for query in MODALITIES:
        for target in MODALITIES:
            if query != target:
                assert metrics[f"{query}->{target}/R@1"] == 1.0
                assert metrics[f"{query}->{target}/median_rank"] == 1.0


def test_unrelated_embeddings_give_chance() -> None:
    embeds = {m: _random_embeddings(seed) for seed, m in enumerate(MODALITIES)}
    presence = {m: torch.ones(SAMPLES, dtype=torch.bool) for m in MODALITIES}
    metrics = recall_at_k(embeds, presence)
    recall_10 = [v for k, v in metrics.items() if k.endswith("/R@10")]
    medians = [v for k, v in metrics.items() if k.endswith("/median_rank")]
    assert len(recall_10) == 6
    assert all(abs(r - 10 / SAMPLES) < 0.03 for r in recall_10)  # chance 0.025
    assert all(abs(m - SAMPLES / 2) < SAMPLES * 0.15 for m in medians)


def test_only_samples_with_both_modalities_count() -> None:
    shared = _random_embeddings(0)
    presence = {m: torch.ones(SAMPLES, dtype=torch.bool) for m in MODALITIES}
    presence["speech"][: SAMPLES // 2] = False
    metrics = recall_at_k(dict.fromkeys(MODALITIES, shared), presence)
    assert metrics["text->speech/count"] == SAMPLES // 2
    assert metrics["text->vision/count"] == SAMPLES


def test_classification_on_constructed_embeddings() -> None:
    prototypes = F.normalize(torch.eye(3, 8), dim=-1)
    names = ["circle", "square", "triangle"]
    truth = [names[i % 3] for i in range(30)]
    perfect = F.normalize(torch.eye(3, 8)[[i % 3 for i in range(30)]] + 0.01, dim=-1)
    wrong = F.normalize(torch.eye(3, 8)[[(i + 1) % 3 for i in range(30)]], dim=-1)
    presence = {"vision": torch.ones(30, dtype=torch.bool), "speech": torch.ones(30, dtype=torch.bool)}
    presence["speech"][:10] = False
    labels = [*truth[:29], None]  # an unlabelled sample does not count
    metrics = classify({"vision": perfect, "speech": wrong}, presence, labels, prototypes, names)
    assert metrics["classify/vision/accuracy"] == 1.0
    assert metrics["classify/vision/count"] == 29
    assert metrics["classify/speech/accuracy"] == 0.0
    assert metrics["classify/speech/count"] == 19
    assert metrics["classify/vision/chance"] == pytest.approx(1 / 3)


def _label_file(folder: Path, text: str) -> Path:
    path = folder / "labels.yaml"
    path.write_text(text)
    return path


PARITY = "field: labels.parity\nclasses:\n  even: [an even item]\n  odd: [an odd item, odd]\n"


def test_eval_cli_prints_tables_and_writes_json(
    trained_run: Path,
    pretrain_corpus: dict[str, Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / "metrics.json"
    labels = _label_file(tmp_path, PARITY)
    result = run_cli(
        "eval", str(trained_run), "--data", str(pretrain_corpus["eval"]), "--labels", str(labels), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert metrics["samples"] == 12
    for query in MODALITIES:
        for target in MODALITIES:
            if query != target:
                assert f"{query}->{target:<{15 - len(query) - 2}}" in result.stdout
                assert 1 <= metrics[f"{query}->{target}/median_rank"] <= 12
                pair = f"{query}->{target}"
                assert metrics[f"{pair}/R@1"] <= metrics[f"{pair}/dup_R@1"]  # the own sample is one of the right
                # every sample has all three: one of each caption's samples can come first
                assert metrics[f"{pair}/ceiling_R@1"] == pytest.approx(metrics["distinct_captions"] / 12)
    assert f"12 samples, {int(metrics['distinct_captions'])} distinct captions" in result.stdout
    assert "zero-shot classification of labels.parity (2 classes)" in result.stdout
    assert metrics["classify/vision/count"] == 12
    assert metrics["classify/speech/count"] == 12
    assert f"{metrics['classify/vision/accuracy']:.3f}" in result.stdout
    # the same folder at a URL: the same numbers
    with serve_folder(pretrain_corpus["eval"].parent) as (url, requested):
        remote = run_cli(
            "eval", str(trained_run), "--data", f"{url}/{pretrain_corpus['eval'].name}", "--labels", str(labels),
            "--out", str(tmp_path / "remote.json"), env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
        )  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    assert json.loads((tmp_path / "remote.json").read_text()) == metrics
    assert any(path.endswith(".tar") for path in requested)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("field: labels.parity\n", "expected exactly the keys `field` and `classes`"),
        ("field: labels.parity\nclasses: {even: [x]}\n", "must map at least two class names"),
        ("field: labels.parity\nclasses: {even: [], odd: [y]}\n", "class 'even' needs one or more"),
        ("field: [a]\nclasses: {even: x, odd: y}\n", "`field` must be a dotted path"),
        ("field: labels.colour\nclasses: {red: x, blue: y}\n", "no sample has a `labels.colour` value"),
        ("{unclosed", "not valid YAML"),
    ],
    ids=["no classes", "one class", "no prompts", "bad field", "unknown field", "broken yaml"],
)
def test_bad_label_files_exit_2(
    trained_run: Path,
    pretrain_corpus: dict[str, Path],
    tmp_path: Path,
    labels: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # in-process: any exception but the user error escapes `main` (the console script would print its traceback)
    out = tmp_path / "metrics.json"
    arguments = [
        "--data",
        str(pretrain_corpus["eval"]),
        "--labels",
        str(_label_file(tmp_path, labels)),
        "--out",
        str(out),
    ]
    assert main(["eval", str(trained_run), *arguments]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_label_file_exits_2_from_the_command_line(
    trained_run: Path,
    pretrain_corpus: dict[str, Path],
    tmp_path: Path,
) -> None:
    labels = _label_file(tmp_path, "field: labels.colour\nclasses: {red: x, blue: y}\n")
    result = run_cli("eval", str(trained_run), "--data", str(pretrain_corpus["eval"]), "--labels", str(labels))
    assert result.returncode == 2
    assert "no sample has a `labels.colour` value" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_that_is_not_shards_or_a_model_exits_2(
    trained_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["eval", str(trained_run), "--data", str(tmp_path)]) == EXIT_USAGE
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--data", str(tmp_path)]) == EXIT_USAGE
    assert "is neither a run folder with checkpoints" in capsys.readouterr().err


def test_eval_reads_a_hugging_face_dataset_and_agrees_with_its_shards(trained_run: Path, tmp_path: Path) -> None:
    # 8 audio clips with a ClassLabel (an audio classification set) and 8 captioned images, in one parquet file
    stored = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features(
        {"jpg": stored, "caption": datasets.Value("string"), "audio": stored, "label": datasets.Value("int64")}
    )
    rows = {"jpg": [], "caption": [], "audio": [], "label": []}
    for n in range(16):
        if n < 8:
            path = write_audio(tmp_path / "media" / f"{n}.wav", seconds=0.3 + 0.1 * n)
            rows["audio"].append({"bytes": path.read_bytes(), "path": path.name})
            rows["jpg"].append(None)
            rows["caption"].append(None)
            rows["label"].append(n % 2)
        else:
            path = write_image(tmp_path / "media" / f"{n}.png", size=(32 + n, 40), seed=n)
            rows["jpg"].append({"bytes": path.read_bytes(), "path": path.name})
            rows["caption"].append(f"picture number {n}")
            rows["audio"].append(None)
            rows["label"].append(None)
    dataset = datasets.Dataset.from_dict(rows, features=features)
    dataset = dataset.cast_column("jpg", datasets.Image()).cast_column("audio", datasets.Audio())
    dataset = dataset.cast_column("label", datasets.ClassLabel(names=["quiet", "loud"]))
    source = tmp_path / "bench.parquet"
    dataset.to_parquet(str(source))
    labelled = ["--label-column", "label", "--prompt", "a {} sound", "--prompt", "something {}"]
    direct = run_cli("eval", str(trained_run), "--data", str(source), *labelled, "--out", str(tmp_path / "direct.json"))
    assert direct.returncode == 0, direct.stderr
    assert "zero-shot classification of label (2 classes)" in direct.stdout
    assert "vision->text" in direct.stdout
    metrics = json.loads((tmp_path / "direct.json").read_text())
    assert metrics["classify/speech/count"] == 8
    assert metrics["vision->text/count"] == 8
    streamed = run_cli(
        "eval",
        str(trained_run),
        "--data",
        str(source),
        *labelled,
        "--streaming",
        "--out",
        str(tmp_path / "stream.json"),
    )
    assert streamed.returncode == 0, streamed.stderr
    assert json.loads((tmp_path / "stream.json").read_text()) == metrics
    built = run_cli("data", "build", str(source), "--out", str(tmp_path / "shards"), "min_modalities=1")
    assert built.returncode == 0, built.stderr
    assert "16 samples in 1 shards, 0 rejected" in built.stdout
    result = run_cli(
        "eval", str(trained_run), "--data", str(tmp_path / "shards"), *labelled, "--out", str(tmp_path / "shards.json")
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "shards.json").read_text()) == metrics
    refused = run_cli("eval", str(trained_run), "--data", str(tmp_path / "shards"), "--streaming")
    assert refused.returncode == 2
    assert "--streaming reads Hugging Face datasets;" in refused.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--labels", "{labels}", "--label-column", "label"], "give --labels FILE or --label-column COLUMN, not both"),
        (["--prompt", "a {}"], "--prompt goes with --label-column"),
        (["--columns", "txt"], "--columns txt: expected FIELD=COLUMN"),
        (["--columns", "caption=title"], "'caption' is not a field; choose from id, text, image, audio, lang"),
    ],
    ids=["labels-and-column", "prompt-alone", "columns-no-equals", "columns-unknown-field"],
)
def test_contradictory_eval_flags_exit_2(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = _label_file(tmp_path, PARITY)
    flags = [flag.replace("{labels}", str(labels)) for flag in flags]
    assert main(["eval", str(tmp_path), "--data", str(tmp_path), *flags]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_a_label_column_with_one_class_exits_2(
    trained_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = ["id\ttext\tlabel"] + [f"s{n}\tcaption {n}\tsame" for n in range(4)]
    (tmp_path / "set.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert (
        main(["eval", str(trained_run), "--data", str(tmp_path / "set.tsv"), "--label-column", "label"]) == EXIT_USAGE
    )
    assert "--label-column label: 1 class(es) found" in capsys.readouterr().err
