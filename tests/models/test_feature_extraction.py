"""Batched filterbank parity with torchaudio.compliance.kaldi.fbank, padding invariance, and the padding extractor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchaudio.compliance.kaldi import fbank

from tests.tiny_model import tiny_config
from zidong.models.zidong.feature_extraction_zidong import (
    FRAME_CHUNK,
    BatchedFbank,
    ZidongFeatureExtractor,
    normalize_and_stack,
)

LENGTHS = [16000, 12345, 400, 399, 24000]  # includes exactly one window and one sample short of it
LONG_LENGTHS = [16000 * 8, 16000 * 5 + 123, 16000 * 9]  # more real frames than two CPU chunks (FRAME_CHUNK)

# float64 reproduces Kaldi's arithmetic exactly; float32 differs by FFT/matmul rounding only.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-4}


def padded_batch(lengths: list[int], dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    waves = [torch.randn(n, generator=generator, dtype=dtype) * 0.1 for n in lengths]
    waves[0][4000:8000] = 0.0  # digital silence: the log floor must be Kaldi's in every precision
    batch = torch.zeros(len(waves), max(lengths), dtype=dtype)
    for row, wave in enumerate(waves):
        batch[row, : len(wave)] = wave
    return waves, batch


# float64 over the long batch: the algorithm across chunk boundaries (float32's FFT rounding on 22 s of noise
# reaches 5.3e-4 with or without chunks; chunked float32 is held to one pass in the test below)
@pytest.mark.parametrize(
    ("dtype", "lengths"),
    [(torch.float64, LENGTHS), (torch.float32, LENGTHS), (torch.float64, LONG_LENGTHS)],
    ids=["float64", "float32", "float64-over-two-chunks"],
)
def test_matches_kaldi_fbank(dtype: torch.dtype, lengths: list[int]) -> None:
    waves, batch = padded_batch(lengths, dtype)
    features, mask = BatchedFbank(num_mel_bins=80)(batch, torch.tensor(lengths))
    for row, wave in enumerate(waves):
        if len(wave) < 400:
            assert mask[row].sum() == 0
            continue
        reference = fbank((wave * 32768)[None], num_mel_bins=80, sample_frequency=16000)
        assert mask[row].sum().item() == reference.shape[0]
        difference = (features[row, : reference.shape[0]] - reference).abs().max().item()
        assert difference < TOLERANCE[dtype]
        assert features[row, reference.shape[0] :].abs().sum() == 0


def test_autocast_does_not_lower_the_filterbank_precision() -> None:
    _, batch = padded_batch(LENGTHS, torch.float32)
    expected, _ = BatchedFbank()(batch, torch.tensor(LENGTHS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, _ = BatchedFbank()(batch, torch.tensor(LENGTHS))
    assert features.dtype == torch.float32
    assert torch.equal(features, expected)


def test_a_batch_with_no_whole_window_gives_empty_features() -> None:
    features, mask = BatchedFbank()(torch.zeros(2, 300), torch.tensor([300, 120]))
    assert mask.shape == (2, 1)
    assert not mask.any()
    assert features.shape == (2, 1, 80)
    assert features.abs().sum() == 0


def test_a_row_does_not_depend_on_its_batch() -> None:
    waves, batch = padded_batch(LENGTHS, torch.float32)
    features, mask = BatchedFbank()(batch, torch.tensor(LENGTHS))
    alone, alone_mask = BatchedFbank()(waves[1][None], torch.tensor([LENGTHS[1]]))
    frames = alone_mask.sum().item()
    assert torch.equal(mask[1, :frames], alone_mask[0])
    assert torch.allclose(features[1, :frames], alone[0], atol=1e-5)


def test_every_frame_path_of_accelerators_gives_the_real_frame_features() -> None:
    # on an accelerator every frame is computed and padding zeroed (no host read of the mask); on CPU only the
    # real frames are: the same features
    _, batch = padded_batch(LENGTHS, torch.float32)
    fbank = BatchedFbank()
    frames = batch.unfold(1, fbank.window_size, fbank.window_shift)
    mask = torch.arange(frames.shape[1]) < fbank.num_frames(torch.tensor(LENGTHS))[:, None]
    assert not mask.all()  # some padding
    real_only = fbank.padded_log_mel(frames, mask, real_only=True)
    every = fbank.padded_log_mel(frames, mask, real_only=False)
    assert torch.allclose(real_only, every, atol=1e-5)
    assert every[~mask].abs().sum() == 0


def test_real_frames_computed_in_chunks_equal_one_pass_over_them() -> None:
    # the CPU path computes FRAME_CHUNK real frames at a time; a batch of more than two chunks, with padding,
    # must give every real frame what one pass over all of them gives
    _, batch = padded_batch(LONG_LENGTHS, torch.float32)
    fbank = BatchedFbank()
    frames = batch.unfold(1, fbank.window_size, fbank.window_shift)
    mask = torch.arange(frames.shape[1]) < fbank.num_frames(torch.tensor(LONG_LENGTHS))[:, None]
    assert mask.sum() > 2 * FRAME_CHUNK
    assert not mask.all()
    chunked = fbank.padded_log_mel(frames, mask, real_only=True)
    one_pass = fbank.log_mel(frames[mask])
    assert torch.allclose(chunked[mask], one_pass, rtol=0, atol=1e-5)
    assert chunked[~mask].abs().sum() == 0


def test_normalize_and_stack_uses_real_frames_only() -> None:
    features = torch.randn(2, 10, 4)
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    features[1, 6:] = 1000.0  # garbage in padding must not leak into the statistics
    stacked, step_mask = normalize_and_stack(features, mask, stack=2)
    assert stacked.shape == (2, 5, 8)
    assert step_mask.tolist() == [[True] * 5, [True, True, True, False, False]]
    real = stacked[1, :3].reshape(6, 4)
    assert torch.allclose(real.mean(dim=0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(real.var(dim=0, unbiased=True), torch.ones(4), atol=1e-3)
    assert stacked[1, 3:].abs().sum() == 0


def test_feature_extractor_pads_and_masks() -> None:
    extractor = ZidongFeatureExtractor()
    out = extractor([np.ones(5), np.ones(3)], sampling_rate=16000, return_tensors="pt")
    assert out["input_values"].shape == (2, 5)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert extractor(np.zeros(7))["input_values"].shape == (1, 7)


def test_feature_extractor_rejects_wrong_rate_and_stereo() -> None:
    extractor = ZidongFeatureExtractor()
    with pytest.raises(ValueError, match="expects 16000 Hz"):
        extractor([np.ones(5)], sampling_rate=8000)
    with pytest.raises(ValueError, match=r"audio\[0\] must be a mono 1-D waveform"):
        extractor([np.ones((2, 5))])


def test_speech_steps_match_the_stock_w2v_bert_feature_extractor() -> None:
    # what an exported speech tower's users get from plain transformers (SeamlessM4TFeatureExtractor, numpy, float64)
    from transformers import SeamlessM4TFeatureExtractor

    from zidong.models.zidong.modeling_zidong import ZidongModel

    model = ZidongModel(tiny_config()).eval()
    generator = torch.Generator().manual_seed(0)
    lengths = (16000, 11201)  # one utterance with an odd number of frames
    waves = torch.zeros(2, 16000)
    for row, length in enumerate(lengths):
        time = torch.arange(length) / 16000
        waves[row, :length] = 0.3 * torch.sin(2 * torch.pi * 220 * time) + 0.05 * torch.randn(
            length, generator=generator
        )
    mask = (torch.arange(16000)[None] < torch.tensor(lengths)[:, None]).long()
    steps, step_mask = model.speech_steps(waves, mask)
    stock = SeamlessM4TFeatureExtractor(stride=model.config.speech_frame_stack)
    expected = stock(
        [w[:n].numpy() for w, n in zip(waves, lengths, strict=True)], sampling_rate=16000, return_tensors="pt"
    )
    assert steps.shape == expected["input_features"].shape
    assert torch.equal(step_mask, expected["attention_mask"].bool())
    real = step_mask[..., None].expand_as(steps)
    difference = (steps[real] - expected["input_features"][real].float()).abs().max()
    assert difference < 5e-4, difference  # measured 1.2e-4: float32 here, float64 there
