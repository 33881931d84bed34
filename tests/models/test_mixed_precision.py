"""Under bf16 autocast the towers compute in bf16, while the audio front end, the contrastive logits and every
loss stay float32 (what reaches each loss function is recorded as it is called)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tests.tiny_model import ALL_OBJECTIVES, make_inputs, tiny_config
from zidong.models.zidong.modeling_zidong import ZidongModel

# the functions every objective ends in, and the speech front end's transform
LOSS_FUNCTIONS = {
    F.cross_entropy: "cross_entropy",
    F.mse_loss: "mse_loss",
    F.logsigmoid: "logsigmoid",
    torch.Tensor.logsumexp: "logsumexp",
}
RECORDED = {**LOSS_FUNCTIONS, torch.fft.rfft: "rfft", F.linear: "linear"}


class InputDtypes(TorchFunctionMode):
    """Records, per watched function, the dtypes of the floating-point tensors it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RECORDED:
            dtypes = {a.dtype for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()}
            self.seen.setdefault(RECORDED[func], set()).update(dtypes)
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_under_bf16_autocast_the_towers_run_in_bf16_and_every_loss_in_float32(kind: str) -> None:
    torch.manual_seed(0)
    model = ZidongModel(tiny_config(contrastive_loss=kind)).train()
    present = {"text": [1, 1, 1, 0, 1], "vision": [1, 1, 0, 1, 1], "speech": [1, 0, 1, 1, 1]}
    inputs = make_inputs({m: [bool(p) for p in rows] for m, rows in present.items()})
    recorder = InputDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), recorder:
        output = model(**inputs, return_loss=True, loss_weights=ALL_OBJECTIVES)
    output.loss.backward()
    seen = recorder.seen
    assert torch.bfloat16 in seen["linear"], "autocast was not in effect: no layer ran in bf16"
    assert seen["rfft"] == {torch.float32}  # the filterbank
    contrastive = "logsigmoid" if kind == "sigmoid" else "cross_entropy"
    assert seen[contrastive] == {torch.float32}  # the contrastive logits
    for name in ("cross_entropy", "mse_loss", "logsumexp"):  # masked text, masked vision and speech, matching
        assert seen[name] == {torch.float32}, f"{name} was given {seen[name]}"
    assert set(output.losses) == {
        *(f"contrastive_{pair}" for pair in ("text_vision", "text_speech", "vision_speech")),
        "contrastive",
        "matching",
        "masked_text",
        "masked_vision",
        "masked_speech",
    }
    for name, loss in output.losses.items():
        assert loss.dtype == torch.float32, name
        assert torch.isfinite(loss), name
    assert output.loss.dtype == torch.float32
    for modality in ("text", "vision", "speech"):
        assert getattr(output, f"{modality}_embeds").dtype == torch.float32
    parameters = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in parameters)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in parameters)
