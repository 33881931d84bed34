"""Measurement 5: the batched filterbank against per-utterance `torchaudio.compliance.kaldi.fbank`.

Both compute the same features for the same speech batches (as the stream bucketed them), and the rate is seconds
of audio per CPU-second of this process (all its threads: an intra-op thread that spins counts). It is measured
with one thread (a loader worker's setting; the headline) and with the process's threads (the training
process's). Parity is the largest difference over real frames and bins, in log-mel units, in float32 (what
training uses) and float64 (the algorithm itself).
"""

from __future__ import annotations

import torch
from torchaudio.compliance.kaldi import fbank

from benchmarks.common import Result, cpu_seconds
from zidong.models.zidong.feature_extraction_zidong import BatchedFbank

SpeechBatch = tuple[torch.Tensor, torch.Tensor]  # padded waveforms (n, samples), sample mask (n, samples)


def frontend(speech_batches: list[SpeechBatch], sampling_rate: int = 16000) -> list[Result]:
    """Two rows: the speed-up over per-utterance Kaldi (the target), and the fraction of the FFT limit it reaches
    (our rate / the FFT's alone: what is left to close in our own code, comparable between CPUs whose FFT-to-rest
    speed differs)."""
    batched = BatchedFbank(sampling_rate=sampling_rate)
    utterances = [utterance for batch in speech_batches for utterance in _utterances(batch)]
    audio_seconds = sum(len(u) for u in utterances) / sampling_rate

    @torch.no_grad()
    def per_utterance() -> None:
        for utterance in utterances:
            fbank(utterance[None] * 32768.0, num_mel_bins=batched.num_mel_bins, sample_frequency=batched.sampling_rate)

    @torch.no_grad()
    def whole_batches() -> None:
        for waveforms, mask in speech_batches:
            batched(waveforms, mask.sum(dim=1))

    parity = {
        f"max_abs_difference_{str(dtype).removeprefix('torch.')}": _largest_difference(batched, speech_batches, dtype)
        for dtype in (torch.float32, torch.float64)
    }
    # the floor both sides share: one real FFT of the padded window per frame (Kaldi's algorithm)
    frames = int(sum(batched.num_frames(mask.sum(dim=1)).sum() for _, mask in speech_batches))
    windows = torch.randn(frames, batched.padded_window_size)
    threads = torch.get_num_threads()
    rates = {}
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        try:
            kaldi = audio_seconds / cpu_seconds(per_utterance, repeats=3)
            ours = audio_seconds / cpu_seconds(whole_batches, repeats=3)
            fft_only = audio_seconds / cpu_seconds(lambda: torch.fft.rfft(windows), repeats=3)
        finally:
            torch.set_num_threads(threads)
        rates[f"{count}_threads"] = {
            "kaldi_audio_s_per_cpu_s": kaldi,
            "batched_audio_s_per_cpu_s": ours,
            "fft_alone_audio_s_per_cpu_s": fft_only,
            "ratio_if_all_but_the_fft_were_free": fft_only / kaldi,
        }
    details = {"audio_seconds": audio_seconds, "utterances": len(utterances), "frames": frames, **parity, **rates}
    one = rates["1_threads"]
    ratio = one["batched_audio_s_per_cpu_s"] / one["kaldi_audio_s_per_cpu_s"]
    name = "batched fbank / per-utterance kaldi.fbank, audio s per CPU s (CPU, 1 thread)"
    reached = one["batched_audio_s_per_cpu_s"] / one["fft_alone_audio_s_per_cpu_s"]
    limit = "batched fbank / its FFT alone, audio s per CPU s: the FFT limit's fraction reached (CPU, 1 thread)"
    return [Result(5, name, ratio, ">= 5", details), Result(5, limit, reached, ">= 0.5", details)]


def _utterances(batch: SpeechBatch) -> list[torch.Tensor]:
    waveforms, mask = batch
    return [waveform[:length] for waveform, length in zip(waveforms, mask.sum(dim=1).tolist(), strict=True)]


@torch.no_grad()
def _largest_difference(batched: BatchedFbank, speech_batches: list[SpeechBatch], dtype: torch.dtype) -> float:
    """The largest |batched - kaldi| over every real frame and bin, both computed in `dtype`."""
    worst = 0.0
    for waveforms, mask in speech_batches:
        features, frame_mask = batched(waveforms.to(dtype), mask.sum(dim=1))
        for row, real, utterance in zip(features, frame_mask, _utterances((waveforms, mask)), strict=True):
            expected = fbank(
                utterance.to(dtype)[None] * 32768.0,
                num_mel_bins=batched.num_mel_bins,
                sample_frequency=batched.sampling_rate,
            )
            worst = max(worst, float((row[real] - expected).abs().max()))
    return worst
