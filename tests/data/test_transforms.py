"""Per-sample decoding and augmentation: crops, audio windows, bucketing lengths, collation, decode errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from zidong import ZidongProcessor
from zidong.data.labels import LabelSet
from zidong.data.shards import RawSample, SampleError
from zidong.data.transforms import SamplePipeline, split_rows


def raw_sample(text: str | None = None, image_size=None, audio_seconds: float | None = None) -> RawSample:
    files, meta = {}, {"modalities": []}
    if text is not None:
        files["txt"] = text.encode()
        meta["modalities"].append("text")
    if image_size is not None:
        buffer = io.BytesIO()
        pixels = np.random.default_rng(0).integers(0, 255, (image_size[1], image_size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
        files["png"] = buffer.getvalue()
        meta["modalities"].append("vision")
    if audio_seconds is not None:
        buffer = io.BytesIO()
        soundfile.write(
            buffer, np.linspace(-0.99, 0.99, int(audio_seconds * 16000), dtype=np.float32), 16000, format="FLAC"
        )
        files["flac"] = buffer.getvalue()
        meta["modalities"].append("speech")
        meta["audio_seconds"] = audio_seconds
    return RawSample(key="000000007", shard="0000-00000.tar", meta=meta, files=files)


def test_eval_takes_the_centre_square_and_the_audio_head(processor: ZidongProcessor) -> None:
    pipeline = SamplePipeline(processor, train=False, max_speech_seconds=1.0)
    sample = pipeline.decode(raw_sample("a red circle", (40, 30), 2.5), np.random.default_rng(0))
    assert sample.image.size == (30, 30)
    original, _ = soundfile.read(io.BytesIO(raw_sample(audio_seconds=2.5).files["flac"]), dtype="float32")
    np.testing.assert_array_equal(sample.audio, original[:16000])


def test_training_crops_at_random_but_reproducibly(processor: ZidongProcessor) -> None:
    pipeline = SamplePipeline(processor, train=True, max_speech_seconds=1.0, crop_scale=(0.5, 0.6))
    raw = raw_sample("a red circle", (64, 48), 2.5)
    first = pipeline.decode(raw, np.random.default_rng(1))
    again = pipeline.decode(raw, np.random.default_rng(1))
    other = pipeline.decode(raw, np.random.default_rng(2))
    assert first.image.tobytes() == again.image.tobytes()
    assert np.array_equal(first.audio, again.audio)
    assert first.image.size != other.image.size or first.image.tobytes() != other.image.tobytes()
    width, height = first.image.size
    assert 0.5 * 64 * 48 * 0.95 <= width * height <= 0.6 * 64 * 48 * 1.05
    original, _ = soundfile.read(io.BytesIO(raw.files["flac"]), dtype="float32")
    starts = [s for s in range(len(original) - 16000 + 1) if original[s] == first.audio[0]]
    assert len(first.audio) == 16000
    assert np.array_equal(original[starts[0] : starts[0] + 16000], first.audio)


def test_lengths_follow_the_caps(processor: ZidongProcessor) -> None:
    pipeline = SamplePipeline(processor, train=True, max_text_tokens=8, max_speech_seconds=1.0)
    speech, text = pipeline.lengths(raw_sample("s item 3 red blue green small large circle square", None, 2.5))
    assert speech == 1.0
    assert text == 8
    assert SamplePipeline(processor, train=True).lengths(raw_sample("s item 3", (10, 10))) == (
        -1.0,
        len(processor.tokenizer("s item 3")["input_ids"]),
    )


def test_collate_marks_presence_and_pads(processor: ZidongProcessor) -> None:
    pipeline = SamplePipeline(processor, train=False)
    rng = np.random.default_rng(0)
    samples = [
        pipeline.decode(raw_sample("s item 1", (20, 20), 0.5), rng),
        pipeline.decode(raw_sample("s item 22 red", None, 0.25), rng),
        pipeline.decode(raw_sample(None, (30, 20), 1.0), rng),
    ]
    batch = pipeline.collate(samples)
    assert batch["text_present"].tolist() == [True, True, False]
    assert batch["vision_present"].tolist() == [True, False, True]
    assert batch["speech_present"].tolist() == [True, True, True]
    assert batch["speech_attention_mask"].sum(dim=1).tolist() == [8000, 4000, 16000]
    assert batch["pixel_values"].shape[0] == 2
    assert batch["input_ids"].shape[0] == 2
    assert batch["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize(("start", "stop"), [(0, 2), (1, 3), (2, 4), (3, 4), (0, 4)])
def test_rows_of_a_batch_equal_the_batch_of_those_rows(processor: ZidongProcessor, start: int, stop: int) -> None:
    # the processor collating the rows alone is the independent reference for split_rows
    pipeline = SamplePipeline(processor, train=False, label_set=LabelSet("labels.x", {"a": ["a"], "b": ["b"]}))
    rng = np.random.default_rng(0)
    raws = [
        raw_sample("s item 1 red blue green", (20, 20), 0.5),
        raw_sample("s item 22", None, 1.5),
        raw_sample(None, (30, 20), 0.25),
        raw_sample("s item 3 left", (24, 24), None),
    ]
    for number, raw in enumerate(raws):
        raw.meta["labels"] = {"x": "ab"[number % 2]}
    samples = [pipeline.decode(raw, rng) for raw in raws]
    part, alone = split_rows(pipeline.collate(samples), start, stop), pipeline.collate(samples[start:stop])
    assert part.keys() == alone.keys()
    for name, tensor in alone.items():
        assert torch.equal(part[name], tensor), name


@pytest.mark.parametrize(
    ("member", "content", "reason"),
    [
        ("png", b"not an image", "image does not decode"),
        ("flac", b"fLaC broken", "audio does not decode"),
        ("txt", b"\xff\xfe", "text is not UTF-8"),
        ("png", None, "no jpg/png member"),
    ],
)
def test_undecodable_members_name_shard_and_key(
    processor: ZidongProcessor,
    member: str,
    content: bytes | None,
    reason: str,
) -> None:
    raw = raw_sample("a caption", (10, 10), 0.5)
    files = (
        {**raw.files, member: content} if content is not None else {k: v for k, v in raw.files.items() if k != member}
    )
    broken = RawSample(key=raw.key, shard=raw.shard, meta=raw.meta, files=files)
    with pytest.raises(SampleError, match=rf"0000-00000.tar key 000000007: {reason}"):
        SamplePipeline(processor, train=True).decode(broken, np.random.default_rng(0))
