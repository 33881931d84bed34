"""Checkpoint folders: what a resume refuses before touching any state."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from zidong.errors import UserError
from zidong.train.checkpoint import load_checkpoint


def test_a_deepspeed_checkpoint_refuses_another_process_count(tmp_path: Path) -> None:
    (tmp_path / "trainer.json").write_text(json.dumps({"step": 4, "processes": 2}))
    loaded = []
    accelerator = SimpleNamespace(
        num_processes=4, state=SimpleNamespace(deepspeed_plugin=object()), load_state=loaded.append
    )
    with pytest.raises(UserError, match="written by 2 DeepSpeed processes and this launch has 4") as error:
        load_checkpoint(accelerator, tmp_path)
    assert "--num_processes 2" in str(error.value)
    assert loaded == []  # refused before any state was read
    accelerator.state.deepspeed_plugin = None  # DDP and one process keep whole states: any count resumes
    trainer_state, saved = load_checkpoint(accelerator, tmp_path)
    assert trainer_state == {"step": 4, "processes": 2}
    assert len(saved) == 0  # no data-stream states: the stream starts afresh
    assert loaded == [str(tmp_path)]
