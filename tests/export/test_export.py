"""`zidong export`: reload equality (joint model and every tower), remote code and plain-transformers loading in
clean processes, sharding, DeepSpeed/FSDP layouts, and exit 2 for every bad checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import run_cli
from tests.tiny_model import sample_inputs
from zidong.export.trained import load_trained
from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.train.checkpoint import read_weights

BLOCK_ZIDONG = """
import importlib.abc, sys
class NoZidong(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "zidong" or name.startswith("zidong."):
            raise ImportError("zidong is not installed in this process")
sys.meta_path.insert(0, NoZidong())
"""


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    result = run_cli("export", str(trained_run), "--out", str(out), "--towers")
    assert result.returncode == 0, result.stderr
    return out


def test_export_folder_has_what_the_hub_needs(exported: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "processor_config.json",
        "text",
        "vision",
        "speech",
    } <= names
    assert {"modeling_zidong.py", "configuration_zidong.py"} <= names  # remote code
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_zidong.ZidongModel"
    card = (exported / "README.md").read_text()
    assert "library_name: transformers" in card
    assert "| text tower | BertModel |" in card
    assert "Held-out retrieval (step 2, 12 samples)" in card
    assert "| samples | modalities |" in card
    assert "text+vision+speech" in card
    assert "```yaml" in card  # the recipe


def test_reloaded_export_equals_the_checkpoint(trained_run: Path, exported: Path) -> None:
    from transformers import AutoModel

    original, processor, _, _ = load_trained(trained_run)
    reloaded = AutoModel.from_pretrained(exported).eval()
    inputs = sample_inputs(processor)
    with torch.no_grad():
        expected, got = original(**inputs), reloaded(**inputs)
    for modality in MODALITIES:
        assert torch.equal(getattr(expected, f"{modality}_embeds"), getattr(got, f"{modality}_embeds")), modality


REMOTE = BLOCK_ZIDONG + textwrap.dedent(
    """
    import torch
    from transformers import AutoModel
    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = torch.load(sys.argv[2])
    with torch.no_grad():
        out = model(**inputs)
    torch.save({m: getattr(out, m + "_embeds") for m in ("text", "vision", "speech")}, sys.argv[3])
    """
)

TOWERS = BLOCK_ZIDONG + textwrap.dedent(
    """
    import numpy as np, torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoModel, AutoTokenizer
    root = sys.argv[1]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    audio = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 9000, 12345)]
    text = ["a red circle", "两个蓝色的方块", "three small green triangles"]
    calls = {
        "text": (AutoTokenizer, lambda pre: pre(text, return_tensors="pt", padding=True)),
        "vision": (AutoImageProcessor, lambda pre: pre(images=images, return_tensors="pt")),
        "speech": (AutoFeatureExtractor, lambda pre: pre(audio, sampling_rate=16000, return_tensors="pt", padding=True)),
    }
    embeddings = {}
    for modality, (kind, call) in calls.items():
        folder = f"{root}/{modality}"
        tower = AutoModel.from_pretrained(folder).eval()
        assert type(tower).__module__.startswith("transformers.models."), type(tower).__module__
        inputs = call(kind.from_pretrained(folder))
        projection = load_file(f"{folder}/projection.safetensors")["weight"]
        with torch.no_grad():
            states = tower(**inputs).last_hidden_state
        if modality == "vision":
            pooled = states[:, 0]
        else:
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            pooled = (states * mask).sum(1) / mask.sum(1)
        embeddings[modality] = torch.nn.functional.normalize(pooled @ projection.T, dim=-1)
    assert not any(name.startswith("zidong") for name in sys.modules)
    torch.save(embeddings, sys.argv[2])
    """
)


# What an evaluation tool written for CLIP and CLAP does with a model folder: Auto classes, the processor's batch
# straight into the features methods, cosine scores.
CLIP_TOOL = BLOCK_ZIDONG + textwrap.dedent(
    """
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor
    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    audio = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 9000, 12345)]
    text = ["a red circle", "两个蓝色的方块", "three small green triangles"]
    with torch.no_grad():
        features = {
            "text": model.get_text_features(**processor(text=text, padding=True, return_tensors="pt")),
            "vision": model.get_image_features(**processor(images=images, return_tensors="pt")),
            "speech": model.get_audio_features(**processor(audio=audio, sampling_rate=16000, return_tensors="pt")),
        }
    unit = {m: f.pooler_output / f.pooler_output.norm(dim=-1, keepdim=True) for m, f in features.items()}
    pairs = [("text", "vision"), ("text", "speech"), ("vision", "speech")]
    torch.save({f"{a}->{b}": unit[a] @ unit[b].T for a, b in pairs}, sys.argv[2])
    """
)


def _clean_run(tmp_path: Path, script: str, *args: str) -> None:
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=tmp_path, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_remote_code_loads_without_zidong_and_gives_the_same_outputs(
    trained_run: Path, exported: Path, tmp_path: Path
) -> None:
    original, processor, _, _ = load_trained(trained_run)
    inputs = dict(sample_inputs(processor))
    torch.save(inputs, tmp_path / "inputs.pt")
    _clean_run(tmp_path, REMOTE, str(exported), str(tmp_path / "inputs.pt"), str(tmp_path / "remote.pt"))
    remote = torch.load(tmp_path / "remote.pt")
    with torch.no_grad():
        local = original(**inputs)
    for modality in MODALITIES:
        assert torch.equal(remote[modality], getattr(local, f"{modality}_embeds")), modality


def test_a_clip_style_tool_scores_the_export_like_the_joint_model(
    trained_run: Path, exported: Path, tmp_path: Path
) -> None:
    _clean_run(tmp_path, CLIP_TOOL, str(exported), str(tmp_path / "scores.pt"))
    scores = torch.load(tmp_path / "scores.pt")
    original, processor, _, _ = load_trained(trained_run)
    with torch.no_grad():
        out = original(**sample_inputs(processor))
    for pair, got in scores.items():
        first, second = pair.split("->")
        expected = getattr(out, f"{first}_embeds") @ getattr(out, f"{second}_embeds").T
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=pair)


def test_each_tower_loads_with_plain_transformers_and_embeds_like_the_joint_model(
    trained_run: Path, exported: Path, tmp_path: Path
) -> None:
    _clean_run(tmp_path, TOWERS, str(exported), str(tmp_path / "towers.pt"))
    towers = torch.load(tmp_path / "towers.pt")
    original, processor, _, _ = load_trained(trained_run)
    inputs = sample_inputs(processor)
    with torch.no_grad():
        joint = {
            "text": original.get_text_features(inputs["input_ids"], inputs["text_attention_mask"]).pooler_output,
            "vision": original.get_vision_features(inputs["pixel_values"]).pooler_output,
            "speech": original.get_speech_features(
                inputs["input_values"], inputs["speech_attention_mask"]
            ).pooler_output,
        }
    torch.testing.assert_close(towers["text"], joint["text"], rtol=0, atol=1e-6)
    torch.testing.assert_close(towers["vision"], joint["vision"], rtol=0, atol=1e-6)
    # the stock speech extractor computes the filterbank in float64 numpy: equal to zidong's to ~1e-4
    torch.testing.assert_close(towers["speech"], joint["speech"], rtol=0, atol=2e-3)


def test_large_models_are_sharded(trained_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    from zidong.export.folders import export

    out = export(trained_run, tmp_path / "sharded", max_shard_size="2MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original, _, _, _ = load_trained(trained_run)
    reloaded = AutoModel.from_pretrained(out)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_fsdp_sharded_checkpoints_are_read(trained_run: Path, tmp_path: Path) -> None:
    # the layout Accelerate writes for FSDP's SHARDED_STATE_DICT: torch.distributed.checkpoint of {"model": ...}
    import torch.distributed.checkpoint as dcp

    source = sorted((trained_run / "checkpoints").iterdir())[-1]
    weights = read_weights(source)
    fsdp = tmp_path / "step-00000002"
    shutil.copytree(source, fsdp, ignore=shutil.ignore_patterns("model.safetensors"))
    dcp.save({"model": weights}, storage_writer=dcp.FileSystemWriter(fsdp / "pytorch_model_fsdp_0"))
    again = read_weights(fsdp)
    assert set(again) == set(weights)
    assert all(torch.equal(again[name], weights[name]) for name in weights)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("partial", "is an unfinished checkpoint (its save was interrupted)"),
        ("no weights", "holds no model weights in a layout zidong knows"),
        ("other config", "do not fit its model/config.json"),
        ("old checkpoint", "has no model/config.json"),
        ("not a run", "is neither a run folder with checkpoints"),
    ],
)
def test_a_bad_checkpoint_exits_2(trained_run: Path, tmp_path: Path, breakage: str, message: str) -> None:
    source = sorted((trained_run / "checkpoints").iterdir())[-1]
    broken = tmp_path / ("step-00000002.tmp" if breakage == "partial" else "step-00000002")
    shutil.copytree(source, broken)
    if breakage == "no weights":
        (broken / "model.safetensors").unlink()
    elif breakage == "other config":
        config = json.loads((broken / "model" / "config.json").read_text())
        config["projection_dim"] = config["projection_dim"] * 2
        (broken / "model" / "config.json").write_text(json.dumps(config))
    elif breakage == "old checkpoint":
        shutil.rmtree(broken / "model")
    elif breakage == "not a run":
        broken = tmp_path / "empty"
        broken.mkdir()
    out = tmp_path / "out"
    result = run_cli("export", str(broken), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not (tmp_path / "out.tmp").exists()


def test_an_existing_output_folder_is_left_alone(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("export", str(trained_run), "--out", str(out))
    assert result.returncode == 2
    assert "already exists and is not an empty folder" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_checkpoint_written_with_tower_poolers_still_loads(trained_run: Path, tmp_path: Path) -> None:
    # checkpoints from before the towers lost their unused poolers hold `*_model.pooler.*` tensors
    source = sorted((trained_run / "checkpoints").glob("step-*"))[-1]
    old = tmp_path / source.name
    shutil.copytree(source, old)
    weights = load_file(old / "model.safetensors")
    width = next(t for name, t in weights.items() if name.startswith("text_projection.")).shape[1]
    for tower in ("text_model", "vision_model"):
        weights[f"{tower}.pooler.dense.weight"] = torch.zeros(width, width)
        weights[f"{tower}.pooler.dense.bias"] = torch.zeros(width)
    save_file(weights, old / "model.safetensors", metadata={"format": "pt"})
    model, _, _, _ = load_trained(old)
    current, _, _, _ = load_trained(source)
    for name, tensor in current.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


LORA_TOWER = BLOCK_ZIDONG + textwrap.dedent(
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModel
    root = sys.argv[1]
    inputs = torch.load(sys.argv[2])
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["text_attention_mask"]}
    with torch.no_grad():
        tower = AutoModel.from_pretrained(f"{root}/text").eval()
        base = tower(**text).last_hidden_state
        adapted = PeftModel.from_pretrained(tower, f"{root}/lora/text").eval()
        assert type(adapted.get_base_model()).__module__.startswith("transformers.models.")
        joint = AutoModel.from_pretrained(root, trust_remote_code=True).eval()
        results = {"base": base, "adapted": adapted(**text).last_hidden_state, "joint": joint(**inputs).text_embeds}
    torch.save(results, sys.argv[3])
    """
)
LORA_SPEC = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"]}


