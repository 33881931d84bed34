"""A zidong model as open_clip-style tools load one, for CLIP_benchmark (clip-benchmark 1.6).

`load_zidong_clip(model_name)` returns what CLIP_benchmark's model loaders return, `(model, transform,
tokenizer)`: `model.encode_image(pixels)`, `model.encode_text(token_ids)` and `model.encode_audio(waveforms)` give
the joint model's embeddings (L2-normalised, as `zidong eval` scores them), `transform` turns a PIL image into
the pixels `zidong eval` feeds the vision tower (centre square, then the image processor) and `tokenizer` a list
of strings into padded token ids. `register()` adds it to CLIP_benchmark as `--model_type zidong`, with the model
folder as `--model`:

    python -m zidong.evaluation.suites.clip eval --model_type zidong --model runs/tiny/model --pretrained none \\
        --dataset wds/demo --dataset_root clip-benchmark/demo --task zeroshot_retrieval --no_amp --num_workers 0

`python -m zidong.evaluation.suites.clip wds SHARDS OUT [--labels FILE]` writes a shard folder in CLIP_benchmark's
WebDataset layout (its own writer): OUT/test for retrieval (image + caption), and with a label file
OUT-<field> for zero-shot classification (image + class, `classnames.txt`, the class prompts in
`templates.json` for `--custom_template_file`).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from zidong.data.transforms import SamplePipeline, centre_square

MODEL_TYPE = "zidong"
SPLIT = "test"


class ClipStyleModel(nn.Module):
    """The joint model behind open_clip's `encode_*` names; text padding is found from the tokenizer's pad id."""

    def __init__(self, model: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.model = model.base_model.eval()
        self.pad_token_id = pad_token_id

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_vision_features(pixel_values=pixel_values.to(self.model.dtype)).pooler_output

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_token_id).long()
        return self.model.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output

    def encode_audio(self, waveforms: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(n, samples) 16 kHz waveforms in [-1, 1] (`attention_mask`: 1 on real samples)."""
        return self.model.get_speech_features(waveforms.float(), attention_mask).pooler_output


class ClipStyleTokenizer:
    """Strings -> (n, tokens) padded ids, truncated as `zidong eval` truncates captions."""

    def __init__(self, processor, max_length: int = SamplePipeline.max_text_tokens) -> None:
        self.processor = processor
        self.max_length = max_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.processor(text=texts, max_length=self.max_length, return_tensors="pt")["input_ids"]


class ClipStyleTransform:
    """PIL image -> (3, H, W) pixels: the centre square `zidong eval` crops, then the model's image processor."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        square = image.crop(centre_square(image.size))
        return self.processor(images=[square], return_tensors="pt")["pixel_values"][0]


def load_zidong_clip(
    model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device: str = "cpu"
) -> tuple[ClipStyleModel, ClipStyleTransform, ClipStyleTokenizer]:
    """CLIP_benchmark's loader signature: `model_name` is the model folder (an export, a checkpoint or a run);
    `pretrained` and `cache_dir` are not used (nothing is downloaded)."""
    from zidong.export.trained import load_trained

    model, processor, _, _ = load_trained(model_name)
    clip = ClipStyleModel(model, processor.tokenizer.pad_token_id).to(device)
    return clip, ClipStyleTransform(processor), ClipStyleTokenizer(processor)


def register() -> None:
    """Make `--model_type zidong` known to CLIP_benchmark's loaders and command line (and let its zero-shot
    classification run under NumPy 2.4: `numpy_safe_accuracy`)."""
    from clip_benchmark import models
    from clip_benchmark.metrics import zeroshot_classification

    models.TYPE2FUNC[MODEL_TYPE] = load_zidong_clip
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)
    try:
        zeroshot_classification.accuracy(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    except TypeError:
        zeroshot_classification.accuracy = numpy_safe_accuracy


def numpy_safe_accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """Top-k accuracy as clip-benchmark 1.6.2's `zeroshot_classification.accuracy` counts it; that one takes
    `float()` of a one-element array, which NumPy 2.4 refuses (TypeError), so `register` puts this in its place
    where it fails."""
    predicted = output.topk(max(topk), 1, True, True)[1].t()
    correct = predicted.eq(target.view(1, -1).expand_as(predicted))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def write_webdataset(shards: str | Path, out: str | Path, labels: str | Path | None = None) -> list[Path]:
    """The shard folder's samples with an image in CLIP_benchmark's WebDataset layout, written by its own writer:
    `out` for retrieval (those with a caption too), and with a label file `out-<field>` for zero-shot
    classification (those with a class). Returns the dataset folders written."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset, convert_retrieval_dataset

    from zidong.data.labels import load_labels
    from zidong.data.shards import ShardFolder
    from zidong.evaluation.retrieval import sample_refs

    label_set = load_labels(labels) if labels else None
    pairs, classified = [], []
    folder = ShardFolder(shards)
    for shard, position in sample_refs(folder):
        raw = folder.read(shard, position)
        image_member = next((ext for ext in ("png", "jpg") if ext in raw.files), None)
        if image_member is None:
            continue
        with Image.open(io.BytesIO(raw.files[image_member])) as opened:
            image = opened.convert("RGB")
        if "txt" in raw.files:
            pairs.append((image, [raw.files["txt"].decode("utf-8").replace("\n", " ")]))
        name = label_set.label_of(raw.meta) if label_set else None
        if name is not None:
            classified.append((image, list(label_set.classes).index(name)))
    folder.close()
    out = Path(out)
    options = {"transform": PIL_to_bytes("png"), "image_format": "png", "verbose": False}
    convert_retrieval_dataset(pairs, SPLIT, str(out), **options)
    (out / "dataset_type.txt").write_text("retrieval\n")
    written = [out]
    if label_set is not None:
        target = out.with_name(f"{out.name}-{label_set.field.rpartition('.')[2]}")
        convert_dataset(classified, SPLIT, str(target), **options)
        (target / "classnames.txt").write_text("\n".join(label_set.classes) + "\n")
        (target / "zeroshot_classification_templates.txt").write_text("{c}\n")  # the class names alone
        prompts = {name: list(texts) for name, texts in label_set.classes.items()}  # the label file's prompts
        (target / "templates.json").write_text(json.dumps({target.name: prompts}, ensure_ascii=False))
        written.append(target)
    return written


def main(argv: list[str]) -> int:
    """`wds SHARDS OUT [--labels FILE]`, or CLIP_benchmark's own command line with `--model_type zidong`."""
    if argv[:1] == ["wds"]:
        import argparse

        parser = argparse.ArgumentParser(prog="python -m zidong.evaluation.suites.clip wds")
        parser.add_argument("shards")
        parser.add_argument("out")
        parser.add_argument("--labels")
        args = parser.parse_args(argv[1:])
        for written in write_webdataset(args.shards, args.out, args.labels):
            print(written)
        return 0
    from clip_benchmark import cli

    register()
    sys.argv = ["clip_benchmark", *argv]
    return cli.main() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
