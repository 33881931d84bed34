"""A tower loaded from a pretrained checkpoint and frozen for the whole run comes out of `zidong export --towers`
exactly as it went in, the pooler zidong never builds included: compared with the checkpoint's own safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, BertConfig, BertModel

from tests.helpers import run_cli
from tests.pretrain_run import write_recipe
from zidong.models.zidong.modeling_zidong import ZidongModel


@pytest.fixture(scope="module")
def pretrained_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BERT checkpoint with its pooler, as a hub folder of one (all-MiniLM-L6-v2 is one)."""
    torch.manual_seed(5)
    config = BertConfig(vocab_size=400, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=96, max_position_embeddings=128)  # fmt: skip
    bert = BertModel(config)
    assert "pooler.dense.weight" in bert.state_dict()
    folder = tmp_path_factory.mktemp("pretrained") / "bert"
    bert.save_pretrained(folder)
    return folder


def test_a_frozen_pretrained_tower_is_exported_bitwise(
    pretrained_text: Path, pretrain_corpus: dict[str, Path], tmp_path: Path
) -> None:
    model = {
        "preset": "tiny",
        "tokenizer": str(pretrain_corpus["tokenizer"]),
        "text": {"pretrained": str(pretrained_text), "frozen_steps": -1},
    }
    data = {"num_workers": 0, "ledger": False, "eval": None}
    recipe = write_recipe(tmp_path, pretrain_corpus, model=model, data=data, train={"max_steps": 2})
    trained = run_cli("pretrain", str(recipe), "train.trackers=[]")
    assert trained.returncode == 0, trained.stderr[-3000:]
    original = load_file(pretrained_text / "model.safetensors")

    from_checkpoint = tmp_path / "towers"
    result = run_cli("export", str(tmp_path / "run"), "--out", str(from_checkpoint), "--towers")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_file(from_checkpoint / "text" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[name], original[name]) for name in original)
    _, loading = AutoModel.from_pretrained(from_checkpoint / "text", output_loading_info=True)
    assert not any(loading.values()), loading  # nothing missing, unexpected or newly initialised

    joint = ZidongModel.from_pretrained(from_checkpoint)  # the joint export carries the kept weights too
    kept = joint.kept_tower_weights.of("text")
    assert sorted(kept) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert all(torch.equal(kept[name], original[name]) for name in kept)
    assert not any(name.startswith("kept_tower_weights") for name, _ in joint.named_parameters())  # never trained