@pytest.fixture(scope="module")
def lora_model(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run with LoRA on its text tower, the adapters moved off their start (B = 0), saved as an export."""
    from zidong.models.zidong.lora_zidong import add_lora, is_lora_parameter

    model, processor, _, _ = load_trained(trained_run)
    add_lora(model, {"text": LORA_SPEC})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if is_lora_parameter(name):
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    folder = tmp_path_factory.mktemp("lora") / "source"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_lora_export_loads_its_adapter_with_peft_alone_and_merges_to_the_same(
    trained_run: Path, lora_model: Path, tmp_path: Path
) -> None:
    from transformers import AutoModel

    for name, flags in (("kept", []), ("merged", ["--merge-lora"])):
        result = run_cli("export", str(lora_model), "--out", str(tmp_path / name), "--towers", *flags)
        assert result.returncode == 0, result.stderr
    kept, merged = tmp_path / "kept", tmp_path / "merged"
    adapter = json.loads((kept / "lora" / "text" / "adapter_config.json").read_text())
    assert (adapter["peft_type"], adapter["r"], sorted(adapter["target_modules"])) == ("LORA", 4, ["query", "value"])
    assert not (kept / "lora" / "vision").exists()
    assert not (merged / "lora").exists()
    assert json.loads((merged / "config.json").read_text()).get("lora") is None
    assert json.loads((kept / "config.json").read_text())["lora"]["text"]["r"] == 4
    # the tower folder holds the base weights, bitwise those the adapters were added to
    original, processor, _, _ = load_trained(trained_run)
    base = load_file(kept / "text" / "model.safetensors")
    assert base.keys() == original.text_model.state_dict().keys()
    for name, tensor in original.text_model.state_dict().items():
        assert torch.equal(base[name], tensor), name

    inputs = dict(sample_inputs(processor))
    torch.save(inputs, tmp_path / "inputs.pt")
    _clean_run(tmp_path, LORA_TOWER, str(kept), str(tmp_path / "inputs.pt"), str(tmp_path / "peft.pt"))
    outside = torch.load(tmp_path / "peft.pt")
    model, *_ = load_trained(lora_model)
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["text_attention_mask"]}
    with torch.no_grad():
        trained = model.text_model(**text).last_hidden_state
        joint = model(**inputs).text_embeds
        merged_tower = AutoModel.from_pretrained(merged / "text").eval()(**text).last_hidden_state
    assert not torch.allclose(outside["base"], trained, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(outside["adapted"], trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(outside["joint"], joint, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged_tower, outside["adapted"], rtol=0, atol=1e-5)


def test_merge_lora_without_adapters_exits_2(trained_run: Path, tmp_path: Path) -> None:
    result = run_cli("export", str(trained_run), "--out", str(tmp_path / "out"), "--merge-lora")
    assert result.returncode == 2
    assert "has no LoRA adapters to merge (leave the flag out)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_text_tower_folder_is_a_sentence_transformers_model(trained_run: Path, exported: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["a red circle", "两个蓝色的方块", "three small green triangles"]
    encoder = SentenceTransformer(str(exported / "text"), device="cpu")
    assert [type(module).__name__ for module in encoder] == ["Transformer", "Pooling", "Dense", "Normalize"]
    embedded = encoder.encode(texts, convert_to_tensor=True)
    original, processor, _, _ = load_trained(trained_run)
    tokens = processor(text=texts, return_tensors="pt")
    with torch.no_grad():
        expected = original.get_text_features(tokens["input_ids"], tokens["text_attention_mask"]).pooler_output
    torch.testing.assert_close(embedded, expected, rtol=0, atol=1e-6)
