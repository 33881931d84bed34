"""`speech_chunk_rows`: the speech tower runs over rows sorted by length, a few rows a call, each call cut to its
longest row, and the model computes what one call over every row computes. Checked against the same model with
chunking off (one padded call, the tower's own masking), in states, mask, embeddings and gradients, on rows whose
lengths spread as a batch drawn without length bucketing spreads them."""

from __future__ import annotations

import torch

from tests.tiny_model import tiny_config
from zidong.models.zidong.lockstep_zidong import Launch
from zidong.models.zidong.modeling_zidong import ZidongModel

SECONDS = (0.4, 2.9, 1.1, 0.7, 3.6, 1.9, 0.5, 2.2, 1.4)  # ragged, out of order


def speech_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    samples = [int(16000 * seconds) for seconds in SECONDS]
    waveforms = 0.1 * torch.randn(len(samples), max(samples), generator=generator)
    mask = (torch.arange(max(samples))[None, :] < torch.tensor(samples)[:, None]).long()
    return waveforms * mask, mask


def model(chunk_rows: int) -> ZidongModel:
    """In eval mode: in training SpecAugment draws its masks per call, so chunks draw other (equally random)
    masks than one call does."""
    torch.manual_seed(0)
    return ZidongModel(tiny_config(speech_chunk_rows=chunk_rows)).eval()


def test_chunks_compute_what_one_call_computes_and_run_cut_to_their_rows() -> None:
    whole, chunked = model(0), model(4)
    chunked.load_state_dict(whole.state_dict())
    widths = []
    chunked.speech_model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_features"].shape[:2]), with_kwargs=True)  # fmt: skip
    waveforms, mask = speech_batch()
    expected, got = whole.encode_speech(waveforms, mask), chunked.encode_speech(waveforms, mask)
    # three calls of at most 4 rows, each as long as its own longest row, the shortest rows first
    assert [rows for rows, _ in widths] == [4, 4, 1]
    assert widths[0][1] < widths[1][1] < widths[2][1] == expected.token_states.shape[1]
    assert torch.equal(got.attention_mask, expected.attention_mask)
    real = expected.attention_mask[..., None]
    torch.testing.assert_close(got.token_states * real, expected.token_states * real, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooled, expected.pooled, rtol=1e-5, atol=1e-5)
    expected.pooled.square().sum().backward()
    got.pooled.square().sum().backward()
    for (name, a), b in zip(whole.speech_model.named_parameters(), chunked.speech_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lockstep_and_asked_for_hidden_states_run_one_call() -> None:
    chunked = model(4)
    calls = []
    chunked.speech_model.register_forward_hook(lambda *_: calls.append(1))
    waveforms, mask = speech_batch()
    chunked.encode_speech(waveforms, mask, output_hidden_states=True)
    assert len(calls) == 1
    chunked.launch = Launch(lockstep=True)
    chunked.encode_speech(waveforms, mask)
    assert len(calls) == 2
