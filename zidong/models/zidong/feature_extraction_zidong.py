"""Speech front end: Kaldi-compatible log-mel filterbanks computed for a whole padded batch at once, in torch.

`BatchedFbank` turns padded 16 kHz waveforms (batch, samples) into (batch, frames, mel bins) on whatever device
the model lives on, one batched FFT for every real frame of every utterance (padding frames are skipped). It reproduces
`torchaudio.compliance.kaldi.fbank` with its defaults (25 ms Povey window, 10 ms shift, pre-emphasis 0.97,
DC removal, power spectrum, snip_edges) to float32 rounding; tests/models/test_feature_extraction.py states
the tolerance. Each frame is computed from its own samples only, so padding never changes a real frame.

`ZidongFeatureExtractor` is the processor side: it checks that audio is mono and at 16 kHz (it does not
resample) and pads waveforms into `input_values` + `attention_mask`; the features are computed in the model.

This file imports only torch, torchaudio and transformers so that exported folders load with remote code.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torchaudio.compliance.kaldi import get_mel_banks
from transformers import BatchFeature, SequenceFeatureExtractor

MEL_BLOCKS = 4  # runs of filters multiplied separately (a quarter of the dense matmul's work for 80 bins)
# Real frames per log-mel pass on CPU. A whole batch's frames (9,000 of them: 18 MB per intermediate) made the
# allocator map fresh pages for every batch, a quarter of the front end's CPU time in the kernel; 1,024-frame
# passes reuse cached buffers: 0.145 against 0.27 CPU-seconds for the bench's 8 batches (256: 0.173, 4,096: 0.159).
FRAME_CHUNK = 1024


FRAME_SHIFT_MS = 10.0


def frame_shift_samples(sampling_rate: int, frame_shift_ms: float = FRAME_SHIFT_MS) -> int:
    """Samples from the start of one filterbank frame to the next."""
    return int(sampling_rate * frame_shift_ms / 1000)


class BatchedFbank(nn.Module):
    """Kaldi-style log-mel filterbank features for a padded batch of waveforms.

    Args:
        sampling_rate: input sample rate in Hz.
        num_mel_bins: number of mel filters.
        frame_length_ms / frame_shift_ms: analysis window and hop.
        preemphasis: pre-emphasis coefficient (Kaldi's default 0.97).
        low_freq / high_freq: mel filter range in Hz (high_freq <= 0 counts down from Nyquist, as in Kaldi).
        waveform_scale: multiplier applied to the waveform first; Kaldi models expect 16-bit integer scale, so
            [-1, 1] float audio is usually scaled by 32768.
    """

    def __init__(
        self,
        sampling_rate: int = 16000,
        num_mel_bins: int = 80,
        frame_length_ms: float = 25.0,
        frame_shift_ms: float = FRAME_SHIFT_MS,
        preemphasis: float = 0.97,
        low_freq: float = 20.0,
        high_freq: float = 0.0,
        waveform_scale: float = 32768.0,
    ):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.num_mel_bins = num_mel_bins
        self.low_freq = low_freq
        self.high_freq = high_freq
        self.window_size = int(sampling_rate * frame_length_ms / 1000)
        self.window_shift = frame_shift_samples(sampling_rate, frame_shift_ms)
        self.padded_window_size = 1 << (self.window_size - 1).bit_length()
        self.preemphasis = preemphasis
        self.waveform_scale = waveform_scale
        self.register_buffer("window", torch.empty(self.window_size, dtype=torch.float64), persistent=False)
        self.register_buffer("mel_banks", torch.empty(self.padded_window_size // 2 + 1, num_mel_bins), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the window and mel filters: constants, not weights, so never saved in checkpoints."""
        # Povey window: a Hann window raised to 0.85 (Kaldi's default); float64, cast to the input's dtype per call.
        # computed on the CPU even when the model is built on the meta device: the filter bands are read off them
        with torch.device("cpu"):
            window = torch.hann_window(self.window_size, periodic=False, dtype=torch.float64).pow(0.85)
            banks, _ = get_mel_banks(
                self.num_mel_bins,
                self.padded_window_size,
                float(self.sampling_rate),
                self.low_freq,
                self.high_freq,
                100.0,
                -500.0,
                1.0,
            )
            # Kaldi's banks cover padded_window_size/2 FFT bins; the Nyquist bin gets weight 0.
            banks = torch.nn.functional.pad(banks, (0, 1)).T.contiguous().float()
            self.mel_blocks = _band_blocks(banks, MEL_BLOCKS)
        self.window = window.to(self.window.device)
        self.mel_banks = banks.to(self.mel_banks.device)

    def _apply(self, fn, recurse=True):
        """Device moves apply to the window and filters; dtype casts (`model.half()`, `.to(torch.bfloat16)`) do
        not: they are recomputed in their own dtypes, so the front end computes in float32 in any model."""
        super()._apply(fn, recurse)
        if self.window.dtype != torch.float64 or self.mel_banks.dtype != torch.float32:
            self.window = torch.empty(self.window.shape, dtype=torch.float64, device=self.window.device)
            self.mel_banks = torch.empty(self.mel_banks.shape, dtype=torch.float32, device=self.mel_banks.device)
            self.reset_buffers()
        return self

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Frames Kaldi produces for each length (snip_edges: only windows that fit entirely)."""
        frames = torch.div(num_samples - self.window_size, self.window_shift, rounding_mode="floor") + 1
        return frames.clamp(min=0)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of a padded batch.

        Args:
            waveforms: (batch, samples) float, zero-padded at the end.
            lengths: (batch,) number of real samples per row.

        Returns:
            features (batch, frames, num_mel_bins) and frame_mask (batch, frames), True on real frames; padded
            frames hold zeros.
        """
        if waveforms.shape[1] < self.window_size:
            waveforms = nn.functional.pad(waveforms, (0, self.window_size - waveforms.shape[1]))
        if not waveforms.is_floating_point():
            waveforms = waveforms.float()
        frames = waveforms.unfold(1, self.window_size, self.window_shift)
        frame_mask = torch.arange(frames.shape[1], device=frames.device) < self.num_frames(lengths)[:, None]
        # Autocast is off: a bf16 filter product would move the features away from Kaldi's.
        with torch.autocast(frames.device.type, enabled=False):
            return self.padded_log_mel(frames, frame_mask, real_only=frames.device.type == "cpu"), frame_mask

    def padded_log_mel(self, frames: torch.Tensor, frame_mask: torch.Tensor, real_only: bool) -> torch.Tensor:
        """(batch, frames, window) -> (batch, frames, num_mel_bins) log-mel, zeros on padded frames.

        `real_only` (on CPU) computes the real frames only, gathered FRAME_CHUNK at a time, every later step on
        that flat chunk; the mask is read on the host, which costs nothing there. On an accelerator that read would make
        the host wait for the device, so every frame is computed and the padded ones are zeroed (same values)."""
        if not real_only:
            log_mel = self.log_mel(frames.reshape(-1, frames.shape[-1]))
            return log_mel.view(*frame_mask.shape, -1) * frame_mask[..., None]
        rows, columns = (torch.from_numpy(index) for index in np.nonzero(frame_mask.numpy()))
        features = frames.new_zeros((*frame_mask.shape, self.num_mel_bins))
        for start in range(0, len(rows), FRAME_CHUNK):
            chunk = rows[start : start + FRAME_CHUNK], columns[start : start + FRAME_CHUNK]
            features[chunk] = self.log_mel(frames[chunk])
        return features

    def log_mel(self, frames: torch.Tensor) -> torch.Tensor:
        """(frames, window_size) raw frames -> (frames, num_mel_bins) log-mel energies."""
        count, width = frames.shape
        if count == 0:  # MKL's FFT refuses an empty batch
            return frames.new_zeros((0, self.num_mel_bins))
        emphasized = frames.new_empty((count, self.padded_window_size))
        emphasized[:, width:] = 0.0
        emphasized[:, 0] = frames[:, 0] * (1.0 - self.preemphasis)
        torch.sub(frames[:, 1:], frames[:, :-1], alpha=self.preemphasis, out=emphasized[:, 1:width])
        # DC removal commutes with pre-emphasis: emphasis(x - mean) = emphasis(x) - (1 - preemphasis) * mean.
        # Everything before the power spectrum is linear, so the input scale rides on the window.
        scaled_window = self.window.to(frames.dtype) * self.waveform_scale
        emphasized[:, :width].sub_(frames.mean(dim=1, keepdim=True) * (1.0 - self.preemphasis)).mul_(scaled_window)
        spectrum = torch.view_as_real(torch.fft.rfft(emphasized))
        power = spectrum[..., 0] * spectrum[..., 0]  # |X|^2 in two passes; complex abs() is several times slower
        power.addcmul_(spectrum[..., 1], spectrum[..., 1])
        banks = self.mel_banks.to(power.dtype)
        # each filter covers a narrow band of FFT bins: a few matmuls over those bands skip the zeros of one big one
        mel = torch.cat([power[:, lo:hi] @ banks[lo:hi, first:last] for first, last, lo, hi in self.mel_blocks], 1)
        # Kaldi floors at float32's epsilon whatever the precision (digital silence gives log(eps), not -inf)
        return mel.clamp_(min=torch.finfo(torch.float32).eps).log_()


def _band_blocks(banks: torch.Tensor, blocks: int) -> list[tuple[int, int, int, int]]:
    """(first filter, last filter, first bin, last bin) of `blocks` runs of adjacent filters and the bins they cover."""
    filters = banks.shape[1]
    covered = banks.T > 0
    runs = []
    for block in range(blocks):
        first, last = block * filters // blocks, (block + 1) * filters // blocks
        bins = covered[first:last].any(dim=0).nonzero()
        low, high = (int(bins.min()), int(bins.max()) + 1) if len(bins) else (0, 1)
        runs.append((first, last, low, high))
    return runs


def normalize_and_stack(
    features: torch.Tensor, frame_mask: torch.Tensor, stack: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance mean/variance normalisation over real frames, then stack `stack` frames into one step.

    Stacking halves (for stack=2) the frame rate: 100 frames/s become 50 steps/s with 2x the feature width,
    the input layout of w2v-BERT-style encoders. A step is real only when all its frames are. The variance is the
    unbiased one, as in transformers' `SeamlessM4TFeatureExtractor`, so an exported speech tower gets the same
    features from that stock extractor.
    """
    weights = frame_mask[..., None].to(features.dtype)
    count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (features * weights).sum(dim=1, keepdim=True) / count
    variance = ((features - mean).pow(2) * weights).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1.0)
    normalized = (features - mean) / (variance + 1e-7).sqrt() * weights
    batch, frames, bins = normalized.shape
    steps = frames // stack
    stacked = normalized[:, : steps * stack].reshape(batch, steps, stack * bins)
    step_mask = frame_mask[:, : steps * stack].reshape(batch, steps, stack).all(dim=-1)
    return stacked, step_mask


class ZidongFeatureExtractor(SequenceFeatureExtractor):
    """Pads mono waveforms into a batch; the filterbank runs in the model (`BatchedFbank`), on its device.

    Call it with one waveform (1-D array) or a list of them, at `sampling_rate` (16 kHz). Returns
    `input_values` (batch, samples) and `attention_mask` (batch, samples). It keeps every sample: training cuts
    long audio in the data pipeline (`data.max_speech_seconds`, zidong/data/transforms.py).
    """

    model_input_names: ClassVar[list[str]] = ["input_values", "attention_mask"]

    def __init__(
        self,
        feature_size: int = 1,
        sampling_rate: int = 16000,
        padding_value: float = 0.0,
        **kwargs,
    ):
        kwargs.pop("return_attention_mask", None)  # always True; present when loading a saved config
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=True,
            **kwargs,
        )

    def __call__(
        self, audio, sampling_rate: int | None = None, return_tensors: str | None = None, **kwargs
    ) -> BatchFeature:
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio was given at {sampling_rate} Hz but this feature extractor expects {self.sampling_rate} Hz; "
                "resample first (zidong data build stores 16 kHz audio)"
            )
        waveforms = [audio] if _is_single_waveform(audio) else list(audio)
        arrays = []
        for index, waveform in enumerate(waveforms):
            array = np.asarray(waveform, dtype=np.float32)
            if array.ndim != 1:
                raise ValueError(f"audio[{index}] must be a mono 1-D waveform, got shape {array.shape}")
            arrays.append(array)
        longest = max((len(a) for a in arrays), default=0)
        values = np.full((len(arrays), longest), self.padding_value, dtype=np.float32)
        mask = np.zeros((len(arrays), longest), dtype=np.int64)
        for row, array in enumerate(arrays):
            values[row, : len(array)] = array
            mask[row, : len(array)] = 1
        return BatchFeature({"input_values": values, "attention_mask": mask}, tensor_type=return_tensors)


def _is_single_waveform(audio) -> bool:
    if isinstance(audio, np.ndarray | torch.Tensor):
        return audio.ndim == 1
    return len(audio) > 0 and isinstance(audio[0], int | float)
