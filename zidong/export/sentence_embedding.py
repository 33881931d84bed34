"""The text tower's folder as a sentence-transformers model: what `SentenceTransformer(FOLDER)` reads to embed
exactly as `ZidongModel.get_text_features` does (the tower, the masked mean of its token states, the projection,
L2 normalisation).

The files follow the layout sentence-transformers 2 to 5 write (`modules.json` naming the modules
`sentence_transformers.models.Transformer`, `Pooling`, `Dense`, `Normalize`), which sentence-transformers 6 still
loads; zidong writes them itself, so exporting needs no sentence-transformers (tests/export/test_export.py loads
them with it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

MODULES = (("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"), ("3_Normalize", "Normalize"))


def write_sentence_transformers_files(folder: Path, projection: torch.Tensor, max_seq_length: int) -> None:
    """`folder` holds the text tower and its tokenizer; `projection` is the (projection_dim, width) map."""
    out_features, width = projection.shape
    modules = [
        {"idx": index, "name": str(index), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for index, (path, kind) in enumerate(MODULES)
    ]
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    pooling = {
        "word_embedding_dimension": width,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    _write_json(folder / "1_Pooling" / "config.json", pooling)
    dense = {
        "in_features": width,
        "out_features": out_features,
        "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
    }
    _write_json(folder / "2_Dense" / "config.json", dense)
    save_file({"linear.weight": projection.contiguous()}, folder / "2_Dense" / "model.safetensors")
    (folder / "3_Normalize").mkdir(exist_ok=True)


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
